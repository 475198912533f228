"""treegym envs in verifiers (0.4, the v1 stack), through verifiers' own OpenEnv taskset.

Why no adapter class: verifiers already ships `verifiers.v1.tasksets.openenv`, which connects to
a running OpenEnv server by `base_url`, sends each model reply as the action (raw text when the
action schema has one required field: ours is `text`) and sums the step rewards. A `treegym
serve-env` server is such a server, unchanged. This module only

- builds the config (`env_config`) and the env (`load_environment`) for a served treegym env:
  one task per reset, `{"seed": s}` or `{"task_id": id}`;
- `evaluate(...)` runs verifiers' own eval runner (`verifiers.v1.cli.eval.runner.run_eval`) on it;
- `policy_app(policy)` serves any treegym `Policy` (e.g. `HFPolicy` on the committed warm start)
  as a small OpenAI-compatible `/v1/chat/completions` endpoint, so an eval runs fully offline.

Its chat template is treegym's transcript: a user turn that is verifiers' OpenEnv payload
(`{"observation": {...}, "action_schema": ...}`) contributes the observation's `text` (the env's
prompt, then each observation delta) and assistant turns their text, so the model sees exactly
the token sequence it sees in a treegym episode (prompt through `encode_prompt`, the rest through
`encode`), and generation stops at the env's stop strings.
"""

from __future__ import annotations

import json
import asyncio
import time
import uuid
from typing import Any, Iterable, Sequence

from treegym.integrations._requires import installed_version

VERIFIERS_SPEC = ">=0.4.0,<0.5"  # keep in step with pyproject's `verifiers` extra (the v1 stack)


def _check_verifiers() -> str:
    return installed_version("verifiers", VERIFIERS_SPEC, "verifiers")


VERIFIERS_VERSION = _check_verifiers()

from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402  (module level: FastAPI resolves annotations here)

from treegym.integrations.openenv import OPENENV_VERSION  # noqa: E402,F401  (checks OpenEnv's range too)


