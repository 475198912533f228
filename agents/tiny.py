"""Build a tiny causal LM + byte-level BPE tokenizer from a corpus, saved as a normal HF directory.

Why: the offline benchmark and every test need a real transformers model that loads through
``AutoModelForCausalLM.from_pretrained(DIR)`` / ``AutoTokenizer.from_pretrained(DIR)`` — the same
path a real checkpoint (e.g. a local Qwen2.5-3B-Instruct) takes — without downloading anything.

Tokenizer choices (see ../shared/REFERENCE.md, "Measured here"):
- byte-level BPE trained with the ``tokenizers`` library on the corpus (+ prompts), so any text
  round-trips exactly;
- the protocol tags (<search>, </search>, <answer>, ...) are *added tokens* (one id each, never
  split, but not "special": ``decode(skip_special_tokens=True)`` keeps them, so every decode of an
  action still shows its tags);
- ``entity_names``: optionally every entity name becomes one added token (with its leading
  space by default, see `entity_tokens`). A 0.9M-parameter model did not learn to copy names of
  3-6 BPE tokens in 10 CPU-minutes; one id per name turns copying into a one-token lookup.
  Measured on the seed-0 world (200 oracle episodes, BPE 2,000): a hop name costs 2.90 tokens
  without entity tokens, 2.00 with bare-name tokens (name + a separate space) and 1 with the
  default space-prefixed tokens.

The model is randomly initialised (seeded); pre-training and SFT belong to ``treegym.train``.
Building is deterministic: the same corpus, options and seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

PROTOCOL_TAGS: tuple[str, ...] = ("<search>", "</search>", "<answer>", "</answer>",
                                  "<information>", "</information>", "<think>", "</think>")
# TreeWebAgent-v0's extra tool tags; added to an existing model by `add_tags` (the QA tags above
# stay the only ones `build_tiny_model` adds, so a from-scratch QA warm start reproduces exactly).
WEB_TAGS: tuple[str, ...] = ("<visit>", "</visit>", "<click>", "</click>", "<next_page>")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def iter_corpus_texts(corpus_path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(title, text) per passage of a wiki-18 style jsonl; errors name file:line (the one corpus
    reader, `treegym.retrieval_index.iter_corpus`, does the parsing)."""
    from treegym.retrieval_index.corpus import iter_corpus

    path = Path(corpus_path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    for _, title, text in iter_corpus(path):
        yield title, text


def corpus_titles(corpus_path: str | os.PathLike) -> list[str]:
    """Distinct non-empty titles in corpus order (the synthetic world titles docs by entity name).

    Names, not title lines: wiki-18's title lines carry quotes (kept in observations, Search-R1's
    rule), which are not part of the name."""
    seen: dict[str, None] = {}
    for title, _ in iter_corpus_texts(corpus_path):
        if len(title) >= 2 and title[0] == title[-1] == '"':
            title = title[1:-1]
        if title:
            seen.setdefault(title, None)
    return list(seen)


ENTITY_STYLES = ("space", "bare", "both")


def entity_tokens(names: Iterable[str], style: str = "space") -> list:
    """Added tokens for entity names.

    "space": `` Name`` (leading space, may end inside a longer word) — names almost always follow
    a space (``<search> Name``, ``(Title: Name)``, ``in Name``), and with byte-level BPE a bare
    ``Name`` token would still cost a separate space token, so this makes each occurrence ONE
    token at no extra vocabulary. "bare": ``Name`` as a whole word. "both": both (twice the
    vocabulary). Matching is leftmost-longest, so "Tradal Zofim" wins over "Tradal".
    """
    from tokenizers import AddedToken

    if style not in ENTITY_STYLES:
        raise ValueError(f"unknown entity token style {style!r}; use one of {ENTITY_STYLES}")
    clean = sorted({n.strip() for n in names if n and n.strip()})
    out = []
    if style in ("space", "both"):
        out += [AddedToken(" " + n, special=False, normalized=False) for n in clean]
    if style in ("bare", "both"):
        out += [AddedToken(n, special=False, normalized=False, single_word=True) for n in clean]
    return out


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4000,
                    entity_names: Sequence[str] | None = None, entity_style: str = "space"):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the protocol tags as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TAGS])
    if entity_names:
        tok.add_tokens(entity_tokens(entity_names, entity_style))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=None, unk_token=None,
                                   clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def build_config(arch: str, *, vocab_size: int, n_layer: int, d_model: int, n_head: int,
                 n_kv_head: int | None, max_position_embeddings: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, Qwen2Config

    if d_model % n_head:
        raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
                  num_hidden_layers=n_layer, num_attention_heads=n_head,
                  num_key_value_heads=n_kv_head or n_head,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                  bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  rms_norm_eps=1e-5, initializer_range=0.02)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown arch {arch!r}; use 'llama' or 'qwen2'")


