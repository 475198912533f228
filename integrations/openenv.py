"""Serve any treegym env through OpenEnv's own server, with fork / snapshot / restore on top.

Why: OpenEnv (the `openenv` package, formerly `openenv-core`) is the env hub that TRL, SkyRL,
torchforge, verifiers and others already speak; its RFC 002 leaves branching an episode to
"systems built on top". This module is that system for treegym's forkable envs:

- `make_app(env_id, **make_kwargs)` builds the app with OpenEnv's `create_app` (its `/reset`,
  `/step`, `/state`, `/schema`, `/health` and the WebSocket `/ws` sessions), and adds three calls
  no other OpenEnv env has: `fork` (a new session that continues from this one), `snapshot` (an
  opaque token) and `restore(token)`. Over HTTP they are plain routes (`POST /fork`, `/snapshot`,
  `/restore`, `/close`, `GET /sessions/{id}`); over a WebSocket they are MCP `tools/call` messages
  on the same connection (OpenEnv routes those to the env's `mcp_client`).
- HTTP sessions: OpenEnv's `/reset` and `/step` are stateless (a fresh env per request), so every
  treegym session lives in one `SessionStore`; `/reset` without a `session_id` opens one and
  returns its id in the observation, `/step` names it. A WebSocket connection owns the session
  it opens and frees it when the socket closes, however it closes.
- Bounds: max sessions, idle-session expiry, max snapshot tokens (LRU), max action length
  (the env's own `MAX_ACTION_CHARS`), max request bytes (HTTP bodies and WebSocket messages).
  A bad request gets a 4xx with a JSON `{"error", "code"}` body (a WebSocket error message),
  never a crash, and no other session notices.
- `TreeGymEnvClient` is an OpenEnv `EnvClient` (async, `.sync()` or plain sync calls) with
  `fork()`, `snapshot()` and `restore(token)`, over WebSocket (default) or HTTP.
- `RemoteEnv` is a treegym `ForkableEnv` whose state lives on a server, so
  `treegym.tree.rollout.chain / tree_grpo / entropy` run against served envs: pass a
  `TreeGymEnvClient` (or a `RemoteEnv`) where a local env goes.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib.metadata
import json
import secrets
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from treegym.integrations._requires import installed_version

OPENENV_SPEC = ">=0.4.1,<0.4.2"  # keep in step with pyproject's `openenv` extra


def _check_openenv() -> str:
    """openenv-core (<= 0.3.0) was renamed `openenv`; verifiers 0.4's OpenEnv taskset needs
    openenv >= 0.4.1, and 0.4.1 is the one release that installs beside verifiers 0.4.0."""
    try:
        return installed_version("openenv", OPENENV_SPEC, "openenv")
    except ImportError as exc:
        try:
            old = importlib.metadata.version("openenv-core")
        except importlib.metadata.PackageNotFoundError:
            raise exc from None
        raise ImportError(f"{exc} (found openenv-core {old}: OpenEnv's package before its rename; "
                          "uninstall it first, both install the `openenv` module)") from None


OPENENV_VERSION = _check_openenv()

import gymnasium as gym  # noqa: E402
import httpx  # noqa: E402
from fastapi import Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from gymnasium.error import ResetNeeded  # noqa: E402
from openenv.core import EnvClient  # noqa: E402
from openenv.core.client_types import StepResult  # noqa: E402
from openenv.core.env_server import create_app  # noqa: E402
from openenv.core.env_server.interfaces import Environment  # noqa: E402
from openenv.core.env_server.types import Action, ConcurrencyConfig, Observation, State  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402

import treegym  # noqa: E402,F401  (registers the envs)
from treegym.envs.core import EnvState, ForkableEnv, FreeText, unwrapped_forkable  # noqa: E402
from treegym.envs.protocol import MAX_ACTION_CHARS  # noqa: E402

MAX_ID_CHARS = 64

# ----------------------------------------------------------------------------------------------
# Wire types (OpenEnv's pydantic models; `/schema` publishes them)


class TreeGymAction(Action):
    """The model's reply, verbatim: the env parses `<search>`/`<answer>` itself.

    One required field, so verifiers' OpenEnv taskset sends a raw model reply as `text`.
    """

    text: str = Field(..., max_length=MAX_ACTION_CHARS,
                      description="the model's reply, e.g. '<search> query </search>'")

    @field_validator("text", mode="before")
    @classmethod
    def _scalar_to_text(cls, value: Any) -> Any:
        # A reply that happens to parse as JSON (a number, a list) is still the reply's text.
        if value is None or isinstance(value, (bool, int, float, list)):
            return json.dumps(value)
        return value


class TreeGymObservation(Observation):
    """`text` is the full prompt after reset and the observation delta after a step."""

    text: str = ""
    session_id: Optional[str] = None
    info: dict[str, Any] = Field(default_factory=dict)


class TreeGymState(State):
    session_id: Optional[str] = None
    env_id: str = ""
    task_id: Optional[str] = None
    turn: int = 0
    tool_calls: int = 0
    terminated: bool = False
    truncated: bool = False
    reward: float = 0.0


class _SessionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str = Field(..., min_length=1, max_length=MAX_ID_CHARS)


class _RestoreRequest(_SessionRef):
    token: str = Field(..., min_length=1, max_length=200)


# ----------------------------------------------------------------------------------------------
# Sessions


class RequestError(Exception):
    """A client mistake: becomes a 4xx JSON response (HTTP) or an error message (WebSocket)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Session:
    env: gym.Env
    lock: threading.Lock
    last_used: float


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 256
    idle_timeout_s: float = 600.0
    max_snapshots: int = 65_536
    max_request_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_snapshots", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if self.max_request_bytes < 2 * MAX_ACTION_CHARS:
            raise ValueError(f"max_request_bytes must leave room for a {MAX_ACTION_CHARS}-char action "
                             f"(>= {2 * MAX_ACTION_CHARS}), got {self.max_request_bytes}")


