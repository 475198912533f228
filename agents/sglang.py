"""SGLang backend: a server's native ``POST /generate`` with token ids in and token ids out.

Why SGLang for rollouts: RadixAttention keeps the KV cache of every prefix it has seen, so the
sibling branches of a tree (and the G copies of a GRPO prompt) share their prefill without any
grouping on our side; ``meta_info.cached_tokens`` reports how many prompt tokens were served from
that cache. After a training step the new weights are pushed with ``/update_weights_from_disk``.

Supported servers: SGLang >= 0.5.2 (`MIN_VERSION`). Everything below was checked against the
source of the 0.5.2, 0.5.3, 0.5.4, 0.5.5 and 0.5.23 wheels (``sglang/srt/entrypoints/
http_server.py``, ``managers/tokenizer_manager.py``, ``managers/schedule_batch.py``,
``managers/detokenizer_manager.py``, ``sampling/sampling_params.py``, ``managers/io_struct.py``,
``sglang/api/v1/api_types.py``, ``utils/auth.py``); it has not been run against a real server
(SGLang needs CUDA), only against ``tests/sglang_standin.py``, which emulates those releases.

What the client does about how real servers behave:

- **Version and settings, read once** (`SGLangPolicy.server_info`): ``GET /server_info`` (0.5.23;
  ``/get_server_info`` before) gives ``version`` and ``enable_deterministic_inference``;
  ``GET /model_info`` (``/get_model_info``) gives ``weight_version`` and
  ``preferred_sampling_params``. A server without a version is not SGLang; one below
  `MIN_VERSION` is refused (``version_check="warn"|"off"`` to try anyway).
- **Token ids come from ``meta_info.output_token_logprobs[*][1]``**, which always lines up with the
  log-probs. ``output_ids`` is only a cross-check: before 0.5.5 the detokenizer returned
  ``decode_ids`` there, i.e. up to 5 trailing *prompt* tokens (``INIT_INCREMENTAL_DETOKENIZATION_
  OFFSET``) followed by the output; from 0.5.5 on it is the output exactly. Anything else is
  an `SGLangError` (ids and log-probs disagree).
- **Seeds**: ``sampling_seed`` exists from 0.5.3 (an unknown key makes 0.5.2 raise a TypeError:
  HTTP 500), so it is only sent where accepted. The server *uses* it only when launched with
  ``--enable-deterministic-inference`` (``SamplingBatchInfo.from_schedule_batch``); otherwise it
  is ignored and sampling is not reproducible — ``seeds="auto"`` warns once (`SGLangWarning`),
  ``seeds="require"`` refuses such a server, ``seeds="off"`` never sends one. In deterministic
  mode an unseeded request is sampled with seed 42 (every G copy of a prompt would be the same),
  so the client sends a fresh random seed for requests without one; seeds are folded into 31 bits
  because 0.5.3-0.5.5 hold them in an int32 tensor. A seed makes the server repeat *itself*; its
  sampler is not treegym's, so it does not reproduce `HFPolicy`'s tokens for the same seed.
- **Stop strings are cut client-side by the rule every backend uses**
  (`treegym.agents.base.first_end`: the earliest token that is an EOS id or completes a stop
  string; ids, log-probs and the finish reason end there). SGLang only looks for a stop string in
  the decoded last ``canonical token count + 1`` tokens (``Req.tail_str`` / ``stop_str_max_len``),
  so a model that spells ``</search>`` with more tokens runs on until EOS or the length limit;
  the surplus tokens are dropped (and counted in ``stats["overrun_tokens"]``). The server also
  stops on the EOS ids of ``generation_config.json``; `HFPolicy` and this client use the same
  union (`treegym.agents.base.eos_token_ids`), so both backends end the same episodes.
- **Every sampling key is sent explicitly** (neutral ``top_k=-1``, ``min_p=0``, penalties 0/1,
  ``min_new_tokens=0``, ...), because a server launched with ``--preferred-sampling-params``
  fills in keys a request leaves out. Preferred keys this client cannot override on every
  supported release (``logit_bias``, ``stop_regex``, ...) make `server_info` raise.
- **Auth**: ``api_key=`` sends ``Authorization: Bearer``; a server with ``--admin-api-key`` wants
  that key for weight updates and cache flushes (``admin_api_key=``). 401/403 raise at once.
- **Weight sync**: ``update_weights_from_disk(path, weight_version=...)`` sends a version (a fresh
  one when not given); every later response's ``meta_info.weight_version`` must equal it, so a
  rollout can never silently come from other weights. A refused update (HTTP 400 with
  ``{"success": false, "message"}``) raises with the server's message.
- **Errors**: 4xx (unknown sampling key, prompt longer than the context, ...) raise at once with
  the server's message; connection errors, timeouts, HTTP 5xx and malformed JSON are retried
  ``retries`` times with exponential backoff, then raise. Every `SGLangError` names the URL.

Request (``GenerateReqInput``, batched): ``{"input_ids": [[...], ...], "sampling_params": [{...},
...], "return_logprob": true, "stream": false}``. Response: one object per input, ``{"text",
"output_ids", "meta_info": {"finish_reason": {"type": "stop"|"length"|"abort", "matched":
str|int, "length": int}, "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
"output_token_logprobs": [[logprob, token_id, text|null], ...]}}``. Log-probs: SGLang's default
(temperature-scaled, before top-p; greedy reports T = 1) — the `treegym.agents.sampling`
convention. Entropies are not available from the server (``entropies`` is None).
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Literal, Sequence

from treegym.agents.base import GenRequest, GenResult, first_end
from treegym.agents.base import eos_token_ids as eos_union
from treegym.agents.tokenizer import HFTokenizer, TextTokenizer, TokenizerBacked

MIN_VERSION = (0, 5, 2)        # oldest release whose API this client was checked against
SEED_VERSION = (0, 5, 3)       # first release with SamplingParams.sampling_seed
CLEAN_IDS_VERSION = (0, 5, 5)  # first release whose output_ids hold only the output
PREFIXED_IDS_MAX = 5           # INIT_INCREMENTAL_DETOKENIZATION_OFFSET before 0.5.5

SeedMode = Literal["auto", "require", "off"]
VersionCheck = Literal["error", "warn", "off"]

DETERMINISTIC_COST = (
    "launch it with --enable-deterministic-inference; that costs throughput (batch-invariant "
    "kernels, NCCL tree all-reduce under TP) and picks the attention backend: fa3 on Hopper keeps "
    "the radix cache, but the Blackwell default (flashinfer) disables it (use --attention-backend "
    "triton or fa4 there to keep prefix sharing)")


class SGLangError(RuntimeError):
    """The server could not be reached, refused us, or answered something that is not SGLang's."""