def build_tiny_model(corpus_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                     entity_names: Sequence[str] | None = None,
                     prompts: Sequence[str] | None = None, vocab_size: int = 4000,
                     n_layer: int = 2, d_model: int = 128, n_head: int = 4,
                     n_kv_head: int | None = None, max_position_embeddings: int = 2048,
                     arch: str = "llama", seed: int = 0, entity_style: str = "space") -> Path:
    """Train the tokenizer, initialise the model, ``save_pretrained`` both into ``out_dir``.

    ``prompts`` (e.g. Search-R1 prompts of the training questions) are added to the tokenizer's
    training text so the instruction compresses well. Defaults give ~0.9M parameters (REFERENCE.md
    config (a)); ``n_layer=4, d_model=256`` gives ~5M.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    texts: list[str] = []
    for title, text in iter_corpus_texts(corpus_path):
        texts.append(f"{title}\n{text}" if title else text)
    if not texts:
        raise ValueError(f"corpus {str(corpus_path)!r} has no documents")
    texts.extend(prompts or ())
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, entity_names=entity_names,
                                entity_style=entity_style)
    cfg = build_config(arch, vocab_size=len(tokenizer), n_layer=n_layer, d_model=d_model,
                       n_head=n_head, n_kv_head=n_kv_head,
                       max_position_embeddings=max_position_embeddings,
                       eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"builder": "treegym.agents.tiny", "arch": arch, "vocab_size": len(tokenizer),
            "bpe_vocab_size": vocab_size, "n_layer": n_layer, "d_model": d_model,
            "n_head": n_head, "max_position_embeddings": max_position_embeddings, "seed": seed,
            "entity_tokens": len(set(entity_names or ())), "entity_style": entity_style,
            "prompts": len(prompts or ()),
            "params": sum(p.numel() for p in model.parameters()),
            "corpus_sha256": _sha256(corpus_path)}
    (out / "treegym_tiny.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def add_tags(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
             tags: Sequence[str] = WEB_TAGS, max_positions: int | None = None) -> Path:
    """Copy a model with `tags` added to its tokenizer as single (non-special) tokens.

    `max_positions` raises the context bound of the copy (web transcripts run longer than QA
    ones). That is sound only for position encodings without a learned table (the tiny model's
    RoPE); the model has still only been trained on the lengths it has seen.

    The new embedding rows start at the mean of the existing ones (what transformers does with
    `mean_resizing`), so the copy's outputs on old text are unchanged and the new tags start as
    an "average token" rather than noise. Tags already in the vocabulary are left alone.
    """
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    vocab = tok.get_vocab()
    new = [AddedToken(t, special=False, normalized=False) for t in tags if t not in vocab]
    if new:
        import torch

        tok.add_tokens(new)
        with torch.random.fork_rng():  # mean_resizing samples the new rows: keep the copy reproducible
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tok), mean_resizing=True)
    if max_positions:
        if any("position" in name for name, _ in model.named_parameters()):
            raise ValueError(f"{model_dir}: the model has learned position embeddings; its context "
                             "cannot be raised by changing the config")
        model.config.max_position_embeddings = int(max_positions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _world_prompts(world_dir: Path) -> list[str]:
    """Search-R1 prompts of the world's training questions, when the env protocol is available."""
    try:
        from treegym.envs.data import load_tasks
        from treegym.envs.protocol import make_prompt
    except ImportError:
        return []
    prompts = []
    for name in ("train.parquet", "train.jsonl"):
        path = world_dir / name
        if path.is_file():
            prompts = [make_prompt(t.question) for t in load_tasks(path)]
            break
    return prompts


def _world_entity_names(world_dir: Path) -> list[str] | None:
    """The world's own name list (entities, distractors, surnames) rebuilt from world.json's seed
    and params — richer than the corpus titles. None when the directory is not a synthetic world."""
    info_path = world_dir / "world.json"
    if not info_path.is_file():
        return None
    try:
        from treegym.envs.data.synthetic import make_world

        info = json.loads(info_path.read_text())
        return make_world(int(info["seed"]), **dict(info.get("params") or {})).entity_names()
    except (ImportError, KeyError, TypeError, ValueError):
        return None


def cli_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="treegym tiny-model",
        description="Train a byte-level BPE tokenizer on a world's corpus and save it with a "
                    "randomly initialised tiny causal LM as a Hugging Face directory.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--world", type=Path, help="directory written by `treegym world` "
                                                "(uses its corpus.jsonl and train questions)")
    src.add_argument("--corpus", type=Path, help="a corpus jsonl ({id, contents} or {id, title, text})")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--vocab-size", type=int, default=4000, help="BPE merges target (before tags/entities)")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048, help="max_position_embeddings")
    parser.add_argument("--entity-tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="make every entity name of the world (else every corpus title) a "
                             "single token")
    parser.add_argument("--entity-style", choices=ENTITY_STYLES, default="space",
                        help="'space': ' Name' tokens (default), 'bare': 'Name', 'both'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.world is not None:
        corpus = args.world / "corpus.jsonl"
        if not corpus.is_file():
            parser.error(f"{args.world} has no corpus.jsonl (write one with `treegym world`)")
        prompts = _world_prompts(args.world)
    else:
        corpus, prompts = args.corpus, []
    names = None
    if args.entity_tokens:
        names = (_world_entity_names(args.world) if args.world is not None else None) or \
            corpus_titles(corpus)
    out = build_tiny_model(corpus, args.out, entity_names=names, prompts=prompts,
                           vocab_size=args.vocab_size, n_layer=args.n_layer, d_model=args.d_model,
                           n_head=args.n_head, max_position_embeddings=args.context,
                           arch=args.arch, seed=args.seed, entity_style=args.entity_style)
    meta = json.loads((out / "treegym_tiny.json").read_text())
    print(f"wrote {out}: {meta['arch']}, {meta['params']:,} parameters, vocab {meta['vocab_size']} "
          f"({meta['entity_tokens']} entity tokens)")
    return 0


__all__ = ["PROTOCOL_TAGS", "WEB_TAGS", "add_tags", "ENTITY_STYLES", "entity_tokens", "build_tiny_model", "train_tokenizer", "corpus_titles",
           "iter_corpus_texts", "cli_main"]