class SessionStore:
    """Every served episode, by id. Sessions are `treegym.fork`s of one prototype env, so they
    share its corpus, retriever and caches; snapshot tokens map to `treegym.snapshot` values
    (O(1), structure-sharing), kept in a bounded LRU.

    Tokens start with the server's fingerprint (env id, make kwargs, task ids), so a token from
    another env or dataset is refused by name rather than restored into the wrong world.
    """

    def __init__(self, env_id: str, make_kwargs: dict[str, Any], limits: ServerLimits = ServerLimits()):
        self.env_id, self.make_kwargs, self.limits = env_id, dict(make_kwargs), limits
        self.proto = gym.make(env_id, **make_kwargs)
        core = unwrapped_forkable(self.proto)
        tasks = getattr(core, "tasks", ())
        ids = "\n".join(getattr(t, "id", "") for t in tasks)
        key = json.dumps([env_id, sorted((k, repr(v)) for k, v in make_kwargs.items()),
                          hashlib.sha256(ids.encode()).hexdigest()])
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
        self.stop_strings = tuple(getattr(core, "stop_strings", ()) or ())
        self._sessions: dict[str, _Session] = {}
        self._snapshots: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    def create(self, parent: str | None = None) -> str:
        """A new session: a fresh fork of the prototype, or a fork of session `parent`."""
        self.expire_idle()
        source = self.proto
        if parent is not None:
            sess = self.get(parent)
            with sess.lock:
                env = treegym.fork(sess.env)
        else:
            env = treegym.fork(source)
        sid = secrets.token_hex(16)
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise RequestError(503, "capacity", f"server is at its limit of {self.limits.max_sessions} "
                                   "sessions; close one (POST /close) or wait for idle ones to expire "
                                   f"({self.limits.idle_timeout_s:g} s)")
            self._sessions[sid] = _Session(env, threading.Lock(), time.monotonic())
        return sid

    def get(self, sid: Any) -> _Session:
        if not isinstance(sid, str) or not sid:
            raise RequestError(400, "missing_session", "session_id is required (a string returned by "
                               "reset or fork)")
        now = time.monotonic()
        with self._lock:
            sess = self._sessions.get(sid)
            if sess is not None and sess.last_used < now - self.limits.idle_timeout_s:
                del self._sessions[sid]  # expired: refuse it even before a sweep runs
                sess.env.close()
                sess = None
            if sess is not None:
                sess.last_used = now
        if sess is None:
            raise RequestError(404, "unknown_session", f"no session {sid[:MAX_ID_CHARS]!r}: it never existed, "
                               f"was closed, or expired after {self.limits.idle_timeout_s:g} s idle")
        return sess

    def close(self, sid: str) -> bool:
        with self._lock:
            sess = self._sessions.pop(sid, None)
        if sess is not None:
            sess.env.close()
        return sess is not None

    def expire_idle(self) -> int:
        cutoff = time.monotonic() - self.limits.idle_timeout_s
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if s.last_used < cutoff]
        return sum(self.close(sid) for sid in stale)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: object) -> bool:
        return sid in self._sessions

    # -- episode calls --------------------------------------------------------------------------
    def reset(self, sid: str, seed: int | None, task_id: str | None) -> TreeGymObservation:
        sess = self.get(sid)
        with sess.lock:
            try:
                text, info = sess.env.reset(seed=seed, options={"task_id": task_id} if task_id else None)
            except ValueError as exc:  # unknown task id
                raise RequestError(400, "bad_reset", str(exc)) from None
        return TreeGymObservation(text=text, session_id=sid, info=_jsonable(info), done=False, reward=None)

    def step(self, sid: str, text: str) -> TreeGymObservation:
        sess = self.get(sid)
        with sess.lock:
            try:
                obs, reward, terminated, truncated, info = sess.env.step(text)
            except ResetNeeded as exc:
                raise RequestError(409, "reset_needed", str(exc)) from None
        info = {**_jsonable(info), "terminated": bool(terminated), "truncated": bool(truncated)}
        return TreeGymObservation(text=obs, session_id=sid, info=info, done=bool(terminated or truncated),
                                  reward=float(reward))

    def state(self, sid: str) -> TreeGymState:
        sess = self.get(sid)
        st = unwrapped_forkable(sess.env).state
        return TreeGymState(session_id=sid, env_id=self.env_id, step_count=st.turn,
                            task_id=getattr(st.task, "id", None), turn=st.turn, tool_calls=st.tool_calls,
                            terminated=st.terminated, truncated=st.truncated, reward=float(st.reward))

    def snapshot(self, sid: str) -> str:
        sess = self.get(sid)
        with sess.lock:
            snap = treegym.snapshot(sess.env)
        token = f"{self.fingerprint}.{secrets.token_urlsafe(12)}"
        with self._lock:
            self._snapshots[token] = snap
            while len(self._snapshots) > self.limits.max_snapshots:
                self._snapshots.popitem(last=False)
        return token

    def restore(self, sid: str, token: Any) -> None:
        if not isinstance(token, str) or "." not in token:
            raise RequestError(400, "bad_token", "token must be a string returned by snapshot")
        prefix = token.split(".", 1)[0]
        if prefix != self.fingerprint:
            raise RequestError(409, "foreign_token", f"snapshot token was taken on another env or dataset "
                               f"(fingerprint {prefix[:16]!r}); this server serves {self.env_id} "
                               f"{self.make_kwargs} (fingerprint {self.fingerprint!r})")
        with self._lock:
            snap = self._snapshots.get(token)
            if snap is not None:
                self._snapshots.move_to_end(token)
        if snap is None:
            raise RequestError(410, "stale_token", "unknown or stale snapshot token: the server keeps the "
                               f"{self.limits.max_snapshots} most recently used snapshots and forgets all "
                               "of them on restart")
        sess = self.get(sid)
        with sess.lock:
            treegym.restore(sess.env, snap)


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(info, default=str))


