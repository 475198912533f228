"""A local website as text: pages, numbered links, URL resolution and the page-search corpus.

Why a site and not just a corpus: the Tree-GRPO web-agent setting (GAIA, WebWalkerQA) reads pages
and follows links; answers sit one or more clicks away from what a search snippet shows. `Site`
gives that offline: every page is held in memory as text whose links are written as
`[anchor][n]` (n = the page's link number, what `<click>n</click>` takes), so a step is a
dictionary lookup and never touches the file system.

Two sources:
- `Site.from_world(world)`: the synthetic world rendered as a wiki (home page, one category list
  per entity type, one page per entity, one page per distractor article). A page's search snippet
  is a fact-free summary, so answers come from visiting pages, not from the result list.
- `Site.from_dir(path)`: any folder of HTML files (e.g. a saved mirror), converted with html2text.
  Everything is read once at load time, inside the folder only (symlinks that leave it are
  refused); files that cannot be read or converted are skipped and listed in `Site.errors`.

`Site.write_html(dir)` writes a site as one HTML file per page (what `treegym world` puts in
`DIR/site/`); `Site.from_dir` reads that folder back into the same URLs and links.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote, unquote, urlsplit

from treegym.envs.data import synthetic
from treegym.envs.data.synthetic import World

HOME_URL = "/index.html"
MAX_URL_CHARS = 2048
MAX_HTML_BYTES = 5_000_000
SNIPPET_CHARS = 160
CATEGORY_PAGE_SIZE = 50

# A link in page text: "[anchor][n]". Anchors never contain brackets or newlines.
LINK_RE = re.compile(r"\[([^\[\]\n]*)\]\[(\d+)\]")


class PageError(ValueError):
    """A URL or link that does not lead to a page of this site; the message is shown to the agent."""


@dataclass(frozen=True)
class Page:
    """One page as the agent reads it.

    `text` writes link i (1-based) as `[anchor][i]`; `links[i-1]` is its site URL. `snippet` is
    what search results show. `doc_ids` are the corpus doc ids this page renders (so tasks whose
    `supporting_ids` are corpus ids can be mapped to pages).
    """

    url: str
    title: str
    text: str
    links: tuple[str, ...] = ()
    snippet: str = ""
    doc_ids: tuple[str, ...] = ()

    @property
    def plain_text(self) -> str:
        """The text without link numbers (for the search index and snippets)."""
        return LINK_RE.sub(r"\1", self.text)


@dataclass(frozen=True)
class LoadError:
    path: str
    reason: str


@dataclass
class Site:
    """An immutable-by-convention collection of pages keyed by URL path (e.g. "/wiki/lyon.html").

    Shared read-only by every fork of an env. `hosts` are the host names treated as this site
    when a URL is absolute (`http://<host>/path`); anything else is off-site.
    """

    pages: dict[str, Page]
    name: str = "site"
    home: str = HOME_URL
    hosts: tuple[str, ...] = ("site.local",)
    errors: tuple[LoadError, ...] = ()
    _by_doc: dict[str, str] = field(default_factory=dict, repr=False, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pages:
            raise ValueError(f"site {self.name!r} has no pages")
        if self.home not in self.pages:
            self.home = min(self.pages)
        self._by_doc = {d: url for url, page in sorted(self.pages.items()) for d in page.doc_ids}
        self._chunks = lru_cache(maxsize=4096)(self._split)

    def __getstate__(self) -> dict[str, Any]:
        # The per-process chunk cache is a bound lru_cache (not picklable); rebuild it on load.
        return {k: v for k, v in vars(self).items() if k != "_chunks"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._chunks = lru_cache(maxsize=4096)(self._split)

    def __len__(self) -> int:
        return len(self.pages)

    def __contains__(self, url: object) -> bool:
        return url in self.pages

    # ------------------------------------------------------------------------------------------
    # URLs

    def resolve(self, url: str, base: str | None = None) -> str:
        """The canonical URL of the page `url` names, relative to page `base`; raises PageError.

        Pure string work plus a dict lookup: no file is ever opened here, so no URL, however
        crafted (`../../etc/passwd`, `file:///`, percent-encoded dots), can read outside the site.
        """
        if not isinstance(url, str):
            raise PageError("malformed URL: not a string")
        url = url.strip()
        if not url:
            raise PageError("malformed URL: empty")
        if len(url) > MAX_URL_CHARS:
            raise PageError(f"malformed URL: longer than {MAX_URL_CHARS} characters")
        if "\\" in url or not (url.isascii() and url.isprintable()) and any(
                unicodedata.category(c)[0] in "CZ" and c != " " for c in url):
            raise PageError("malformed URL: control, separator or backslash characters")
        try:
            parts = urlsplit(url)
        except ValueError as err:
            raise PageError(f"malformed URL: {err}") from None
        scheme = parts.scheme.lower()
        if scheme == "file":
            raise PageError("file:// URLs are not allowed; only pages of this site can be visited")
        if scheme and scheme not in ("http", "https"):
            raise PageError(f"unsupported URL scheme {scheme!r}; only pages of this site can be visited")
        if parts.netloc or scheme:
            try:
                host = (parts.hostname or "").lower()
            except ValueError:
                raise PageError("malformed URL: bad host") from None
            if host not in self.hosts:
                raise PageError(f"off-site URL (host {host or '?'!r}); only pages of this site "
                                f"({', '.join(self.hosts)}) can be visited")
        path = unquote(parts.path)
        if "\x00" in path or "\\" in path:
            raise PageError("malformed URL: bad characters in path")
        if not path.startswith("/"):
            base_dir = posixpath.dirname(base) if base else "/"
            path = posixpath.join(base_dir, path) if path else (base or self.home)
        depth = 0
        for segment in path.split("/"):
            if segment == "..":
                depth -= 1
                if depth < 0:
                    raise PageError("path leaves the site (too many '..')")
            elif segment not in ("", "."):
                depth += 1
        norm = posixpath.normpath(path)
        norm = "/" + norm.lstrip("/") if norm != "/" else "/"
        for candidate in _candidates(norm, trailing_slash=path.endswith("/")):
            if candidate in self.pages:
                return candidate
        raise PageError(f"page not found: {norm}")

    def get(self, url: str, base: str | None = None) -> Page:
        return self.pages[self.resolve(url, base)]

    def link(self, url: str, number: Any) -> str:
        """The URL behind link `number` on page `url` (1-based); raises PageError."""
        page = self.pages[url]
        try:
            n = int(str(number).strip())
        except ValueError:
            raise PageError(f"not a link number: {str(number)[:40]!r}") from None
        if not 1 <= n <= len(page.links):
            raise PageError(f"this page has no link [{n}] (links 1-{len(page.links)})"
                            if page.links else "this page has no links")
        return page.links[n - 1]

    def url_for_doc(self, doc_id: str) -> str:
        """The page that renders corpus doc `doc_id` (tasks' supporting ids are corpus doc ids)."""
        try:
            return self._by_doc[doc_id]
        except KeyError:
            raise KeyError(f"no page of site {self.name!r} renders doc {doc_id!r}") from None

    # ------------------------------------------------------------------------------------------
    # Reading

    def part(self, url: str, index: int, max_chars: int) -> tuple[str, int]:
        """Chunk `index` (0-based) of page `url` cut to `max_chars`, and the number of chunks."""
        chunks = self._chunks(url, max_chars)
        return chunks[min(max(index, 0), len(chunks) - 1)], len(chunks)

    def _split(self, url: str, max_chars: int) -> tuple[str, ...]:
        """Split on line boundaries (hard-cut over-long lines) so links are rarely cut in two."""
        text, limit = self.pages[url].text.strip("\n"), max(16, max_chars)
        chunks: list[str] = []
        current = ""
        for line in text.split("\n"):
            while len(line) > limit:
                if current:
                    chunks.append(current)
                    current = ""
                chunks.append(line[:limit])
                line = line[limit:]
            candidate = f"{current}\n{line}" if current else line
            if len(candidate) > limit and current:
                chunks.append(current)
                current = line
            else:
                current = candidate
        if current or not chunks:
            chunks.append(current)
        return tuple(chunks)

    # ------------------------------------------------------------------------------------------
    # Search corpus and persistence

    def corpus_rows(self) -> Iterator[tuple[str, str, str]]:
        """(doc_id=url, title, plain text) per page, in URL order: what the search index holds."""
        for url in sorted(self.pages):
            page = self.pages[url]
            yield url, page.title, " ".join(page.plain_text.split())

    def fingerprint(self) -> str:
        """sha256 of every page's URL, title, text and links: names the cached search corpus."""
        cached = vars(self).get("_fingerprint")
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        for url in sorted(self.pages):
            p = self.pages[url]
            for piece in (url, p.title, p.text, "\x1f".join(p.links), p.snippet):
                digest.update(piece.encode("utf-8", "surrogatepass"))
                digest.update(b"\x1e")
        self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def write_corpus(self, path: str | os.PathLike) -> Path:
        """The pages as a wiki-18 jsonl corpus (`{"id": url, "contents": '"Title"\\ntext'}`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for url, title, text in self.corpus_rows():
                f.write(json.dumps({"id": url, "contents": f'"{title}"\n{text}'},
                                   ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path

    def write_html(self, out_dir: str | os.PathLike) -> Path:
        """One HTML file per page under `out_dir` (open `index.html` in a browser).

        Links become relative hrefs, so the folder works from any location and `from_dir`
        reads it back with the same URLs and link lists.
        """
        out = Path(out_dir)
        for url, page in sorted(self.pages.items()):
            target = out / url.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_page_html(page), encoding="utf-8")
        return out

    # ------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_dir(cls, root: str | os.PathLike, *, name: str | None = None,
                 hosts: Sequence[str] = ("site.local",)) -> Site:
        """Load every `.html`/`.htm` file under `root` (the folder is read once, here).

        Files whose real path leaves `root` (symlinks), that cannot be read or decoded, are too
        large or look binary are skipped and listed in `errors`; broken markup still loads as
        whatever html2text makes of it.
        """
        root_path = Path(root)
        if not root_path.is_dir():
            raise ValueError(f"site folder {str(root)!r} does not exist or is not a directory")
        real_root = root_path.resolve()
        raw: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {}  # url -> _convert(...)
        errors: list[LoadError] = []
        for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
            dirnames.sort()
            for fname in sorted(filenames):
                if not fname.lower().endswith((".html", ".htm")):
                    continue
                path = Path(dirpath) / fname
                rel = path.relative_to(real_root).as_posix()
                try:
                    real = path.resolve(strict=True)
                except (OSError, RuntimeError) as err:
                    errors.append(LoadError(rel, f"cannot resolve: {err}"))
                    continue
                if not real.is_relative_to(real_root):
                    errors.append(LoadError(rel, "links outside the site folder; skipped"))
                    continue
                try:
                    title, markdown, description, doc_ids = _convert(_read_html(real))
                except (OSError, ValueError, RecursionError, AssertionError) as err:
                    errors.append(LoadError(rel, f"unreadable: {err}"))
                    continue
                raw["/" + rel] = (title or posixpath.splitext(fname)[0], markdown, description,
                                  doc_ids)
        if not raw:
            raise ValueError(f"site folder {str(root)!r} has no readable .html files"
                             + (f" ({len(errors)} unreadable)" if errors else ""))
        site = cls(pages={u: Page(u, r[0], "") for u, r in raw.items()},
                   name=name or root_path.name, hosts=tuple(h.lower() for h in hosts))
        pages = {url: _number_links(site, url, *r) for url, r in raw.items()}
        return cls(pages=pages, name=site.name, hosts=site.hosts, errors=tuple(errors))

    @classmethod
    def from_world(cls, world: World, *, name: str = "synthetic") -> Site:
        """Render the synthetic world (see module docstring). Deterministic for a given world."""
        return _WorldRenderer(world).site(name)


# ----------------------------------------------------------------------------------------------
# URL helpers


def _candidates(norm: str, *, trailing_slash: bool) -> Iterator[str]:
    if trailing_slash or norm == "/":
        base = norm.rstrip("/")
        yield f"{base}/index.html"
        yield f"{base}/index.htm"
        return
    yield norm
    if not norm.lower().endswith((".html", ".htm")):
        yield norm + ".html"
        yield norm + "/index.html"


def _relative_href(from_url: str, to_url: str) -> str:
    rel = posixpath.relpath(to_url, posixpath.dirname(from_url) or "/")
    return quote(rel, safe="/._-~")


# ----------------------------------------------------------------------------------------------
# HTML → text


_TITLE_RE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_A_OPEN_RE = re.compile(r"<a\b", re.IGNORECASE)
_A_CLOSE_RE = re.compile(r"</a\s*>", re.IGNORECASE)
_META_RE = re.compile(r"<meta\b[^>]*>", re.IGNORECASE)
_ATTR_RE = re.compile(r"""([\w-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_REF_RE = re.compile(r"^ {3}\[(\d+)\]: (.*)$")
_ITEM_RE = re.compile(r"^  \s*(?:[-*+]|\d+\.) ")
_REF_MARK_RE = re.compile(r"\]\[(\d+)\]")


def _read_html(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_HTML_BYTES:
        raise ValueError(f"{size} bytes is over the {MAX_HTML_BYTES}-byte limit")
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise ValueError("looks binary (NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _meta(source: str, name: str) -> str | None:
    """The content of `<meta name=NAME content=...>` (either attribute order), unescaped."""
    for tag in _META_RE.findall(source):
        attrs = dict((k.lower(), html.unescape(v2 or v1)) for k, v1, v2 in _ATTR_RE.findall(tag))
        if attrs.get("name", "").lower() == name:
            return " ".join(attrs.get("content", "").split())
    return None


def _convert(source: str) -> tuple[str, str, str | None, tuple[str, ...]]:
    """(title, markdown with reference-style links, description, treegym doc ids) of a document."""
    import html2text  # the `web` extra; imported lazily so the QA env does not need it

    match = _TITLE_RE.search(source)
    title = " ".join(html.unescape(match.group(1)).split()) if match else ""
    conv = html2text.HTML2Text()
    conv.body_width = 0
    conv.inline_links = False
    conv.ignore_images = True
    conv.ignore_emphasis = True
    conv.ul_item_mark = "-"
    conv.skip_internal_links = True
    # html2text drops a link whose <a> is never closed; close dangling anchors at the end.
    missing = len(_A_OPEN_RE.findall(source)) - len(_A_CLOSE_RE.findall(source))
    markdown = conv.handle(source + "</a>" * max(0, min(missing, 1000)))
    if not title:
        heading = re.search(r"^#+ (.+)$", markdown, re.MULTILINE)
        title = heading.group(1).strip() if heading else ""
    doc_ids = tuple((_meta(source, "treegym-doc-ids") or "").split())
    return title[:200], markdown, _meta(source, "description"), doc_ids


def _number_links(site: Site, url: str, title: str, markdown: str, description: str | None = None,
                  doc_ids: tuple[str, ...] = ()) -> Page:
    """Turn html2text's `[a][k]` + `[k]: href` into this site's `[a][n]` over on-site links only.

    Off-site and broken links lose their brackets (their anchor text stays); links to the same
    page share one number.
    """
    refs: dict[str, str] = {}
    body: list[str] = []
    for line in markdown.split("\n"):
        m = _REF_RE.match(line)
        if m:
            href = m.group(2).strip()
            if href.endswith(")") and " (" in href:  # html2text appends ` (title)`
                href = href.rsplit(" (", 1)[0]
            refs[m.group(1)] = href
        else:
            # html2text indents list items by two spaces per level; top-level items start at 0.
            body.append(line[2:] if _ITEM_RE.match(line) else line)
    text = "\n".join(body)
    numbers: dict[str, int] = {}
    links: list[str] = []
    out: list[str] = []
    pos = 0
    for m in _REF_MARK_RE.finditer(text):
        href = refs.get(m.group(1))
        start = _open_bracket(text, m.start(), pos)
        if href is None or start is None:
            continue
        out.append(text[pos:start])
        anchor = " ".join(text[start + 1:m.start()].replace("[", "(").replace("]", ")").split())
        try:
            target = site.resolve(href, base=url)
        except PageError:
            out.append(anchor)
        else:
            if target not in numbers:
                links.append(target)
                numbers[target] = len(links)
            out.append(f"[{anchor}][{numbers[target]}]")
        pos = m.end()
    out.append(text[pos:])
    text = re.sub(r"\n{3,}", "\n\n", "".join(out)).strip()
    plain = LINK_RE.sub(r"\1", text)
    snippet = " ".join(re.sub(r"^#+ .*$", "", plain, count=1, flags=re.MULTILINE).split())
    if description is not None:
        snippet = description
    return Page(url, title, text, tuple(links), _shorten(snippet, SNIPPET_CHARS), doc_ids)


def _open_bracket(text: str, close: int, floor: int) -> int | None:
    """Index of the `[` that opens the anchor ending at `close`, matching nested brackets."""
    depth = 0
    for i in range(close - 1, floor - 1, -1):
        ch = text[i]
        if ch == "]":
            depth += 1
        elif ch == "[":
            if depth == 0:
                return i
            depth -= 1
        elif ch == "\n" and text[i - 1:i] == "\n":
            return None  # anchors do not span paragraphs
    return None


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return (cut or text[:limit]) + " ..."


def _page_html(page: Page) -> str:
    """A small, valid HTML document for a page whose text uses `# ` headings and `- ` bullets."""
    def inline(line: str) -> str:
        out, pos = [], 0
        for m in LINK_RE.finditer(line):
            out.append(html.escape(line[pos:m.start()], quote=False))
            n = int(m.group(2))
            if 1 <= n <= len(page.links):
                href = _relative_href(page.url, page.links[n - 1])
                out.append(f'<a href="{html.escape(href)}">{html.escape(m.group(1), quote=False)}</a>')
            else:
                out.append(html.escape(m.group(0), quote=False))
            pos = m.end()
        out.append(html.escape(line[pos:], quote=False))
        return "".join(out)

    body: list[str] = []
    in_list = False
    for line in page.text.split("\n"):
        bullet = line.startswith("- ")
        if in_list and not bullet:
            body.append("</ul>")
            in_list = False
        heading = re.match(r"^(#{1,6}) (.*)$", line)
        if heading:
            level = len(heading.group(1))
            body.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif bullet:
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    if in_list:
        body.append("</ul>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(page.title, quote=False)}</title>"
            f"<meta name=\"description\" content=\"{html.escape(page.snippet)}\">"
            + (f"<meta name=\"treegym-doc-ids\" content=\"{html.escape(' '.join(page.doc_ids))}\">"
               if page.doc_ids else "")
            + "</head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------
# World → pages


def _slug(text: str) -> str:
    ascii_ = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "_", ascii_.lower()).strip("_") or "page"


def _clean(text: Any) -> str:
    """One line of text safe inside `[anchor]` markup."""
    return " ".join(str(text).replace("[", "(").replace("]", ")").split())


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)


class _PageBuilder:
    """Accumulates one page's lines and numbers its links (same target → same number)."""

    def __init__(self, url: str, title: str):
        self.url, self.title = url, title
        self.lines: list[str] = []
        self.links: list[str] = []
        self._numbers: dict[str, int] = {}

    def link(self, anchor: str, target: str) -> str:
        if target not in self._numbers:
            self.links.append(target)
            self._numbers[target] = len(self.links)
        return f"[{_clean(anchor)}][{self._numbers[target]}]"

    def page(self, snippet: str, doc_ids: Iterable[str] = ()) -> Page:
        return Page(self.url, self.title, "\n".join(self.lines).strip(), tuple(self.links),
                    snippet, tuple(doc_ids))


def write_world_site(world: World, out: Path) -> str:
    """Render `world` as a site into the folder `out` (one HTML file per page); a report line.

    Written in place (not via a temp dir): a re-run rewrites the same bytes."""
    site = Site.from_world(world)
    site.write_html(out)
    return f"  site    {out}/  ({len(site)} pages)"


def world_cli_main(argv: Sequence[str] | None = None) -> int:
    """`treegym world`: the data layer writes the world, this side renders its site (`--site`)."""
    return synthetic.cli_main(argv, site=write_world_site)


class _WorldRenderer:
    """Lays a World out as a wiki.

    Entity page: a one-line summary (also the search snippet; it names no attribute or related
    entity), the entity's passage, an attribute list, and the relations as links to the related
    entities' pages. So a bridge question needs the first entity's page (for the link) and the
    linked page (for the fact): two visits, and a search result alone never shows the answer.
    """

    def __init__(self, world: World):
        self.world = world
        self.entities = sorted(_get(world, "entities", ()) or (), key=lambda e: str(_get(e, "id")))
        self.docs = sorted(_get(world, "docs", ()) or (), key=lambda d: str(_get(d, "doc_id")))
        self.url_of: dict[str, str] = {}
        used: set[str] = {HOME_URL}
        for ent in self.entities:
            self.url_of[str(_get(ent, "id"))] = self._unique(
                f"/wiki/{_slug(str(_get(ent, 'name')))}", used)
        self.doc_url: dict[str, str] = {}
        self.passage: dict[str, list[Any]] = {}
        for doc in self.docs:
            ent_id = _get(doc, "entity_id")
            if ent_id is not None and str(ent_id) in self.url_of:
                self.passage.setdefault(str(ent_id), []).append(doc)
            else:
                self.doc_url[str(_get(doc, "doc_id"))] = self._unique(
                    f"/article/{_slug(str(_get(doc, 'doc_id')))}", used)

    @staticmethod
    def _unique(stem: str, used: set[str]) -> str:
        url, k = f"{stem}.html", 2
        while url in used:
            url, k = f"{stem}_{k}.html", k + 1
        used.add(url)
        return url

    def site(self, name: str) -> Site:
        pages: dict[str, Page] = {}
        by_type: dict[str, list[Any]] = {}
        for ent in self.entities:
            by_type.setdefault(str(_get(ent, "type")), []).append(ent)
        names = {str(_get(e, "id")): str(_get(e, "name")) for e in self.entities}
        listings: dict[str, list[tuple[str, str]]] = {}
        for etype, ents in sorted(by_type.items()):
            ents = sorted(ents, key=lambda e: (str(_get(e, "name")).lower(), str(_get(e, "id"))))
            listings[etype] = [(str(_get(e, "name")), self.url_of[str(_get(e, "id"))]) for e in ents]
        if self.doc_url:
            titles = {str(_get(d, "doc_id")): _clean(_get(d, "title", "")) for d in self.docs}
            listings["article"] = sorted(((titles[d] or d, u) for d, u in self.doc_url.items()),
                                         key=lambda x: (x[0].lower(), x[1]))
        category_urls = {kind: f"/category/{_slug(kind)}.html" for kind in listings}
        for kind, entries in listings.items():
            for page in self._category(kind, entries):
                pages[page.url] = page
        for ent in self.entities:
            page = self._entity(ent, names, category_urls)
            pages[page.url] = page
        for doc in self.docs:
            doc_id = str(_get(doc, "doc_id"))
            if doc_id in self.doc_url:
                b = _PageBuilder(self.doc_url[doc_id], _clean(_get(doc, "title", doc_id)) or doc_id)
                b.lines += [f"# {b.title}", "", _clean(_get(doc, "text", "")), "",
                            f"Category: {b.link('Articles', category_urls['article'])} | "
                            f"{b.link('Home', HOME_URL)}"]
                pages[b.url] = b.page(f"{b.title}: an article.", (doc_id,))
        home = _PageBuilder(HOME_URL, f"{name} wiki")
        home.lines += [f"# {home.title}", "",
                       f"An offline wiki of {len(self.entities)} entities. Browse by category:", ""]
        for kind in sorted(listings):
            home.lines.append(f"- {home.link(_plural(kind).capitalize(), category_urls[kind])} "
                              f"({len(listings[kind])})")
        pages[HOME_URL] = home.page(f"The home page of the {name} wiki.")
        return Site(pages=pages, name=name)

    def _category(self, kind: str, entries: list[tuple[str, str]]) -> Iterator[Page]:
        """A list of `CATEGORY_PAGE_SIZE` links per page, chained with Previous/Next links."""
        chunks = [entries[i:i + CATEGORY_PAGE_SIZE] for i in range(0, len(entries), CATEGORY_PAGE_SIZE)]
        stem, label = f"/category/{_slug(kind)}", _plural(kind).capitalize()

        def url(i: int) -> str:
            return f"{stem}.html" if i == 0 else f"{stem}_{i + 1}.html"

        for i, chunk in enumerate(chunks):
            b = _PageBuilder(url(i), f"{label} ({i + 1}/{len(chunks)})" if len(chunks) > 1 else label)
            b.lines += [f"# {b.title}", ""]
            b.lines += [f"- {b.link(anchor, target)}" for anchor, target in chunk]
            nav = [b.link("Previous", url(i - 1))] if i > 0 else []
            nav += [b.link("Next", url(i + 1))] if i + 1 < len(chunks) else []
            nav.append(b.link("Home", HOME_URL))
            b.lines += ["", " | ".join(nav)]
            yield b.page(f"A list of {len(entries)} {_plural(kind)}.")

    def _entity(self, ent: Any, names: Mapping[str, str], category_urls: Mapping[str, str]) -> Page:
        ent_id, etype = str(_get(ent, "id")), str(_get(ent, "type"))
        name = _clean(_get(ent, "name"))
        b = _PageBuilder(self.url_of[ent_id], name)
        summary = f"{name} is {_article(etype)} {etype} in this wiki."
        b.lines += [f"# {name}", "", summary, ""]
        docs = self.passage.get(ent_id, [])
        related = [(str(rel), str(t)) for rel, t in (_get(ent, "relations", ()) or ())
                   if str(t) in self.url_of]
        passages = [_clean(_get(doc, "text", "")) for doc in docs]
        linked = [self._linked_passage(b, text, related, names) for text in passages]
        for text in linked:
            b.lines += [text, ""]
        # Facts and relations the passage does not already state (no information lost, none
        # repeated: pages stay short for small context windows).
        said = " ".join(passages)
        facts = [f"- {_clean(k).replace('_', ' ')}: {_clean(v)}"
                 for k, v in sorted((_get(ent, "attributes", {}) or {}).items())
                 if not _mentions(said, v) and not _mentions(name, v)]
        if facts:
            b.lines += ["## Facts", "", *facts, ""]
        linked_targets = set(b.links)
        rest = [(rel, t) for rel, t in related if self.url_of[t] not in linked_targets]
        if rest:
            b.lines += ["## Related", ""]
            b.lines += [f"- {_clean(rel).replace('_', ' ')}: {b.link(names[t], self.url_of[t])}"
                        for rel, t in rest]
            b.lines.append("")
        b.lines.append(f"Category: {b.link(_plural(etype).capitalize(), category_urls[etype])} | "
                       f"{b.link('Home', HOME_URL)}")
        return b.page(summary, tuple(str(_get(d, "doc_id")) for d in docs))

    def _linked_passage(self, b: _PageBuilder, text: str, related: list[tuple[str, str]],
                        names: Mapping[str, str]) -> str:
        """Link the first mention of each related entity (non-overlapping, longest name first)."""
        spans: list[tuple[int, int, str]] = []
        for target in sorted({t for _, t in related}, key=lambda t: (-len(names[t]), t)):
            name = _clean(names[target])
            for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text):
                if all(m.end() <= s or m.start() >= e for s, e, _ in spans):
                    spans.append((m.start(), m.end(), target))
                    break
        out, pos = [], 0
        for start, end, target in sorted(spans):
            out += [text[pos:start], b.link(text[start:end], self.url_of[target])]
            pos = end
        return "".join(out) + text[pos:]


def _mentions(text: str, value: Any) -> bool:
    forms = {_clean(value)}
    if isinstance(value, int) and not isinstance(value, bool):
        forms.add(f"{value:,}")
    return any(re.search(rf"(?<!\w){re.escape(f)}(?!\w)", text) for f in forms if f)


def _plural(word: str) -> str:
    if word.lower() == "person":
        return "people"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


__all__ = ["Site", "Page", "PageError", "LoadError", "LINK_RE", "HOME_URL", "write_world_site", "world_cli_main"]