class SGLangWarning(UserWarning):
    """A server setting that makes rollouts less reproducible than the caller asked for."""


def _version_tuple(text: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(text)).release
    except InvalidVersion as exc:
        raise ValueError(f"not a version: {text!r}") from exc


def _fmt(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


@dataclass(frozen=True)
class ServerInfo:
    """What the client learned from ``/server_info`` and ``/model_info`` (read once)."""

    url: str
    version: tuple[int, ...]
    deterministic: bool
    weight_version: str | None
    preferred_sampling_params: dict = field(default_factory=dict)
    context_length: int | None = None
    radix_cache: bool = True
    attention_backend: str | None = None
    model_path: str | None = None

    @property
    def seeds_accepted(self) -> bool:
        return self.version >= SEED_VERSION

    @property
    def seeds_honoured(self) -> bool:
        return self.seeds_accepted and self.deterministic

    @property
    def prefixed_output_ids(self) -> bool:
        return self.version < CLEAN_IDS_VERSION

    @staticmethod
    def read_version(url: str, server: Any) -> tuple[int, ...]:
        """The release from a ``/server_info`` answer; anything else is not SGLang."""
        if not isinstance(server, dict) or not isinstance(server.get("version"), str):
            raise SGLangError(f"{url} does not look like an SGLang server: /server_info (or "
                              f"/get_server_info) has no 'version' ({str(server)[:200]!r}); check "
                              f"the URL points at `python -m sglang.launch_server`")
        try:
            return _version_tuple(server["version"])
        except ValueError as exc:
            raise SGLangError(f"{url} reports an unreadable SGLang version: {exc}") from None

    @classmethod
    def from_json(cls, url: str, server: Any, model: Any) -> ServerInfo:
        version = cls.read_version(url, server)
        model = model if isinstance(model, dict) else {}
        pref = model.get("preferred_sampling_params", server.get("preferred_sampling_params"))
        if isinstance(pref, str):  # a JSON string before the parsed dict of newer releases
            try:
                pref = json.loads(pref)
            except json.JSONDecodeError:
                raise SGLangError(f"{url}: preferred_sampling_params is not JSON: "
                                  f"{pref[:200]!r}") from None
        if pref is not None and not isinstance(pref, dict):
            raise SGLangError(f"{url}: preferred_sampling_params is not an object: {pref!r}")
        ctx = server.get("context_length")
        wv = model.get("weight_version", server.get("weight_version"))
        return cls(url=url, version=version,
                   deterministic=bool(server.get("enable_deterministic_inference", False)),
                   weight_version=None if wv is None else str(wv),
                   preferred_sampling_params=dict(pref or {}),
                   context_length=int(ctx) if isinstance(ctx, int) and ctx > 0 else None,
                   radix_cache=not server.get("disable_radix_cache", False),
                   attention_backend=server.get("attention_backend"),
                   model_path=model.get("model_path"))


def _load_tokenizer(tokenizer: Any) -> TextTokenizer:
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(tokenizer)))
    if hasattr(tokenizer, "encode_prompt"):
        return tokenizer
    return HFTokenizer(tokenizer)


