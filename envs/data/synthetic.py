"""A deterministic, seeded synthetic world: entities, wiki-style passages, multi-hop questions.

Why synthetic: the env, the retrievers and the RL benchmark must run offline, in seconds, and
identically on every machine, yet exercise what real multi-hop QA exercises (search, bridge
entities, comparisons, distractors). Real corpora (wiki-18) are 21M passages and cannot ship.

Design choices and why:
- Names are invented words built from syllables, unique per entity (people: given name +
  surname; everything else: one word). A tiny LM on CPU cannot learn to copy long multi-token
  names (REFERENCE.md, last section), so `World.entity_names()` lists every name for a tokenizer
  builder to turn each into one token.
- Every entity's own passage repeats its name (title + twice in the text), so a BM25 search for
  the exact name ranks that passage first or near it; the scripted oracle depends on this.
- Distractors make retrieval non-trivial without making it ambiguous: namesakes sharing a
  surname, villages with near-identical names, festival and birth-list passages that mention
  entities in passing. Distractors never contradict a fact a question relies on.
- Only `random.Random(seed)` is used (never the global RNG, never `hash()` of a str, which is
  salted per process), and all iteration is over lists, so the same seed gives byte-identical
  files on every run.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from treegym.envs.data.task import Task
from treegym.paths import treegym_home

# Bump whenever generation changes (names, templates, counts): cached worlds are keyed on it.
# v2: corpus title lines without wiki-18's quotes (titles are now shown as is, Search-R1's rule).
WORLD_VERSION = 2

KINDS: tuple[str, ...] = ("single", "bridge", "comparison", "bridge3")
SPLITS: tuple[str, ...] = ("train", "dev", "test")
DATA_SOURCE = "treegym_synthetic"

# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Entity:
    """A node of the world's knowledge graph. `relations` are (relation, target entity id)."""

    id: str
    type: str  # "person" | "city" | "country" | "organisation" | "work"
    name: str
    attributes: dict[str, Any] = field(default_factory=dict, hash=False)
    relations: list[tuple[str, str]] = field(default_factory=list, hash=False)

    def rel(self, relation: str) -> str | None:
        """The first target of `relation`, or None."""
        for r, target in self.relations:
            if r == relation:
                return target
        return None


@dataclass(frozen=True)
class Doc:
    """One passage of the corpus. `entity_id` is None for distractors."""

    doc_id: str
    title: str
    text: str
    entity_id: str | None = None

    @property
    def contents(self) -> str:
        """The `contents` field: the title line, a newline, the text. Unlike wiki-18 the title
        line has no quotes: observations take it as is (Search-R1's rule), and the committed
        warm starts were trained on `Doc 1(Title: Name) ...`, which this keeps byte for byte."""
        return f"{self.title}\n{self.text}"


# ---------------------------------------------------------------------------------------------
# Names

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "sk", "sh", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ia")
_CODAS = ("n", "r", "l", "s", "m", "th", "x", "nd", "rn", "sk", "")

# Words the passages and questions use, plus common short English words: an invented name must
# never collide with one of them (BM25 would then match template text).
_RESERVED = set("""
a an the in of is was and or by to from for with who which what when where how year born city
country organisation company works work for founded population capital republic officially
became independent village river small lies near festival held every attended known best one
people following were earlier first more inhabitants located headquartered created completed
creator employer not confused be also it its has have this that are on at as man men ten son sun
bed bad red dog god gold old new north south east west lake hill mount saint san port fort bar
tin tan ban bin din fin gin kin pin sin win tar ter far fir for nor tor per ran run gun pun bun
bar mar par car war ear air fair hair pair lair near dear gear tear fear bear pear wear nil mil
til sol dol pol tol ron don son mon con non bon lon van ven vin von zen den ken len pen ten mat
bat cat fat hat pat rat sat vat ram dam ham jam pam yam
""".split())