def resets(seeds: Iterable[int] | None = None, task_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One verifiers task per reset: seeded (the env draws the task) or by task id."""
    if (seeds is None) == (task_ids is None):
        raise ValueError("pass exactly one of seeds= or task_ids=")
    if task_ids is not None:
        return [{"task_id": str(t)} for t in task_ids]
    return [{"seed": int(s)} for s in seeds]


def env_config(base_url: str, *, seeds: Iterable[int] | None = None, task_ids: Sequence[str] | None = None,
               max_turns: int | None = 16, system_prompt: str | None = None):
    """verifiers' `OpenEnvEnvConfig` for a `treegym serve-env` server at `base_url`.

    The player runs verifiers' `null` harness (a plain chat loop, no tools) in a local
    subprocess; `max_turns` bounds it (the env ends every episode on its own anyway).
    """
    from verifiers.v1 import AgentConfig
    from verifiers.v1.harnesses.null import NullHarnessConfig
    from verifiers.v1.runtimes.subprocess import SubprocessConfig
    from verifiers.v1.tasksets.openenv import OpenEnvConfig, OpenEnvEnvConfig

    taskset = OpenEnvConfig(id="openenv", base_url=base_url.rstrip("/"), system_prompt=system_prompt,
                            resets=resets(seeds if seeds is not None or task_ids is not None else range(8),
                                          task_ids))
    player = AgentConfig(harness=NullHarnessConfig(id="null"), runtime=SubprocessConfig(), max_turns=max_turns)
    return OpenEnvEnvConfig(taskset=taskset, player=player)


def load_environment(base_url: str, **kwargs: Any):
    """The verifiers `Env` for a served treegym env (verifiers' `OpenEnvEnv`, unchanged)."""
    import verifiers.v1 as vf

    return vf.load_environment(env_config(base_url, **kwargs))


def evaluate(base_url: str, model_base_url: str, *, model: str = "treegym-tiny", rollouts_per_task: int = 1,
             output_dir: str | None = None, max_tokens: int = 64, temperature: float = 1.0,
             api_key: str = "none", **config_kwargs: Any) -> list:
    """Run verifiers' own eval (`run_eval`) of a served treegym env against an OpenAI-compatible
    endpoint; returns verifiers' `Episode`s (each has `reward` = the summed env rewards)."""
    import os

    from verifiers.v1 import EvalClientConfig
    from verifiers.v1.cli.eval.runner import run_eval
    from verifiers.v1.configs.cli.eval import EvalConfig

    os.environ.setdefault("TREEGYM_VF_API_KEY", api_key)
    # verifiers' null harness runs its chat program through `uv` (the `verifiers` extra installs
    # it beside this interpreter); make that one findable when the venv is not activated.
    import shutil
    import sys
    bindir = os.path.dirname(sys.executable)
    if shutil.which("uv") is None and os.path.exists(os.path.join(bindir, "uv")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    kwargs: dict[str, Any] = {}
    if output_dir is not None:
        kwargs["output_dir"] = output_dir
    config = EvalConfig(env=env_config(base_url, **config_kwargs), model=model,
                        client=EvalClientConfig(base_url=model_base_url.rstrip("/"), api_key_var="TREEGYM_VF_API_KEY"),
                        sampling={"max_tokens": max_tokens, "temperature": temperature},
                        num_rollouts=rollouts_per_task, rich=None, **kwargs)
    return asyncio.run(run_eval(config))


# ----------------------------------------------------------------------------------------------
# An OpenAI-compatible endpoint for a treegym Policy


def _turn_text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if message.get("role") == "user":
        try:
            payload = json.loads(content)
        except (json.JSONDecodeError, TypeError):
            return content
        if isinstance(payload, dict) and isinstance(payload.get("observation"), dict):
            return str(payload["observation"].get("text", ""))
    return content


def policy_app(policy: Any, *, model_name: str = "treegym-tiny", stop: Sequence[str] = ("</search>", "</answer>"),
               max_new_tokens: int = 256, max_request_bytes: int = 1 << 20):
    """A FastAPI app serving `policy` at `/v1/chat/completions` (non-streaming) and `/v1/models`.

    One request at a time (a lock): it is for offline evals of small models, not a server farm.
    """
    from treegym.agents.base import GenRequest

    app = FastAPI(title="treegym policy (OpenAI-compatible)")
    lock = asyncio.Lock()  # not a threading.Lock: a waiter must not block the event loop

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "treegym"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        if len(raw) > max_request_bytes:
            raise HTTPException(413, f"request over {max_request_bytes} bytes")
        try:
            body = json.loads(raw)
            messages = [m for m in body["messages"] if m.get("role") in ("user", "assistant")]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HTTPException(400, "expected a JSON body with a messages list") from None
        if not messages or messages[0].get("role") != "user":
            raise HTTPException(400, "the conversation must start with a user message")
        texts = [_turn_text(m) for m in messages]
        ids = list(policy.encode_prompt(texts[0]))
        for t in texts[1:]:
            ids += list(policy.encode(t)) if t else []
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or max_new_tokens)
        req = GenRequest(prompt_ids=tuple(ids), max_new_tokens=max(1, min(n, max_new_tokens)),
                         temperature=float(body.get("temperature") if body.get("temperature") is not None else 1.0),
                         top_p=float(body.get("top_p") or 1.0), stop=tuple(stop),
                         seed=body.get("seed") if isinstance(body.get("seed"), int) else None)
        async with lock:
            res = (await asyncio.to_thread(policy.generate, [req]))[0]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        finish = "length" if res.finish_reason == "length" else "stop"
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(res.token_ids),
                 "total_tokens": len(ids) + len(res.token_ids)}
        if not body.get("stream"):
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                 "finish_reason": finish}], "usage": usage}
        # Streaming (OpenAI's SSE chunks): the whole reply in one delta, then the finish, the usage.
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
        chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": res.text},
                                        "finish_reason": None}]},
                  {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
                  {**base, "choices": [], "usage": usage}]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return StreamingResponse(iter([sse]), media_type="text/event-stream")

    return app


__all__ = ["VERIFIERS_SPEC", "resets", "env_config", "load_environment", "evaluate", "policy_app"]