# ----------------------------------------------------------------------------------------------
# The OpenEnv Environment: a handle on one session of the store

# "http" while OpenEnv's stateless HTTP routes build a handle (set by _Guard below, which runs in
# the request's context); WebSocket sessions build theirs in an executor thread, which sees the
# default. Only WebSocket handles own (and so free) the session they open.
_TRANSPORT: contextvars.ContextVar[str] = contextvars.ContextVar("treegym_openenv_transport",
                                                                 default="websocket")

_TOOLS = [
    {"name": "fork_from", "description": "bind this connection to a new session that continues from "
     "session_id's state", "inputSchema": {"type": "object", "properties": {"session_id": {"type": "string"}},
                                           "required": ["session_id"]}},
    {"name": "snapshot", "description": "an opaque token for this session's state",
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "restore", "description": "set this session's state to a snapshot token's",
     "inputSchema": {"type": "object", "properties": {"token": {"type": "string"}}, "required": ["token"]}},
    {"name": "session", "description": "this session's id and state", "inputSchema": {"type": "object",
                                                                                       "properties": {}}},
]


class _ExtensionTools:
    """fork / snapshot / restore for a WebSocket session, as OpenEnv MCP tools.

    OpenEnv hands `{"type": "mcp", "data": {"method": "tools/call", ...}}` messages to the env's
    `mcp_client`; this duck-types the three calls it makes (`is_connected`, `list_tools`,
    `call_tool`) so the extension rides OpenEnv's own WebSocket protocol on the same connection.
    """

    def __init__(self, handle: TreeGymEnvironment):
        self._handle = handle

    def is_connected(self) -> bool:
        return True

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    async def list_tools(self) -> list[dict[str, Any]]:
        return [dict(t) for t in _TOOLS]

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return {"ok": True, **self._handle.extension(name, dict(arguments or {}))}
        except RequestError as exc:
            return {"ok": False, "error": exc.message, "code": exc.code, "status": exc.status}