def _dir_eos_ids(tokenizer: Any) -> frozenset[int]:
    """EOS ids from a model directory's config.json and generation_config.json (what SGLang's
    ModelConfig reads), when the tokenizer was given as that directory."""
    if not (isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__")):
        return frozenset()
    found = []
    for name in ("config.json", "generation_config.json"):
        path = Path(os.fspath(tokenizer)) / name
        if path.is_file():
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
    return eos_union(*found)


def sampling_params(req: GenRequest, *, seed: int | None = None) -> dict[str, Any]:
    """SGLang ``sampling_params`` for one request: every key that changes sampling, explicitly.

    Neutral values for what `GenRequest` does not model, so ``--preferred-sampling-params`` cannot
    fill them in. Only keys that exist from 0.5.2 to 0.5.23 (an unknown key is a 400 on 0.5.23
    and a 500 on 0.5.2); ``sampling_seed`` only when ``seed`` is given. ``no_stop_trim`` keeps
    the stop string in the ids we train on; text is decoded locally anyway.
    """
    params: dict[str, Any] = {
        "max_new_tokens": int(req.max_new_tokens), "stop": list(req.stop), "stop_token_ids": [],
        "temperature": float(req.temperature), "top_p": float(req.top_p), "top_k": -1,
        "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "repetition_penalty": 1.0, "min_new_tokens": 0, "n": 1, "json_schema": None,
        "regex": None, "ebnf": None, "structural_tag": None, "ignore_eos": False,
        "skip_special_tokens": False, "spaces_between_special_tokens": True,
        "no_stop_trim": True, "custom_params": None}
    if seed is not None:
        params["sampling_seed"] = int(seed)
    return params


# keys sampling_params() sets, and preferred keys that change nothing we read
_OVERRIDDEN = frozenset(sampling_params(GenRequest((0,)), seed=0))
_HARMLESS_PREFERRED = frozenset({"stream_interval"})


def _server_finish(fr: Any) -> str:
    kind = fr.get("type") if isinstance(fr, dict) else (str(fr) if fr else None)
    if kind == "stop":
        return "eos" if isinstance(fr.get("matched"), int) else "stop"
    return "length" if kind in (None, "length") else str(kind)


def parse_output(item: Any, req: GenRequest, tokenizer: TextTokenizer, where: str, *,
                 eos_ids: Collection[int] = (), prefixed_ids: bool = False,
                 weight_version: str | None = None) -> GenResult:
    """One element of SGLang's /generate response -> `GenResult` (malformed -> SGLangError).

    ``prefixed_ids``: the server is older than 0.5.5, so ``output_ids`` may start with up to 5
    prompt tokens. ``weight_version``: the version the last weight update set; a response from
    other weights raises. Ids, log-probs and finish reason are cut by `first_end`.
    """
    try:
        meta = item["meta_info"]
        lp_rows = meta.get("output_token_logprobs")
        if lp_rows is None:
            raise KeyError("meta_info.output_token_logprobs (was return_logprob sent?)")
        logprobs = [float(row[0]) if row[0] is not None else 0.0 for row in lp_rows]
        ids = [int(row[1]) for row in lp_rows]
        out_ids = item.get("output_ids")
        if out_ids is not None:
            out_ids = [int(t) for t in out_ids]
            extra = len(out_ids) - len(ids)
            prompt_tail = list(req.prompt_ids[len(req.prompt_ids) - extra:]) if extra > 0 else []
            ok = out_ids == ids or (
                prefixed_ids and 0 < extra <= PREFIXED_IDS_MAX and out_ids[extra:] == ids
                and out_ids[:extra] == prompt_tail)
            if not ok:
                raise ValueError(f"output_ids ({len(out_ids)}) and output_token_logprobs "
                                 f"({len(ids)}) name different tokens")
        fr = meta.get("finish_reason") or {}
        server_reason = _server_finish(fr)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise SGLangError(f"malformed /generate output from {where}: {exc!r}") from None
    if server_reason == "abort":
        raise SGLangError(f"SGLang at {where} aborted the request: {fr.get('message', fr)}")
    got_version = meta.get("weight_version")
    if weight_version is not None and got_version is not None and str(got_version) != weight_version:
        raise SGLangError(f"SGLang at {where} answered with weight_version {got_version!r}, but "
                          f"the last update set {weight_version!r}: another process replaced the "
                          f"weights, or the server restarted; push the weights again")
    sampled = len(ids)
    end = first_end(ids, req.stop, tokenizer.decode, eos_ids)
    if end is not None:
        cut, reason = end
        ids, logprobs = ids[:cut], logprobs[:cut]
    else:
        reason = server_reason
    return GenResult(token_ids=ids, logprobs=logprobs, text=tokenizer.decode(ids),
                     finish_reason=reason, entropies=None,
                     meta={"prompt_tokens": meta.get("prompt_tokens"),
                           "cached_tokens": meta.get("cached_tokens", 0),
                           "completion_tokens": meta.get("completion_tokens", sampled),
                           "overrun_tokens": sampled - len(ids),
                           "server_finish_reason": server_reason,
                           "weight_version": got_version})


def _error_message(resp: Any) -> str:
    """The server's own words from an error response (SGLang uses several shapes)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body.get("detail")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:500]
    return str(body)[:500]


class SGLangPolicy(TokenizerBacked):
    """`Policy` over an SGLang server (``url`` like ``http://127.0.0.1:30000``).

    ``tokenizer``: the model directory (or a tokenizer) the server was launched with — ids are
    encoded and decoded locally; from a directory the client also reads the EOS ids of
    ``config.json`` and ``generation_config.json`` (else pass ``eos_token_ids``).
    ``api_key`` / ``admin_api_key``: the server's ``--api-key`` / ``--admin-api-key``.
    ``timeout`` bounds each request (``connect_timeout`` the connection); connection errors,
    timeouts, HTTP 5xx and malformed JSON are retried ``retries`` times with exponential backoff
    (``backoff`` s, doubling), then raise `SGLangError` naming the URL; 4xx raise at once.
    ``seeds``: ``"auto"`` (send where accepted, warn once if ignored), ``"require"`` (refuse a
    server that ignores them), ``"off"``. ``version_check``: what a server below `MIN_VERSION`
    gets — ``"error"``, ``"warn"`` or ``"off"``. ``check_weight_version``: compare every
    response's ``weight_version`` with the last update's. ``stats`` accumulates
    prompt/cached/generated tokens (the RadixAttention hit rate is ``cached_tokens /
    prompt_tokens``) and ``overrun_tokens`` (sampled past a stop the server did not see).
    """

    def __init__(self, url: str, tokenizer: Any, *, api_key: str | None = None,
                 admin_api_key: str | None = None, timeout: float = 300.0,
                 connect_timeout: float = 10.0, retries: int = 3, backoff: float = 0.5,
                 seeds: SeedMode = "auto", version_check: VersionCheck = "error",
                 check_weight_version: bool = True, max_batch_size: int = 256,
                 eos_token_ids: Collection[int] | None = None):
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"SGLang url must start with http:// or https://, got {url!r}")
        if seeds not in ("auto", "require", "off"):
            raise ValueError(f"seeds must be 'auto', 'require' or 'off', got {seeds!r}")
        if version_check not in ("error", "warn", "off"):
            raise ValueError(f"version_check must be 'error', 'warn' or 'off', got {version_check!r}")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError(f"timeouts must be > 0, got timeout={timeout}, "
                             f"connect_timeout={connect_timeout}")
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        self.url = url.rstrip("/")
        if self.url.endswith("/generate"):
            self.url = self.url[: -len("/generate")]
        self.tokenizer = _load_tokenizer(tokenizer)
        self.eos_ids = frozenset(eos_token_ids) if eos_token_ids is not None else (
            eos_union(self.tokenizer) | _dir_eos_ids(tokenizer))
        self.api_key = api_key
        self.admin_api_key = admin_api_key
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.seeds = seeds
        self.version_check = version_check
        self.check_weight_version = bool(check_weight_version)
        self.max_batch_size = int(max_batch_size)
        self._client = httpx.Client(timeout=httpx.Timeout(float(timeout),
                                                          connect=float(connect_timeout)))
        self._info: ServerInfo | None = None
        self._weight_version: str | None = None
        self.stats = {"calls": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "overrun_tokens": 0}

    # -- HTTP ------------------------------------------------------------------------------------
    def _headers(self, admin: bool) -> dict[str, str]:
        key = (self.admin_api_key or self.api_key) if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _request(self, method: str, path: str, payload: Any = None, *,
                 admin: bool = False) -> tuple[int, Any]:
        """(status, parsed JSON or text) of a non-5xx answer; retries what may be transient."""
        import httpx

        url = f"{self.url}{path}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                resp = self._client.request(method, url, json=payload,
                                            headers=self._headers(admin))
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = exc
                continue
            if resp.status_code >= 500:
                last = SGLangError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                continue
            if resp.status_code in (401, 403):
                which = ("admin_api_key= (the server's --admin-api-key; it falls back to "
                         "api_key=)") if admin else "api_key= (the server's --api-key)"
                raise SGLangError(f"SGLang at {url} refused our credentials (HTTP "
                                  f"{resp.status_code}: {_error_message(resp)}); pass {which}, "
                                  f"e.g. TrainConfig.sglang")
            if resp.status_code >= 400:
                return resp.status_code, _error_message(resp)
            ctype = resp.headers.get("content-type", "")
            if not resp.content or "json" not in ctype:
                return resp.status_code, resp.text
            try:
                return resp.status_code, resp.json()
            except (json.JSONDecodeError, ValueError) as exc:
                last = SGLangError(f"malformed JSON ({exc}): {resp.text[:200]!r}")
                continue
        raise SGLangError(f"SGLang server at {url} failed after {self.retries + 1} attempts: "
                          f"{last!r}")

    def _get_info(self, paths: tuple[str, ...]) -> Any:
        for path in paths:
            status, body = self._request("GET", path)
            if status == 404:
                continue
            if status >= 400:
                raise SGLangError(f"SGLang at {self.url}{path} answered HTTP {status}: {body}")
            return body
        raise SGLangError(f"{self.url} does not look like an SGLang server: none of "
                          f"{', '.join(paths)} exists (HTTP 404)")

    def server_info(self, refresh: bool = False) -> ServerInfo:
        """Read the server's version and settings (once) and check them against our options."""
        if self._info is not None and not refresh:
            return self._info
        server = self._get_info(("/server_info", "/get_server_info"))
        ServerInfo.read_version(self.url, server)  # not SGLang: say so before asking for more
        info = ServerInfo.from_json(self.url, server,
                                    self._get_info(("/model_info", "/get_model_info")))
        if info.version < MIN_VERSION and self.version_check != "off":
            msg = (f"SGLang at {self.url} is version {_fmt(info.version)}; treegym needs >= "
                   f"{_fmt(MIN_VERSION)} (pip install -U 'sglang[all]'), or "
                   f"version_check='warn' to try anyway")
            if self.version_check == "error":
                raise SGLangError(msg)
            warnings.warn(msg, SGLangWarning, stacklevel=2)
        unknown = set(info.preferred_sampling_params) - _OVERRIDDEN - _HARMLESS_PREFERRED
        if unknown:
            raise SGLangError(f"SGLang at {self.url} was launched with --preferred-sampling-params "
                              f"setting {sorted(unknown)}, which this client cannot override on "
                              f"every supported release; rollouts would not sample from the "
                              f"policy. Relaunch without them")
        if self.seeds != "off" and not info.seeds_honoured:
            why = (f"it is version {_fmt(info.version)}, before sampling_seed ({_fmt(SEED_VERSION)})"
                   if not info.seeds_accepted else
                   "it was not launched with --enable-deterministic-inference")
            msg = (f"SGLang at {self.url} ignores per-request seeds ({why}): seeded rollouts will "
                   f"not repeat. To make them repeat, {DETERMINISTIC_COST}")
            if self.seeds == "require":
                raise SGLangError(msg + "; or pass seeds='auto' to accept unseeded sampling")
            warnings.warn(msg, SGLangWarning, stacklevel=2)
        self._info = info
        return info

    @property
    def context_length(self) -> int | None:
        """The server's ``context_length`` when it reports one (run_episode fits turns into it)."""
        return self.server_info().context_length

    def health(self) -> bool:
        """True when ``GET /health`` answers 200 (no retries: a probe; needs no key)."""
        import httpx

        try:
            return self._client.get(f"{self.url}/health", timeout=10.0).status_code == 200
        except httpx.HTTPError:
            return False

    def flush_cache(self) -> None:
        """Drop the radix cache (e.g. before timing a cold run). SGLang answers plain text, and
        HTTP 400 while requests are running."""
        status, body = self._request("POST", "/flush_cache", admin=True)
        if status >= 400:
            raise SGLangError(f"SGLang at {self.url}/flush_cache refused: HTTP {status}: {body}")

    def update_weights_from_disk(self, model_path: str | os.PathLike,
                                 weight_version: str | None = None) -> dict:
        """Load new weights into the running server (after a training step saved them).

        Sends ``weight_version`` (a fresh unique one when None); from then on every response
        must carry it. ``model_path`` must be readable *by the server* (same machine or shared
        file system), a Hugging Face directory of the same architecture.
        """
        info = self.server_info()
        version = str(weight_version) if weight_version is not None else (
            f"treegym-{uuid.uuid4().hex[:12]}")
        payload = {"model_path": str(model_path), "weight_version": version}
        status, out = self._request("POST", "/update_weights_from_disk", payload, admin=True)
        if status >= 400 or not isinstance(out, dict) or not out.get("success", False):
            message = out.get("message", out) if isinstance(out, dict) else out
            kept = self._weight_version or info.weight_version
            raise SGLangError(f"SGLang at {self.url} did not update its weights from "
                              f"{str(model_path)!r} (HTTP {status}): {message}. The path must be "
                              f"a Hugging Face model directory the server can read, with the "
                              f"architecture it was launched with; the server keeps its old "
                              f"weights (weight_version {kept!r})")
        self._weight_version = version
        return out

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, GenRequest):
                raise TypeError(f"requests[{i}] is a {type(r).__name__}, not a GenRequest")
        if not requests:
            return []
        info = self.server_info()
        send = self.seeds != "off" and info.seeds_accepted
        expect = self._weight_version if self.check_weight_version else None
        where = f"{self.url}/generate"
        results: list[GenResult] = []
        for start in range(0, len(requests), self.max_batch_size):
            chunk = requests[start:start + self.max_batch_size]
            params = [sampling_params(r, seed=_wire_seed(r.seed) if send else None) for r in chunk]
            payload = {"input_ids": [list(r.prompt_ids) for r in chunk], "sampling_params": params,
                       "return_logprob": True, "stream": False}
            status, out = self._request("POST", "/generate", payload)
            if status == 404:
                raise SGLangError(f"{where} does not exist (HTTP 404): not an SGLang server?")
            if status >= 400:
                raise SGLangError(f"SGLang at {where} rejected the request (HTTP {status}): {out}")
            if isinstance(out, dict) and len(chunk) == 1:
                out = [out]
            if not isinstance(out, list) or len(out) != len(chunk):
                raise SGLangError(f"SGLang at {where} returned {type(out).__name__} for a batch "
                                  f"of {len(chunk)} inputs")
            for req, item in zip(chunk, out):
                res = parse_output(item, req, self.tokenizer, where, eos_ids=self.eos_ids,
                                   prefixed_ids=info.prefixed_output_ids, weight_version=expect)
                self._count(req, res)
                results.append(res)
        self.stats["calls"] += 1
        return results

    def _count(self, req: GenRequest, res: GenResult) -> None:
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        self.stats["cached_tokens"] += int(res.meta.get("cached_tokens") or 0)
        self.stats["generated_tokens"] += len(res.token_ids)
        self.stats["overrun_tokens"] += int(res.meta.get("overrun_tokens") or 0)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"SGLangPolicy({self.url!r})"


def _wire_seed(seed: int | None) -> int:
    """The ``sampling_seed`` to send: 31 bits (0.5.3-0.5.5 keep seeds in int32), and a fresh
    random one for an unseeded request (a deterministic server would otherwise use 42 for all)."""
    return int(seed) & 0x7FFFFFFF if seed is not None else secrets.randbits(31)


class SGLangEnginePolicy(SGLangPolicy):
    """The same contract over an in-process ``sglang.Engine`` (offline, no HTTP).

    Needs ``pip install "sglang[all]"`` on a CUDA machine; ``engine_kwargs`` go to
    ``sglang.Engine(model_path=..., **engine_kwargs)`` (e.g. ``enable_deterministic_inference=
    True``). The engine returns the same dicts as the server, so parsing is shared. Not exercised
    on the CPU test machines.
    """

    def __init__(self, model_path: str, *, tokenizer: Any = None, seeds: SeedMode = "auto",
                 **engine_kwargs: Any):
        try:
            import sglang
        except ImportError as exc:
            raise ImportError("SGLangEnginePolicy needs the `sglang` package (a CUDA machine): "
                              "pip install 'sglang[all]'") from exc
        self.url = f"sglang.Engine({model_path})"
        tok_src = tokenizer if tokenizer is not None else model_path
        self.tokenizer = _load_tokenizer(tok_src)
        self.eos_ids = eos_union(self.tokenizer) | _dir_eos_ids(tok_src)
        self.seeds = seeds
        self.engine = sglang.Engine(model_path=str(model_path), **engine_kwargs)
        self._info = ServerInfo.from_json(self.url, self.engine.get_server_info(), {})
        if seeds == "require" and not self._info.seeds_honoured:
            raise SGLangError(f"{self.url} ignores per-request seeds; {DETERMINISTIC_COST}")
        self.stats = {"calls": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "overrun_tokens": 0}

    def server_info(self, refresh: bool = False) -> ServerInfo:
        return self._info

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        requests = list(requests)
        if not requests:
            return []
        send = self.seeds != "off" and self._info.seeds_accepted
        out = self.engine.generate(
            input_ids=[list(r.prompt_ids) for r in requests],
            sampling_params=[sampling_params(r, seed=_wire_seed(r.seed) if send else None)
                             for r in requests],
            return_logprob=True)
        if isinstance(out, dict):
            out = [out]
        results = []
        for req, item in zip(requests, out):
            res = parse_output(item, req, self.tokenizer, self.url, eos_ids=self.eos_ids,
                               prefixed_ids=self._info.prefixed_output_ids)
            self._count(req, res)
            results.append(res)
        self.stats["calls"] += 1
        return results

    def update_weights_from_disk(self, model_path: str | os.PathLike,
                                 weight_version: str | None = None) -> dict:
        """In-process: no other client can swap the weights, so no version is tracked
        (``Engine.update_weights_from_disk`` takes none in 0.5.23)."""
        ok = self.engine.update_weights_from_disk(str(model_path))
        success, message = (ok[0], ok[1]) if isinstance(ok, (tuple, list)) else (bool(ok), "")
        if not success:
            raise SGLangError(f"{self.url} did not update its weights from {str(model_path)!r}: "
                              f"{message}")
        return {"success": True, "message": message}

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def health(self) -> bool:
        return True

    def close(self) -> None:
        self.engine.shutdown()


__all__ = ["SGLangPolicy", "SGLangEnginePolicy", "SGLangError", "SGLangWarning", "ServerInfo",
           "MIN_VERSION", "sampling_params", "parse_output"]
