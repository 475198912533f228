"""A PROTOCOL STAND-IN for an SGLang server, for tests only — not SGLang.

SGLang needs CUDA and a pinned torch, so it cannot run on the CPU test machines. This FastAPI app
speaks the part of SGLang's native HTTP API that `treegym.agents.sglang` uses, over the tiny model
through `HFPolicy`, and behaves like the real server where a client could otherwise be flattered
(each point checked against the 0.5.2-0.5.23 wheels' source, see `treegym.agents.sglang`):

- ``version="0.5.23"`` (default) or an older release: ``"0.5.4"`` returns ``output_ids`` that
  start with the last 5 prompt tokens (the detokenizer's ``decode_ids``, fixed in 0.5.5);
  ``"0.5.2"`` has no ``sampling_seed`` (sending one is an HTTP 500, like the TypeError the real
  server raises) and checks the length limit before EOS and stop strings. ``/server_info`` and
  ``/model_info`` exist only in 0.5.23 mode; ``/get_server_info`` and ``/get_model_info`` always.
- ``deterministic=False`` (default): ``sampling_seed`` is accepted and *ignored* (every request
  samples from a fresh random seed), as without ``--enable-deterministic-inference``. With
  ``deterministic=True`` the seed is used, and an unseeded request gets seed 42 like SGLang's.
- Stop strings are detected with SGLang's window: only in the decoded last ``canonical token
  count + 1`` tokens (``Req.tail_str``), so a spelling with more tokens runs on to EOS or the
  length limit. EOS ids: the model's union of tokenizer, config and generation config ids.
- 0.5.23 mode rejects unknown ``sampling_params`` keys with HTTP 400 (older modes: 500); every
  mode rejects a prompt that does not fit the context (``max_position_embeddings``) with 400,
  and a failed ``/update_weights_from_disk`` with 400 ``{"success": false, "message"}``; a
  ``weight_version`` sent with an update is reported in every later ``meta_info``.
- ``api_key`` / ``admin_api_key``: Bearer auth as ``--api-key`` / ``--admin-api-key`` (401;
  ``/health*`` stays open; weight updates and cache flushes want the admin key when set).
- ``preferred_sampling_params``: merged under each request's keys, as the server does.
- ``cached_tokens`` emulates RadixAttention by the longest common prefix with sequences served
  before; ``faults`` makes the next requests fail (``"malformed"`` JSON or HTTP ``"503"``).

What it does NOT model: SGLang's sampler (it samples with `treegym.agents.sampling`, so seeded
tokens equal `HFPolicy`'s — a real server's do not), top_k / min_p / penalties / grammars /
logit_bias other than neutral (HTTP 400 here), streaming, chunked prefill, retraction,
speculative decoding, batching effects on numerics, ``abort``, the OpenAI routes, ``/health``
generating a token, the exact text of most error messages, and any release other than the three
emulated ones.

Also here: `build_test_model`, the tiny model every agents test shares (built once per run).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from netutil import ServedApp

from treegym.agents.base import GenRequest

SEARCH_PROMPT = "Question: who founded Pezon?\n"
SEARCH_ACTION = "<search> Pezon </search>"
ANSWER_PROMPT = "Question: where is Krimesk?\n"
ANSWER_ACTION = "<answer> Zapaindia </answer>"


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` torch threads, then restore. On the shared 2-core machines OpenMP spinning
    made 2 threads ~14x more CPU-hungry than 1 for these tiny models (measured under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_test_model(root: str | os.PathLike) -> Path:
    """A tiny Llama on the synthetic world, briefly over-fitted so that greedy decoding of
    SEARCH_PROMPT / ANSWER_PROMPT writes SEARCH_ACTION / ANSWER_ACTION (then would go on), which
    lets tests check stop strings on real model output. Built once under ``root``."""
    out = Path(root) / "agents-test-tiny"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treegym.agents.tiny import build_tiny_model
    from treegym.envs.data.synthetic import synthetic_dataset

    ds = synthetic_dataset(0)
    tmp = Path(root) / "agents-test-tiny.building"
    build_tiny_model(ds.corpus_path, tmp, entity_names=ds.world.entity_names(), vocab_size=800,
                     n_layer=2, d_model=64, n_head=4, max_position_embeddings=2048, seed=0)
    tok = AutoTokenizer.from_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    texts = [SEARCH_PROMPT + SEARCH_ACTION + " and more text", ANSWER_PROMPT + ANSWER_ACTION + " so on"]
    batch = [tok.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, batch))
    ids = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch])
    mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    with torch_threads(1):
        for _ in range(60):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


# SamplingParams keyword arguments by release (0.5.2's __init__; +sampling_seed in 0.5.3; the
# 0.5.23 JSON contract, sglang/api/v1/api_types.py, adds the rest)
SAMPLING_KEYS_052 = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval",
    "logit_bias"})
SAMPLING_KEYS_053 = SAMPLING_KEYS_052 | {"sampling_seed"}
SAMPLING_KEYS_0523 = SAMPLING_KEYS_053 | {"stop_regex", "beam_width", "watermark", "choice"}
# values the stand-in's sampler (treegym.agents.sampling) can honour: the neutral ones
NEUTRAL = {"top_k": (-1, 1 << 30), "min_p": (0, 0.0), "frequency_penalty": (0, 0.0),
           "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0), "min_new_tokens": (0,),
           "n": (1,), "json_schema": (None,), "regex": (None,), "ebnf": (None,),
           "structural_tag": (None,), "ignore_eos": (False,), "logit_bias": (None, {}),
           "stop_token_ids": (None, []), "stop_regex": (None, []), "beam_width": (None, 1),
           "choice": (None, [])}
SURR_TOKENS = 5  # INIT_INCREMENTAL_DETOKENIZATION_OFFSET


def _v(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def sglang_stop_hit(ids: list[int], stops: list[str], tokenizer: Any) -> str | None:
    """SGLang's stop-string check after a token: the decoded last (canonical token count + 1)
    tokens (``SamplingParams.normalize`` + ``Req.tail_str``)."""
    if not stops:
        return None
    window = max(len(tokenizer.encode(s)) for s in stops) + 1
    tail = tokenizer.decode(ids[-window:])
    return next((s for s in stops if s in tail), None)


SPLIT_PROMPT = "Question: who founded Krimesk?\n"
SPLIT_HEAD = "<search> Krimesk "


def build_split_stop_model(model_dir: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The test model, fine-tuned so that greedy decoding of SPLIT_PROMPT writes SPLIT_HEAD and
    then ``</search>`` *one character per token* (then goes on). Its canonical encoding is one
    token, so SGLang's stop window (2 tokens) misses this spelling while `HFPolicy` stops."""
    out = Path(root) / "agents-test-split-stop"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    chars = [enc(c) for c in "</search>"]
    assert all(len(c) == 1 for c in chars), "the test tokenizer lacks single-character tokens"
    seq = enc(SPLIT_PROMPT) + enc(SPLIT_HEAD) + [c[0] for c in chars] + enc(" and more text")
    ids = torch.tensor([seq])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    with torch_threads(1):
        for _ in range(150):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    tmp = Path(root) / "agents-test-split-stop.building"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_app(policy: Any, *, version: str = "0.5.23", deterministic: bool = False,
             api_key: str | None = None, admin_api_key: str | None = None,
             preferred_sampling_params: dict | None = None):
    """The stand-in FastAPI app over an `HFPolicy` (see the module docstring for the modes)."""
    ver = _v(version)
    if ver not in ((0, 5, 2), (0, 5, 4), (0, 5, 23)):
        raise ValueError(f"the stand-in emulates 0.5.2, 0.5.4 and 0.5.23, not {version}")
    if deterministic and ver < (0, 5, 3):
        raise ValueError("--enable-deterministic-inference does not exist before 0.5.3")
    keys = SAMPLING_KEYS_0523 if ver >= (0, 5, 23) else (
        SAMPLING_KEYS_053 if ver >= (0, 5, 3) else SAMPLING_KEYS_052)
    app = FastAPI(title="SGLang protocol stand-in (treegym tests)")
    app.state.policy = policy
    app.state.seen = []        # sequences served: the emulated radix cache
    app.state.faults = []      # e.g. ["malformed", "503"]: consumed one per request
    app.state.weight_version = "default"
    app.state.requests = []    # the sampling_params of every /generate input, as received
    lock = threading.Lock()
    context_len = int(policy.context_length)
    tok = policy.tokenizer

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        admin = path in ("/flush_cache", "/update_weights_from_disk")
        key = (admin_api_key or api_key) if admin else api_key
        if key and not path.startswith(("/health", "/ready", "/metrics")):
            parts = (request.headers.get("authorization") or "").split(" ", 1)
            if len(parts) != 2 or parts[0].lower() != "bearer" or parts[1] != key:
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    def fault() -> Any:
        if app.state.faults:
            kind = app.state.faults.pop(0)
            if kind == "malformed":
                return PlainTextResponse("{not json", media_type="application/json")
            return JSONResponse({"error": "overloaded"}, status_code=503)
        return None

    def bad_request(message: str) -> JSONResponse:  # http_server._create_error_response
        return JSONResponse({"error": {"message": message}}, status_code=400)

    def cached(prompt: list[int]) -> int:
        best = 0
        for seq in app.state.seen:
            n, m = 0, min(len(seq), len(prompt))
            while n < m and seq[n] == prompt[n]:
                n += 1
            best = max(best, n)
        return min(best, len(prompt) - 1)

    def server_info():
        info = {"version": version, "model_path": policy.model_dir, "context_length": context_len,
                "disable_radix_cache": False, "attention_backend": "fa3" if deterministic else
                "flashinfer", "preferred_sampling_params": None if preferred_sampling_params is None
                else json.dumps(preferred_sampling_params), "weight_version": "default"}
        if ver >= (0, 5, 3):
            info["enable_deterministic_inference"] = deterministic
        return info

    def model_info():
        pref = preferred_sampling_params
        return {"model_path": policy.model_dir, "tokenizer_path": policy.model_dir,
                "is_generation": True, "weight_version": app.state.weight_version,
                "preferred_sampling_params": pref if ver >= (0, 5, 23) or pref is None
                else json.dumps(pref)}

    @app.get("/health")
    def health():
        return fault() or PlainTextResponse("")

    app.get("/get_server_info")(server_info)
    app.get("/get_model_info")(model_info)
    if ver >= (0, 5, 23):
        app.get("/server_info")(server_info)
        app.get("/model_info")(model_info)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    def flush_cache():
        app.state.seen.clear()
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request):
        body = await request.json()
        path = body.get("model_path")
        try:
            import torch
            from transformers import AutoModelForCausalLM

            new = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            with lock:
                app.state.policy.model.load_state_dict(new.state_dict())
                app.state.seen.clear()
        except Exception as exc:  # SGLang: HTTP 400 with success false + message
            return JSONResponse({"success": False, "message": f"Failed to update weights: "
                                 f"{type(exc).__name__}: {exc}", "num_paused_requests": 0},
                                status_code=400)
        message = "Succeeded to update model weights."
        if body.get("weight_version") is not None:
            app.state.weight_version = str(body["weight_version"])
            message += f" Weight version updated to {app.state.weight_version}."
        return {"success": True, "message": message, "num_paused_requests": 0}

    def check_params(sp: dict) -> str | None:
        """The error SGLang (or this stand-in) answers for one input's sampling params."""
        unknown = sorted(set(sp) - keys)
        if unknown:
            return f"unknown field `{unknown[0]}`"
        if not (float(sp.get("temperature", 1.0)) >= 0):
            return f"temperature must be a non-negative finite number, got {sp['temperature']}."
        if not 0 < float(sp.get("top_p", 1.0)) <= 1:
            return f"top_p must be in (0, 1], got {sp['top_p']}."
        for k, ok in NEUTRAL.items():
            if k in sp and sp[k] not in ok:
                return f"stand-in: {k}={sp[k]!r} is not modelled (only {ok})"
        return None

    @app.post("/generate")
    async def generate(request: Request):
        bad = fault()
        if bad is not None:
            return bad
        body = await request.json()
        ids = body.get("input_ids")
        if ids is None:
            return bad_request("this stand-in only accepts input_ids")
        single = bool(ids) and isinstance(ids[0], int)
        batch = [ids] if single else ids
        params = body.get("sampling_params") or {}
        plist = params if isinstance(params, list) else [params] * len(batch)
        if len(plist) != len(batch):
            return bad_request("sampling_params and input_ids differ in length")
        app.state.requests.extend(dict(sp) for sp in plist)
        merged = [{**(preferred_sampling_params or {}), **sp} for sp in plist]
        for sp in merged:
            err = check_params(sp)
            if err is not None and err.startswith("unknown field") and ver < (0, 5, 23):
                return PlainTextResponse("Internal Server Error", status_code=500)  # TypeError
            if err is not None:
                return JSONResponse({"error": err}, status_code=400)
        reqs = []
        for p, sp in zip(batch, merged):
            max_new = int(sp.get("max_new_tokens", 128))
            if len(p) >= context_len:
                return bad_request(f"The input ({len(p)} tokens) is longer than the model's "
                                   f"context length ({context_len} tokens).")
            if len(p) + max_new > context_len:
                return bad_request(f"Requested token count exceeds the model's maximum context "
                                   f"length of {context_len} tokens. You requested a total of "
                                   f"{len(p) + max_new} tokens: {len(p)} tokens from the input "
                                   f"messages and {max_new} tokens for the completion.")
            seed = None
            if deterministic:
                seed = sp.get("sampling_seed")
                seed = 42 if seed is None else int(seed)
            # no stop strings here: SGLang's own window rule is applied below
            reqs.append(GenRequest(tuple(p), max_new_tokens=max_new,
                                   temperature=float(sp.get("temperature", 1.0)),
                                   top_p=float(sp.get("top_p", 1.0)), seed=seed))
        t0 = time.perf_counter()
        with lock:
            hits = [cached(list(r.prompt_ids)) for r in reqs]
            results = app.state.policy.generate(reqs)
            for r, res in zip(reqs, results):
                app.state.seen.append(list(r.prompt_ids) + res.token_ids)
        latency = time.perf_counter() - t0
        out = []
        for r, sp, res, hit in zip(reqs, merged, results, hits):
            stops = [sp["stop"]] if isinstance(sp.get("stop"), str) else list(sp.get("stop") or [])
            toks, finish = res.token_ids, None
            for k in range(1, len(toks) + 1):
                head = toks[:k]
                checks = {  # Req.check_finished (0.5.2-0.5.5) / update_finish_state (0.5.23)
                    "length": lambda: ({"type": "length", "length": r.max_new_tokens}
                                       if k >= r.max_new_tokens else None),
                    "eos": lambda: ({"type": "stop", "matched": head[-1]}
                                    if head[-1] in policy.eos_ids else None),
                    "stop": lambda: (None if (m := sglang_stop_hit(head, stops, tok)) is None
                                     else {"type": "stop", "matched": m})}
                order = ("stop", "eos", "length") if ver >= (0, 5, 23) else ("length", "eos", "stop")
                finish = next((f for f in (checks[c]() for c in order) if f is not None), None)
                if finish is not None:
                    toks = head
                    break
            finish = finish or {"type": "length", "length": r.max_new_tokens}
            lps = res.logprobs[:len(toks)]
            text = policy.decode(toks)
            matched = finish.get("matched")
            if isinstance(matched, str) and not sp.get("no_stop_trim") and text.endswith(matched):
                text = text[: -len(matched)]
            meta = {"id": f"standin-{len(app.state.seen)}", "finish_reason": finish,
                    "prompt_tokens": len(r.prompt_ids), "completion_tokens": len(toks),
                    "cached_tokens": hit, "weight_version": app.state.weight_version,
                    "e2e_latency": latency}
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, toks)]
            out_ids = list(toks)
            if ver < (0, 5, 5):  # the detokenizer's decode_ids: surrounding prompt tokens first
                out_ids = list(r.prompt_ids[-SURR_TOKENS:]) + out_ids
            out.append({"text": text, "output_ids": out_ids, "meta_info": meta})
        return out[0] if single else out

    return app


class StandinServer:
    """Runs `make_app(policy, **modes)` (or any ``app=``) with uvicorn on 127.0.0.1 in a
    background thread, from entering the `with` block to leaving it."""

    def __init__(self, policy: Any = None, port: int = 0, *, app: Any = None, **modes: Any):
        self.app = app if app is not None else make_app(policy, **modes)
        self.port = port

    def __enter__(self) -> StandinServer:
        self._served = ServedApp(self.app, self.port, log_level="warning", lifespan="off")
        self.url = self._served.url
        return self

    def __exit__(self, *exc: Any) -> None:
        self._served.stop()

    @property
    def faults(self) -> list[str]:
        return self.app.state.faults