def _syllable(rng: random.Random, last: bool) -> str:
    syl = rng.choice(_ONSETS) + rng.choice(_VOWELS)
    return syl + rng.choice(_CODAS) if last else syl


def _word(rng: random.Random, syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
    n = rng.randint(*syllables)
    w = "".join(_syllable(rng, i == n - 1) for i in range(n)) + suffix
    return w[:1].upper() + w[1:]


class _Namer:
    """Hands out invented words that are unique across the whole world (case-insensitive)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set(_RESERVED)

    def fresh(self, syllables: tuple[int, int] = (2, 3), suffix: str = "",
              max_len: int = 10) -> str:
        for _ in range(10_000):
            w = _word(self.rng, syllables, suffix)
            if len(w) <= max_len and w.lower() not in self.used:
                self.used.add(w.lower())
                return w
        raise RuntimeError("name space exhausted; lower the world size")

    def variant(self, name: str) -> str | None:
        """A near-identical name (one edited ending), for the 'similarly named place' distractor."""
        stem = name.rstrip("aeiou") or name
        for _ in range(50):
            w = stem + self.rng.choice(("a", "i", "o", "el", "en", "is", "ar", "ov"))
            if w.lower() not in self.used and w != name:
                self.used.add(w.lower())
                return w
        return None


# ---------------------------------------------------------------------------------------------
# The world

_OCCUPATIONS = ("painter", "novelist", "composer", "poet", "sculptor", "physicist", "chemist",
                "architect", "engineer", "historian")
_WORK_KIND = {"painter": "painting", "novelist": "novel", "composer": "opera", "poet": "poem",
              "sculptor": "sculpture"}
_INDUSTRIES = ("shipping", "textile", "mining", "publishing", "banking", "railway", "brewing",
               "glassmaking")


def _a(noun: str) -> str:
    """The noun with its indefinite article ("an architect", "a poet")."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


@dataclass
class World:
    """Everything `make_world` generated. Plain data: the web env renders the same world as a
    site, the tokenizer builder reads `entity_names()`, `write` exports it for Search-R1."""

    seed: int
    params: dict[str, Any]
    entities: list[Entity]
    docs: list[Doc]
    tasks: dict[str, list[Task]]
    distractor_names: list[str] = field(default_factory=list)
    version: int = WORLD_VERSION

    def __post_init__(self) -> None:
        self._by_id = {e.id: e for e in self.entities}
        self._by_name = {e.name: e for e in self.entities}
        self._docs = {d.doc_id: d for d in self.docs}
        self._doc_of = {d.entity_id: d for d in self.docs if d.entity_id is not None}

    # lookups ----------------------------------------------------------------------------------
    def entity(self, entity_id: str) -> Entity:
        return self._by_id[entity_id]

    def entity_by_name(self, name: str) -> Entity:
        return self._by_name[name]

    def doc(self, doc_id: str) -> Doc:
        return self._docs[doc_id]

    def doc_of(self, entity_id: str) -> Doc:
        """The entity's own passage."""
        return self._doc_of[entity_id]

    def entity_names(self) -> list[str]:
        """Every entity name and distractor name, sorted (deterministic).

        For the tiny-model tokenizer: making each one a single token turns "copy the name into
        the search" into a one-token copy, which a tiny LM learns on CPU (REFERENCE.md).
        People's names are two words (given name + surname); surnames alone are answer aliases,
        so they are listed too.
        """
        names = {e.name for e in self.entities} | set(self.distractor_names)
        names |= {e.attributes["surname"] for e in self.entities if e.type == "person"}
        return sorted(names)

    def counts(self) -> dict[str, Any]:
        by_type: dict[str, int] = {}
        for e in self.entities:
            by_type[e.type] = by_type.get(e.type, 0) + 1
        by_kind: dict[str, int] = {}
        for split in SPLITS:
            for t in self.tasks.get(split, []):
                by_kind[t.kind] = by_kind.get(t.kind, 0) + 1
        return {
            "entities": len(self.entities),
            "entities_by_type": dict(sorted(by_type.items())),
            "docs": len(self.docs),
            "distractor_docs": sum(d.entity_id is None for d in self.docs),
            "tasks": {s: len(self.tasks.get(s, [])) for s in SPLITS},
            "tasks_by_kind": dict(sorted(by_kind.items())),
        }

    # export -----------------------------------------------------------------------------------
    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write corpus.jsonl (wiki-18 layout, title lines unquoted), {train,dev,test}.parquet
        (Search-R1 format) and world.json. Same world → byte-identical files. Returns the written paths by name."""
        from treegym.envs.data.loaders import write_search_r1_parquet

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        corpus = out / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8", newline="\n") as f:
            for d in self.docs:
                f.write(json.dumps({"id": d.doc_id, "contents": d.contents}, ensure_ascii=False))
                f.write("\n")
        paths["corpus"] = corpus
        for split in SPLITS:
            p = out / f"{split}.parquet"
            write_search_r1_parquet(self.tasks.get(split, []), p, split=split,
                                    data_source=DATA_SOURCE)
            paths[split] = p
        info = {"name": "treegym-synthetic", "version": self.version, "seed": self.seed,
                "params": self.params, "counts": self.counts()}
        meta = out / "world.json"
        meta.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        paths["world"] = meta
        return paths


DEFAULT_PARAMS: dict[str, Any] = {
    "n_people": 1500,
    "n_cities": 120,
    "n_countries": 16,
    "n_orgs": 150,
    "n_works": 500,
    "n_questions": 8000,
    "namesake_rate": 0.2,   # fraction of people with a distractor namesake (same surname)
    "village_rate": 0.3,    # fraction of cities with a similarly named distractor village
    "kind_weights": {"single": 0.25, "bridge": 0.35, "comparison": 0.15, "bridge3": 0.25},
    "split_fractions": [0.8, 0.1, 0.1],
}


def make_world(seed: int = 0, **params: Any) -> World:
    """Generate the world for `seed`. Keyword arguments override `DEFAULT_PARAMS` (use small
    sizes in tests). Deterministic: same seed and params → identical world."""
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise TypeError(f"make_world got unknown parameters {sorted(unknown)}; "
                        f"accepted: {sorted(DEFAULT_PARAMS)}")
    p = {**DEFAULT_PARAMS, **params}
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    for key in ("n_people", "n_cities", "n_countries", "n_orgs", "n_works"):
        if not isinstance(p[key], int) or p[key] < 2:
            raise ValueError(f"{key} must be an int >= 2, got {p[key]!r}")
    if p["n_countries"] > p["n_cities"]:
        raise ValueError("n_countries must not exceed n_cities (every country needs a city)")
    return _Builder(seed, p).build()


class _Builder:
    def __init__(self, seed: int, params: dict[str, Any]) -> None:
        self.seed = seed
        self.p = params
        self.rng = random.Random(seed)
        self.namer = _Namer(self.rng)
        self.entities: list[Entity] = []

    def _add(self, type_: str, name: str, attributes: dict[str, Any]) -> Entity:
        e = Entity(f"{type_[:3]}{len(self.entities):05d}", type_, name, attributes, [])
        self.entities.append(e)
        return e

    # entities ---------------------------------------------------------------------------------
    def build(self) -> World:
        rng, namer, p = self.rng, self.namer, self.p
        countries = [self._add("country", namer.fresh((2, 2), suffix="ia", max_len=11),
                               {"population_millions": rng.randint(1, 150),
                                "independence_year": rng.randint(1500, 1950)})
                     for _ in range(p["n_countries"])]
        cities = []
        pops: set[int] = set()
        for i in range(p["n_cities"]):
            pop = rng.randint(20, 5000) * 1000
            while pop in pops:  # populations are compared, so they must differ
                pop = rng.randint(20, 5000) * 1000
            pops.add(pop)
            city = self._add("city", namer.fresh((2, 2), max_len=8),
                             {"population": pop, "founding_year": rng.randint(600, 1900)})
            country = countries[i] if i < len(countries) else rng.choice(countries)
            city.relations.append(("located_in", country.id))
            cities.append(city)
        for i, country in enumerate(countries):
            country.relations.append(("capital", cities[i].id))
        orgs = []
        for _ in range(p["n_orgs"]):
            org = self._add("organisation", namer.fresh((2, 2), max_len=8),
                            {"founding_year": rng.randint(1650, 2010),
                             "industry": rng.choice(_INDUSTRIES)})
            org.relations.append(("headquartered_in", rng.choice(cities).id))
            orgs.append(org)
        orgs_by_year = sorted(orgs, key=lambda o: (o.attributes["founding_year"], o.id))
        org_years = [o.attributes["founding_year"] for o in orgs_by_year]

        given_pool = [namer.fresh((2, 2), max_len=8) for _ in range(max(40, p["n_people"] // 5))]
        people: list[Entity] = []
        full_names: set[str] = set()
        surname_count: dict[str, int] = {}
        for _ in range(p["n_people"]):
            # A few real people share a surname (like real families), so a surname is not a key.
            if people and rng.random() < 0.1:
                surname = rng.choice(people).attributes["surname"]
            else:
                surname = namer.fresh((2, 2), max_len=8)
            given = rng.choice(given_pool)
            while f"{given} {surname}" in full_names:
                given = rng.choice(given_pool)
            full_names.add(f"{given} {surname}")
            surname_count[surname] = surname_count.get(surname, 0) + 1
            birth = rng.randint(1700, 1995)
            person = self._add("person", f"{given} {surname}",
                               {"given_name": given, "surname": surname, "birth_year": birth,
                                "occupation": rng.choice(_OCCUPATIONS)})
            person.relations.append(("born_in", rng.choice(cities).id))
            # An employer founded before the person turned 40, when there is one.
            eligible = orgs_by_year[:bisect.bisect_right(org_years, birth + 40)]
            person.relations.append(("works_for", rng.choice(eligible or orgs_by_year[:1]).id))
            people.append(person)

        creators = [q for q in people if q.attributes["occupation"] in _WORK_KIND]
        works = []
        for _ in range(p["n_works"] if creators else 0):
            creator = rng.choice(creators)
            work = self._add("work", namer.fresh((2, 2), max_len=8),
                             {"kind": _WORK_KIND[creator.attributes["occupation"]],
                              "year": creator.attributes["birth_year"] + rng.randint(20, 60)})
            work.relations.append(("created_by", creator.id))
            creator.relations.append(("created", work.id))
            works.append(work)

        self.by_id = {e.id: e for e in self.entities}
        self.people, self.cities, self.orgs, self.works = people, cities, orgs, works

        # Distractor namesakes count as surname holders too: a surname alias is only given
        # when the surname names exactly one person anywhere in the corpus.
        namesakes = self._namesakes(given_pool, full_names, surname_count)
        self.surname_count = surname_count
        docs_raw = [(self._entity_text(e), e) for e in self.entities]
        distractors, distractor_names = self._distractors(namesakes)

        # Shuffle entity passages and distractors together so a doc id reveals nothing.
        order = [(title_text, e.id) for title_text, e in docs_raw] + [(tt, None) for tt in distractors]
        rng.shuffle(order)
        docs = [Doc(str(i), title, text, eid) for i, ((title, text), eid) in enumerate(order)]
        self.doc_of = {d.entity_id: d for d in docs if d.entity_id is not None}

        tasks = self._questions()
        params = json.loads(json.dumps(self.p))  # a plain-JSON copy for world.json
        return World(self.seed, params, self.entities, docs, tasks, distractor_names)

    # passages ---------------------------------------------------------------------------------
    def _name(self, entity_id: str) -> str:
        return self.by_id[entity_id].name

    def _entity_text(self, e: Entity) -> tuple[str, str]:
        a, n = e.attributes, e.name
        if e.type == "person":
            text = (f"{n} was born in {a['birth_year']} in {self._name(e.rel('born_in'))}. "
                    f"{n} is {_a(a['occupation'])} who works for {self._name(e.rel('works_for'))}.")
            created = [t for r, t in e.relations if r == "created"]
            if created:
                names = ", ".join(self._name(w) for w in created)
                text += f" {a['surname']} is known for {names}."
        elif e.type == "city":
            country = self._name(e.rel("located_in"))
            text = (f"{n} is a city in {country}. {n} was founded in {a['founding_year']} and has "
                    f"a population of {a['population']:,}.")
        elif e.type == "country":
            text = (f"{n} (officially the Republic of {n}) is a country with a population of "
                    f"{a['population_millions']} million. {n} became independent in "
                    f"{a['independence_year']}. Its capital is {self._name(e.rel('capital'))}.")
        elif e.type == "organisation":
            text = (f"{n} is {_a(a['industry'])} company founded in {a['founding_year']}. "
                    f"{n} is headquartered in {self._name(e.rel('headquartered_in'))}.")
        elif e.type == "work":
            creator = self.by_id[e.rel("created_by")]
            text = (f"{n} is {_a(a['kind'])} by {creator.name}, completed in {a['year']}. "
                    f"{n} is one of the best-known works of {creator.attributes['surname']}.")
        else:  # pragma: no cover - all types are listed above
            raise AssertionError(e.type)
        return n, text

    def _namesakes(self, given_pool: list[str], full_names: set[str],
                   surname_count: dict[str, int]) -> list[tuple[str, Entity]]:
        out = []
        for person in self.people:
            if self.rng.random() >= self.p["namesake_rate"]:
                continue
            surname = person.attributes["surname"]
            given = self.rng.choice(given_pool)
            if f"{given} {surname}" in full_names:
                continue
            full_names.add(f"{given} {surname}")
            surname_count[surname] += 1
            out.append((f"{given} {surname}", person))
        return out

    def _distractors(self, namesakes: list[tuple[str, Entity]]) -> tuple[list[tuple[str, str]], list[str]]:
        rng, namer = self.rng, self.namer
        docs: list[tuple[str, str]] = []
        names: list[str] = []
        # 1. Namesakes: a different person sharing the surname (and mentioning the real one).
        for name, person in namesakes:
            text = (f"{name} was {_a(rng.choice(_OCCUPATIONS))} from {rng.choice(self.cities).name}, "
                    f"born in {rng.randint(1650, 1995)}. {name} is not to be confused with "
                    f"{person.name}.")
            docs.append((name, text))
            names.append(name)
        # 2. Villages whose names differ from a city's by one ending, in any country.
        countries = [e for e in self.entities if e.type == "country"]
        for city in self.cities:
            if rng.random() >= self.p["village_rate"]:
                continue
            v = namer.variant(city.name)
            if v is None:
                continue
            country = rng.choice(countries)
            text = (f"{v} is a small village in {country.name}. {v} lies near the river "
                    f"{namer.fresh((2, 2))}.")
            docs.append((v, text))
            names.append(v)
        # 3. Festivals that mention a city and two people in passing.
        for _ in range(max(1, len(self.people) // 10)):
            fest = namer.fresh((2, 2))
            a, b = rng.sample(self.people, 2)
            text = (f"The {fest} Festival is held every year in {rng.choice(self.cities).name}. "
                    f"In {rng.randint(1850, 2020)}, {a.name} and {b.name} attended the festival.")
            docs.append((f"{fest} Festival", text))
            names.append(fest)
        # 4. Birth lists: true facts shared by several people (an attribute shared, not a key).
        by_year: dict[int, list[Entity]] = {}
        for person in self.people:
            by_year.setdefault(person.attributes["birth_year"], []).append(person)
        for year in sorted(by_year):
            group = by_year[year]
            if len(group) >= 3:
                listed = ", ".join(q.name for q in group[:6])
                docs.append((f"Births in {year}",
                             f"The following people were born in {year}: {listed}."))
        return docs, names

    # questions --------------------------------------------------------------------------------
    def _person_answers(self, person: Entity) -> tuple[str, ...]:
        """Full name, plus the surname alone when no one else in the corpus bears it."""
        surname = person.attributes["surname"]
        if self.surname_count.get(surname, 0) == 1:
            return (person.name, surname)
        return (person.name,)

    def _answers(self, e: Entity) -> tuple[str, ...]:
        if e.type == "person":
            return self._person_answers(e)
        if e.type == "country":
            return (e.name, f"Republic of {e.name}")
        return (e.name,)

    def _task(self, template: str, kind: str, question: str, answers: tuple[str, ...],
              hops: Sequence[Entity]) -> tuple[str, dict[str, Any]]:
        return template, {
            "kind": kind, "question": question, "answers": answers,
            "supporting_ids": tuple(self.doc_of[h.id].doc_id for h in hops),
            "meta": {"template": template, "hops": [h.name for h in hops],
                     "hop_entity_ids": [h.id for h in hops]},
        }

    def _sample(self, kind: str) -> tuple[str, dict[str, Any]] | None:
        rng, E = self.rng, self.by_id
        if kind != "comparison":
            templates = {
                "single": ("born_city", "born_year", "employer", "creator", "city_country",
                           "org_founded"),
                "bridge": ("person_country", "employer_city", "creator_city", "creator_year"),
                "bridge3": ("creator_country", "employer_country"),
            }[kind]
            t = rng.choice(templates)
            if t.startswith("creator") and not self.works:
                return None
            person = rng.choice(self.people)
            city = E[person.rel("born_in")]
            org = E[person.rel("works_for")]
            work = rng.choice(self.works) if self.works else None
            if t == "born_city":
                return self._task(t, kind, f"In which city was {person.name} born?",
                                  self._answers(city), [person])
            if t == "born_year":
                return self._task(t, kind, f"In which year was {person.name} born?",
                                  (str(person.attributes["birth_year"]),), [person])
            if t == "employer":
                return self._task(t, kind, f"Which organisation does {person.name} work for?",
                                  self._answers(org), [person])
            if t == "city_country":
                c = rng.choice(self.cities)
                return self._task(t, kind, f"In which country is {c.name} located?",
                                  self._answers(E[c.rel("located_in")]), [c])
            if t == "org_founded":
                o = rng.choice(self.orgs)
                return self._task(t, kind, f"In which year was {o.name} founded?",
                                  (str(o.attributes["founding_year"]),), [o])
            if t == "person_country":
                return self._task(t, kind, f"In which country was {person.name} born?",
                                  self._answers(E[city.rel("located_in")]), [person, city])
            if t == "employer_city":
                hq = E[org.rel("headquartered_in")]
                return self._task(t, kind,
                                  f"In which city is the employer of {person.name} headquartered?",
                                  self._answers(hq), [person, org])
            if t == "employer_country":
                hq = E[org.rel("headquartered_in")]
                return self._task(t, kind,
                                  f"In which country is the employer of {person.name} headquartered?",
                                  self._answers(E[hq.rel("located_in")]), [person, org, hq])
            assert work is not None
            creator = E[work.rel("created_by")]
            ccity = E[creator.rel("born_in")]
            if t == "creator":
                return self._task(t, kind, f"Who created {work.name}?",
                                  self._answers(creator), [work])
            if t == "creator_city":
                return self._task(t, kind, f"In which city was the creator of {work.name} born?",
                                  self._answers(ccity), [work, creator])
            if t == "creator_year":
                return self._task(t, kind, f"In which year was the creator of {work.name} born?",
                                  (str(creator.attributes["birth_year"]),), [work, creator])
            if t == "creator_country":
                return self._task(t, kind,
                                  f"In which country was the creator of {work.name} born?",
                                  self._answers(E[ccity.rel("located_in")]), [work, creator, ccity])
            raise AssertionError(t)  # pragma: no cover
        # comparison
        t = rng.choice(("born_earlier", "founded_first", "more_inhabitants"))
        pool, attr, question, smaller_wins = {
            "born_earlier": (self.people, "birth_year", "Who was born earlier, {} or {}?", True),
            "founded_first": (self.orgs, "founding_year", "Which was founded first, {} or {}?", True),
            "more_inhabitants": (self.cities, "population",
                                 "Which city has more inhabitants, {} or {}?", False),
        }[t]
        x, y = rng.sample(pool, 2)
        if x.attributes[attr] == y.attributes[attr]:
            return None
        pick = min if smaller_wins else max
        winner = pick((x, y), key=lambda e: e.attributes[attr])
        answers = self._answers(winner)
        if winner.type == "person" and x.attributes["surname"] == y.attributes["surname"]:
            answers = (winner.name,)  # the surname alone would name both
        return self._task(t, "comparison", question.format(x.name, y.name), answers, [x, y])

    def _questions(self) -> dict[str, list[Task]]:
        rng, p = self.rng, self.p
        weights = p["kind_weights"]
        kinds = [k for k in KINDS if weights.get(k, 0) > 0]
        if not kinds:
            raise ValueError(f"kind_weights must give some kind a positive weight: {weights}")
        target = int(p["n_questions"])
        seen: set[tuple[str, ...]] = set()
        records: list[dict[str, Any]] = []
        attempts = 0
        while len(records) < target and attempts < target * 20:
            attempts += 1
            kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
            sampled = self._sample(kind)
            if sampled is None:
                continue
            template, rec = sampled
            # "X or Y" and "Y or X" are the same question: dedupe on the unordered hop set.
            ids = rec["meta"]["hop_entity_ids"]
            key = (template, *(sorted(ids) if rec["kind"] == "comparison" else ids))
            if key in seen:
                continue
            seen.add(key)
            records.append(rec)
        rng.shuffle(records)
        fr = p["split_fractions"]
        n = len(records)
        n_train = int(round(n * fr[0] / sum(fr)))
        n_dev = int(round(n * fr[1] / sum(fr)))
        bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev),
                  "test": (n_train + n_dev, n)}
        tasks: dict[str, list[Task]] = {}
        for split, (lo, hi) in bounds.items():
            tasks[split] = [
                Task(id=f"s{self.seed}-{split}-{i:05d}", question=r["question"],
                     answers=r["answers"], supporting_ids=r["supporting_ids"], kind=r["kind"],
                     meta=r["meta"])
                for i, r in enumerate(records[lo:hi])
            ]
        return tasks


# ---------------------------------------------------------------------------------------------
# Cached worlds and the Dataset view

_WORLD_CACHE: dict[tuple[int, str], World] = {}


def _cached_world(seed: int, params: dict[str, Any]) -> World:
    """One World per (seed, params) per process: envs are created many times (vector envs,
    forks in other processes) and must not regenerate or diverge."""
    key = (seed, json.dumps(params, sort_keys=True))
    if key not in _WORLD_CACHE:
        _WORLD_CACHE[key] = make_world(seed, **params)
    return _WORLD_CACHE[key]


def world_dir(seed: int = 0, **params: Any) -> Path:
    """Where `synthetic_dataset` keeps the files of this world under `treegym_home()`."""
    name = f"synthetic-v{WORLD_VERSION}-seed{seed}"
    if params:
        import hashlib

        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        name += f"-{digest}"
    return treegym_home() / "worlds" / name


def ensure_world_files(world: World, target: Path) -> Path:
    """Write `world` to `target` once. Written into a temp dir next to it and renamed, so a
    reader never sees a half-written world and two racing processes both end up with one
    complete copy (the loser of the rename discards its own)."""
    if (target / "world.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        world.write(tmp)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if not (target / "world.json").exists():
                raise OSError(f"cannot store the world at {target} ({exc.strerror}); if that "
                              f"directory is a leftover without world.json, delete it") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_dataset(seed: int = 0, kinds: Iterable[str] | None = None, **params: Any):
    """The synthetic world as a `Dataset`: files written once under
    `$TREEGYM_HOME/worlds/synthetic-v{WORLD_VERSION}-seed{seed}/` (corpus_path points there, so
    retrievers can index it), tasks filtered to `kinds` (default: all), `world` attached."""
    from treegym.envs.data.dataset import Dataset

    selected = tuple(KINDS if kinds is None else kinds)
    bad = [k for k in selected if k not in KINDS]
    if bad or not selected:
        raise ValueError(f"unknown task kinds {bad}; accepted: {list(KINDS)}")
    world = _cached_world(seed, params)
    target = ensure_world_files(world, world_dir(seed, **params))
    splits = {s: tuple(t for t in world.tasks[s] if t.kind in selected) for s in SPLITS}
    label = "" if kinds is None else "[" + ",".join(selected) + "]"
    return Dataset(name=f"synthetic-seed{seed}{label}", splits=splits,
                   corpus_path=target / "corpus.jsonl", world=world)


# ---------------------------------------------------------------------------------------------
# `treegym world`


def cli_main(argv: Sequence[str] | None = None,
             site: Callable[[World, Path], str] | None = None) -> int:
    """`treegym world --seed 0 --out DIR`: write the world's corpus, QA parquet and world.json.

    ``site(world, dir)`` renders the world as a website and returns a line for the report; the
    command passes `envs.site.write_world_site` (the data layer never imports the env modules
    built on it), which adds the ``--site/--no-site`` flag."""
    parser = argparse.ArgumentParser(
        prog="treegym world",
        description="Generate the deterministic synthetic world: DIR/corpus.jsonl (wiki-18 "
                    "format), DIR/{train,dev,test}.parquet (Search-R1 format), DIR/world.json.")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    if site is not None:
        parser.add_argument("--site", action=argparse.BooleanOptionalAction, default=True,
                            help="also render the world as an offline website in DIR/site/ for "
                                 "TreeWebAgent-v0 (default: yes)")
    for key in ("n_people", "n_cities", "n_countries", "n_orgs", "n_works", "n_questions"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"default {DEFAULT_PARAMS[key]}")
    args = parser.parse_args(list(argv) if argv is not None else None)
    overrides = {k: getattr(args, k) for k in ("n_people", "n_cities", "n_countries", "n_orgs",
                                                "n_works", "n_questions")
                 if getattr(args, k) is not None}
    t0 = time.perf_counter()
    try:
        world = make_world(args.seed, **overrides)
    except (TypeError, ValueError) as exc:
        print(f"treegym world: {exc}", file=sys.stderr)
        return 2
    paths = world.write(args.out)
    site_note = site(world, args.out / "site") if site is not None and args.site else ""
    dt = time.perf_counter() - t0
    c = world.counts()
    print(f"world seed={args.seed} version={WORLD_VERSION}: {c['entities']} entities, "
          f"{c['docs']} docs ({c['distractor_docs']} distractors), tasks "
          + ", ".join(f"{s}={n}" for s, n in c["tasks"].items()) + f" in {dt:.2f}s")
    for name, path in paths.items():
        print(f"  {name:<7} {path}  ({path.stat().st_size:,} bytes)")
    if site_note:
        print(site_note)
    return 0


__all__ = ["WORLD_VERSION", "KINDS", "SPLITS", "DEFAULT_PARAMS", "Entity", "Doc", "World",
           "make_world", "world_dir", "ensure_world_files", "synthetic_dataset", "cli_main"]