class TreeGymEnvironment(Environment[TreeGymAction, TreeGymObservation, TreeGymState]):
    """OpenEnv's view of one treegym session. Cheap: the env itself lives in the `SessionStore`."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, store: SessionStore):
        super().__init__()
        self._store = store
        self._owns = _TRANSPORT.get() != "http"
        self.session_id: str | None = None
        self.mcp_client = _ExtensionTools(self) if self._owns else None

    def _own(self) -> str:
        if self.session_id is None:
            self.session_id = self._store.create()
        return self.session_id

    def reset(self, seed: int | None = None, episode_id: str | None = None, session_id: str | None = None,
              task_id: str | None = None, **unknown: Any) -> TreeGymObservation:
        if unknown:
            raise RequestError(400, "bad_reset", f"unknown reset fields {sorted(unknown)}; accepted: seed, "
                               "episode_id, session_id, task_id")
        if task_id is not None and not isinstance(task_id, str):
            raise RequestError(400, "bad_reset", f"task_id must be a string, got {task_id!r}")
        if self._owns:
            if session_id is not None and session_id != self.session_id:
                raise RequestError(400, "bad_reset", "a WebSocket connection is its own session; to continue "
                                   "another session use the fork_from tool")
            if self.session_id is not None and self.session_id not in self._store:
                self.session_id = None  # expired while idle: a reset starts a fresh one
            sid = self._own()
        else:
            sid = session_id if session_id is not None else self._store.create()
        return self._store.reset(sid, seed, task_id)

    def step(self, action: TreeGymAction, session_id: str | None = None, **_: Any) -> TreeGymObservation:
        if self._owns:
            if self.session_id is None:
                raise RequestError(409, "reset_needed", "call reset before step")
            sid = self.session_id  # if it expired meanwhile, the store says so (404)
        else:
            sid = session_id
        return self._store.step(sid, action.text)

    @property
    def state(self) -> TreeGymState:
        if self.session_id is None:
            return TreeGymState(env_id=self._store.env_id)
        return self._store.state(self.session_id)

    def extension(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        store = self._store
        if name == "fork_from":
            new = store.create(parent=args.get("session_id"))
            if self.session_id is not None:
                store.close(self.session_id)
            self.session_id = new
            return {"session_id": new, "state": store.state(new).model_dump()}
        sid = self._own()
        if name == "snapshot":
            return {"token": store.snapshot(sid)}
        if name == "restore":
            store.restore(sid, args.get("token"))
            return {"state": store.state(sid).model_dump()}
        if name == "session":
            return {"session_id": sid, "state": store.state(sid).model_dump()}
        raise RequestError(404, "unknown_tool", f"unknown tool {name!r}; tools: "
                           + ", ".join(t["name"] for t in _TOOLS))

    def close(self) -> None:
        # OpenEnv calls this when the socket closes (however it closes) and when its idle reaper
        # drops the connection's session; keep the id so a later message hears "expired", not
        # "call reset".
        if self._owns and self.session_id is not None:
            self._store.close(self.session_id)


# ----------------------------------------------------------------------------------------------
# The app


class _Guard:
    """ASGI middleware: tags the transport for handles and bounds HTTP bodies (413 with JSON)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = _TRANSPORT.set("http")
        try:
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return await self.app(scope, _replay(message), send)
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await JSONResponse({"error": f"request body over {self.max_bytes} bytes",
                                               "code": "too_large"}, status_code=413)(scope, receive, send)
            return await self.app(scope, _replay({"type": "http.request", "body": body,
                                                  "more_body": False}, then=receive), send)
        finally:
            _TRANSPORT.reset(token)


def _replay(first: dict, then=None):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return first
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}
    return receive


def make_app(env_id: str = "TreeSearchQA-v0", limits: ServerLimits = ServerLimits(), **make_kwargs: Any):
    """The FastAPI app: OpenEnv's `create_app` around a `SessionStore`, plus the fork routes.

    Raises (at start, not per request) whatever `gym.make(env_id, **make_kwargs)` raises. Serve it
    with `uvicorn.run(app, ws_max_size=limits.max_request_bytes)` to bound WebSocket messages too
    (`treegym serve-env` does).
    """
    store = SessionStore(env_id, make_kwargs, limits)

    def factory() -> TreeGymEnvironment:
        return TreeGymEnvironment(store)

    factory.__name__ = f"treegym:{env_id}"
    app = create_app(factory, TreeGymAction, TreeGymObservation, env_name=env_id,
                     concurrency_config=ConcurrencyConfig(max_concurrent_envs=limits.max_sessions,
                                                          session_timeout=limits.idle_timeout_s))
    app.state.treegym_store = store

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.status)

    @app.post("/fork", tags=["treegym"])
    def fork_route(body: _SessionRef) -> dict[str, Any]:
        """A new session continuing from `session_id`'s state (the original is untouched)."""
        new = store.create(parent=body.session_id)
        return {"session_id": new, "state": store.state(new).model_dump()}

    @app.post("/snapshot", tags=["treegym"])
    def snapshot_route(body: _SessionRef) -> dict[str, Any]:
        return {"token": store.snapshot(body.session_id)}

    @app.post("/restore", tags=["treegym"])
    def restore_route(body: _RestoreRequest) -> dict[str, Any]:
        store.restore(body.session_id, body.token)
        return {"state": store.state(body.session_id).model_dump()}

    @app.post("/close", tags=["treegym"])
    def close_route(body: _SessionRef) -> dict[str, Any]:
        if not store.close(body.session_id):
            store.get(body.session_id)  # raises the 404
        return {"closed": True}

    @app.get("/sessions/{session_id}", tags=["treegym"])
    def state_route(session_id: str) -> dict[str, Any]:
        return store.state(session_id[:MAX_ID_CHARS + 1]).model_dump()

    @app.get("/treegym", tags=["treegym"])
    def info_route() -> dict[str, Any]:
        store.expire_idle()
        return {"env_id": env_id, "make_kwargs": {k: repr(v) for k, v in make_kwargs.items()},
                "fingerprint": store.fingerprint, "stop_strings": list(store.stop_strings),
                "max_action_chars": MAX_ACTION_CHARS, "sessions": len(store),
                "limits": limits.__dict__, "openenv": OPENENV_VERSION}

    app.add_middleware(_Guard, max_bytes=limits.max_request_bytes)
    return app


# ----------------------------------------------------------------------------------------------
# Clients


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every client: httpx builds a new one (loading the CA bundle, ~30 ms) per
    client otherwise, and every fork makes a client."""
    return ssl.create_default_context()


def _raise_for(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text}
    if response.status_code >= 400:
        detail = body.get("error") or body.get("detail") or body
        if body.get("code") == "reset_needed":
            raise ResetNeeded(str(detail))
        raise RemoteEnvError(response.status_code, body.get("code"), str(detail))
    return body


class RemoteEnvError(RuntimeError):
    """The server refused a call; `status` and `code` say why (see the server's `RequestError`)."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(f"HTTP {status} ({code}): {message}" if code else f"HTTP {status}: {message}")
        self.status, self.code = status, code


class TreeGymEnvClient(EnvClient[TreeGymAction, TreeGymObservation, TreeGymState]):
    """OpenEnv client for a served treegym env, with fork / snapshot / restore.

    Async (`await client.reset()`) or sync (plain calls, or `.sync()`), as every OpenEnv client.
    `transport="ws"` (default) keeps one WebSocket per session; `transport="http"` addresses the
    session by id over OpenEnv's `/reset` and `/step`. `fork()` returns a new connected client of
    the same transport on the new session; close it when done.
    """

    def __init__(self, base_url: str, *, transport: str = "ws", session_id: str | None = None,
                 http_timeout_s: float = 60.0, **kwargs: Any):
        if transport not in ("ws", "http"):
            raise ValueError(f"transport must be 'ws' or 'http', got {transport!r}")
        super().__init__(base_url=base_url, **kwargs)
        self.transport = transport
        self.session_id = session_id
        self._http_timeout = http_timeout_s
        self._http: httpx.AsyncClient | None = None

    # -- OpenEnv's hooks --------------------------------------------------------------------------
    def _step_payload(self, action: TreeGymAction | str) -> dict[str, Any]:
        if isinstance(action, str):
            return {"text": action}
        return action.model_dump(exclude={"metadata"})

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[TreeGymObservation]:
        obs = TreeGymObservation(**payload.get("observation", {}), reward=payload.get("reward"),
                                 done=payload.get("done", False))
        if obs.session_id:
            self.session_id = obs.session_id
        return StepResult(observation=obs, reward=payload.get("reward"), done=payload.get("done", False))

    def _parse_state(self, payload: dict[str, Any]) -> TreeGymState:
        return TreeGymState(**payload)

    # -- HTTP transport -----------------------------------------------------------------------------
    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self._base_url, timeout=self._http_timeout, verify=_tls())
        return _raise_for(await self._http.post(path, json=body))

    def _need_session(self) -> str:
        if self.session_id is None:
            raise RuntimeError("this client has no session yet: call reset() first")
        return self.session_id

    async def _reset_async(self, **kwargs: Any) -> StepResult[TreeGymObservation]:
        if self.transport == "ws":
            return await super()._reset_async(**kwargs)
        if self.session_id is not None:
            kwargs.setdefault("session_id", self.session_id)
        return self._parse_result(await self._post("/reset", kwargs))

    async def _step_async(self, action: Any, **kwargs: Any) -> StepResult[TreeGymObservation]:
        if self.transport == "ws":
            return await super()._step_async(action, **kwargs)
        body = {"action": self._step_payload(action), "session_id": self._need_session()}
        return self._parse_result(await self._post("/step", body))

    async def _state_async(self) -> TreeGymState:
        if self.transport == "ws":
            return await super()._state_async()
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self._base_url, timeout=self._http_timeout, verify=_tls())
        return self._parse_state(_raise_for(await self._http.get(f"/sessions/{self._need_session()}")))

    async def _tool(self, name: str, **arguments: Any) -> dict[str, Any]:
        """One extension call over this client's WebSocket (an OpenEnv MCP message)."""
        response = await self._send_and_receive({"type": "mcp", "data": {
            "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}})
        rpc = response.get("data", {})
        if "error" in rpc and rpc["error"]:
            raise RemoteEnvError(500, "mcp", str(rpc["error"].get("message", rpc["error"])))
        result = rpc.get("result") or {}
        if not result.get("ok"):
            raise RemoteEnvError(result.get("status", 400), result.get("code"), result.get("error", str(result)))
        if result.get("session_id"):
            self.session_id = result["session_id"]
        return result

    # -- the extension calls -------------------------------------------------------------------------
    async def _become_fork_of(self, parent: str) -> TreeGymEnvClient:
        # Runs on the child's own loop: a WebSocket belongs to the loop that opened it.
        if self.transport == "http":
            self.session_id = (await self._post("/fork", {"session_id": parent}))["session_id"]
        else:
            await self._tool("fork_from", session_id=parent)
        return self

    async def _snapshot_async(self) -> str:
        if self.transport == "http":
            return (await self._post("/snapshot", {"session_id": self._need_session()}))["token"]
        return (await self._tool("snapshot"))["token"]

    async def _restore_async(self, token: str) -> TreeGymState:
        if self.transport == "http":
            state = (await self._post("/restore", {"session_id": self._need_session(), "token": token}))["state"]
        else:
            state = (await self._tool("restore", token=token))["state"]
        return TreeGymState(**state)

    async def _close_async(self) -> None:
        if self.transport == "http":
            try:
                if self.session_id is not None:
                    await self._post("/close", {"session_id": self.session_id})
            except (RemoteEnvError, httpx.HTTPError):
                pass  # already gone (closed or expired)
            finally:
                self.session_id = None
                if self._http is not None:
                    await self._http.aclose()
                    self._http = None
        await super()._close_async()

    def fork(self) -> Any:
        """A new client on a new server session that continues from this one's state."""
        parent = self._need_session()
        child = TreeGymEnvClient(self._base_url, transport=self.transport, http_timeout_s=self._http_timeout)
        return child._dispatch(lambda: child._become_fork_of(parent))

    def snapshot(self) -> Any:
        """An opaque token for this session's current state (valid on this server only)."""
        return self._dispatch(self._snapshot_async)

    def restore(self, token: str) -> Any:
        """Set this session's state to the token's (any session of the same server)."""
        return self._dispatch(lambda: self._restore_async(token))

    def __treegym_env__(self) -> RemoteEnv:
        """The hook `treegym.fork/snapshot/restore` (and so `treegym.tree.rollout`) use for a
        non-local env: a `RemoteEnv` on this client's session (forks go over HTTP)."""
        return RemoteEnv(self._base_url, session_id=self.session_id)


@dataclass(frozen=True)
class RemoteState(EnvState):
    """A client-side mirror of a served episode's state; `token` names it on the server."""

    token: str | None = None


class RemoteEnv(ForkableEnv):
    """A treegym `ForkableEnv` whose episode lives on a `treegym serve-env` server.

    Gymnasium API (`reset` → (prompt, info), `step` → 5-tuple), so a tree rollout runs on it
    unchanged. The transcript is mirrored locally (the client saw every action and observation);
    `snapshot()` asks the server for a token, `restore()` sends it back, `fork()` opens a new
    session — one HTTP round trip each. Forks share one HTTP connection pool. A `RemoteEnv`
    attached to an existing session (`session_id=`) mirrors its counters, not its past transcript.
    """

    def __init__(self, base_url: str, session_id: str | None = None, *, timeout_s: float = 60.0,
                 _http: httpx.Client | None = None, _info: dict[str, Any] | None = None):
        self._http = _http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, verify=_tls())
        self.base_url = base_url
        self._server = _info or _raise_for(self._http.get("/treegym"))
        self.session_id = session_id
        self._owns = False  # a session this object opened (reset/fork), closed with it; never an attached one
        self.observation_space = FreeText(1 << 20)
        self.action_space = FreeText(self._server["max_action_chars"])
        self.state = RemoteState()
        if session_id is not None:
            self._sync_state()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self._server["stop_strings"])

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _raise_for(self._http.post(path, json=body))

    def _sync_state(self) -> None:
        s = _raise_for(self._http.get(f"/sessions/{self.session_id}"))
        self.state = replace(self.state, turn=s["turn"], tool_calls=s["tool_calls"],
                             terminated=s["terminated"], truncated=s["truncated"], reward=s["reward"])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        body: dict[str, Any] = {"seed": seed} if seed is not None else {}
        if options.get("task_id") is not None:
            body["task_id"] = options.pop("task_id")
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; accepted: 'task_id'")
        if self.session_id is not None:
            body["session_id"] = self.session_id
        out = self._post("/reset", body)
        obs = out["observation"]
        if self.session_id is None:
            self._owns = True
        self.session_id = obs["session_id"]
        self.state = RemoteState(prompt=obs["text"], episode_seed=seed)
        return obs["text"], obs["info"]

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}")
        if self.session_id is None:
            raise ResetNeeded("call reset() before step()")
        out = self._post("/step", {"action": {"text": action}, "session_id": self.session_id})
        obs, info = out["observation"]["text"], out["observation"]["info"]
        term, trunc, reward = info["terminated"], info["truncated"], float(out["reward"] or 0.0)
        self.state = self.state.with_step(action, obs, info["valid_action"], info.get("tool"), turn=info["turn"],
                                          tool_calls=info["tool_calls"], terminated=term, truncated=trunc,
                                          reward=reward, token=None)
        return obs, reward, term, trunc, info

    def snapshot(self) -> RemoteState:
        if self.session_id is None:
            raise ResetNeeded("call reset() before snapshot()")
        if self.state.token is None:
            self.state = replace(self.state, token=self._post("/snapshot", {"session_id": self.session_id})["token"])
        return self.state

    def restore(self, state: EnvState) -> None:
        if not isinstance(state, RemoteState) or state.token is None:
            raise TypeError("RemoteEnv.restore() takes a RemoteState from RemoteEnv.snapshot(), got "
                            f"{type(state).__name__}")
        if self.session_id is None:
            self.session_id = self._post("/reset", {})["observation"]["session_id"]
            self._owns = True
        self._post("/restore", {"session_id": self.session_id, "token": state.token})
        self.state = state

    def fork(self) -> RemoteEnv:
        if self.session_id is None:
            return RemoteEnv(self.base_url, _http=self._http, _info=self._server)
        new = self._post("/fork", {"session_id": self.session_id})["session_id"]
        child = RemoteEnv(self.base_url, _http=self._http, _info=self._server)
        child.session_id, child.state, child._owns = new, self.state, True
        return child

    def close(self) -> None:
        """Free the server session if this object opened it (an attached one stays open)."""
        sid, self.session_id = self.session_id, None
        if sid is not None and self._owns:
            try:
                self._post("/close", {"session_id": sid})
            except (RemoteEnvError, httpx.HTTPError):
                pass  # expired already

    def __del__(self):  # forks a rollout drops free their server session at once
        if not hasattr(self, "_owns"):
            return
        try:
            self.close()
        except Exception:
            pass


class ServeEnvProcess:
    """`treegym serve-env` in a child process on a free 127.0.0.1 port, for scripts and tests:
    `with ServeEnvProcess("TreeSearchQA-v0", ["--data", "synthetic:multihop"]) as s: s.url`."""

    def __init__(self, env_id: str = "TreeSearchQA-v0", args: Sequence[str] = (), *, timeout_s: float = 60.0):
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        import tempfile
        self._log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen([sys.executable, "-m", "treegym.cli", "serve-env", "--env", env_id,
                                      "--port", str(self.port), *args], stderr=self._log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"serve-env exited with {self.proc.returncode}: {self._log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve-env did not answer on {self.url} within {timeout_s:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self._log.close()

    def __enter__(self) -> ServeEnvProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# `treegym serve-env`


def _parse_kwargs(rest: list[str]) -> dict[str, Any]:
    """`--name value` / `--name=value` pairs → gym.make kwargs (values read as JSON when they parse)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"expected --name value for a gym.make argument, got {arg!r}")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ValueError(f"{arg} needs a value")
            name, value = arg[2:], rest[i + 1]
            i += 2
        try:
            out[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[name.replace("-", "_")] = value
    return out


def cli_main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="treegym serve-env", description="Serve a treegym env through OpenEnv's server (HTTP + WebSocket "
        "sessions) with fork / snapshot / restore. Any other --name value pair is passed to gym.make, e.g. "
        "--data synthetic:multihop --topk 3.")
    parser.add_argument("--env", default="TreeSearchQA-v0", help="a registered treegym env id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-sessions", type=int, default=ServerLimits.max_sessions)
    parser.add_argument("--idle-timeout", type=float, default=ServerLimits.idle_timeout_s,
                        help="seconds before an idle session is closed")
    parser.add_argument("--max-snapshots", type=int, default=ServerLimits.max_snapshots)
    parser.add_argument("--max-request-bytes", type=int, default=ServerLimits.max_request_bytes)
    parser.add_argument("--log-level", default="warning")
    args, rest = parser.parse_known_args(argv)
    try:
        make_kwargs = _parse_kwargs(rest)
        limits = ServerLimits(args.max_sessions, args.idle_timeout, args.max_snapshots, args.max_request_bytes)
    except ValueError as exc:
        print(f"serve-env: {exc}", file=sys.stderr)
        return 2
    spec = gym.registry.get(args.env)
    if spec is None or "treegym" not in str(spec.entry_point):
        print(f"serve-env: unknown env {args.env!r}; treegym envs: "
              + ", ".join(k for k, v in gym.registry.items() if "treegym" in str(v.entry_point)), file=sys.stderr)
        return 2
    try:
        app = make_app(args.env, limits, **make_kwargs)
    except Exception as exc:  # gym.make's errors are many kinds; all are a bad command line here
        print(f"serve-env: cannot make {args.env} with {make_kwargs}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serve-env: warning: binding {args.host}: sessions are reachable from other machines "
              "(there is no authentication)", file=sys.stderr)
    print(f"serving {args.env} on http://{args.host}:{args.port} (OpenEnv {OPENENV_VERSION}; ws /ws)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                ws_max_size=limits.max_request_bytes)
    return 0


__all__ = ["TreeGymAction", "TreeGymObservation", "TreeGymState", "TreeGymEnvironment", "SessionStore",
           "ServerLimits", "RequestError", "make_app", "TreeGymEnvClient", "RemoteEnv", "RemoteState",
           "RemoteEnvError", "ServeEnvProcess", "OPENENV_SPEC", "cli_main"]
