"""Cost of reaching treegym through other libraries' surfaces, as ratios measured in one run.

    .venv/bin/python benchmarks/integrations.py                 # all parts (today: openenv)
    .venv/bin/python benchmarks/integrations.py --part openenv --quick

Writes its report to benchmarks/results/integrations_<part>.md (argv, commit, machine on top).

`--part openenv` (issue 13): a `treegym serve-env` server in a subprocess on 127.0.0.1, so client
and server do not share a GIL, and for the same episodes (same seeds, same actions):
* env steps/s over WebSocket (`TreeGymEnvClient`) and over HTTP vs in-process `env.step`;
* fork round trip over both transports vs in-process `treegym.fork`;
* server memory per idle session (RSS growth over 200 open sessions);
* load: 8 concurrent WebSocket clients x 1,000 steps, forking every 25 steps and stepping the
  fork; errors counted, and every observation compared with the same actions run in-process.
Times are wall-clock (a network round trip is not CPU time); the machine is shared, so read the
ratios, not the absolute numbers.

TRL's numbers (seconds per GRPO step with treegym's rollout_func vs TRL's own single-turn GRPO,
same tiny model and batch) come from `benchmarks/integrations_trl.py`, a script of its own: it
trains, needs the `trl` extra and takes other arguments (steps, rounds, threads), and it writes
benchmarks/results/integrations_trl.{md,json} the same way. Another part plugs in through `PARTS`
below: a name and a function (args) -> markdown section.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import gymnasium as gym

import treegym

ROOT = Path(__file__).resolve().parent
ACTIONS = ("<search> capital city </search>", "no tags", "<search> born in </search>", "<answer> x </answer>")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _mean_fork_s(forker, n: int) -> float:
    """Mean wall seconds of `forker()` (its result's close() is not timed)."""
    total = 0.0
    for _ in range(n):
        t = time.perf_counter()
        child = forker()
        total += time.perf_counter() - t
        child.close()
    return total / n


def _episodes(step: Callable[[str], object], reset: Callable[[int], object], n: int) -> list:
    out = []
    for ep in range(n):
        out.append(reset(ep))
        for a in ACTIONS:
            out.append(step(a))
    return out


def _best_rate(step, reset, n_eps: int, rounds: int = 3) -> tuple[float, list]:
    """Steps/s of the best of `rounds` timed runs of the same episodes (the least disturbed one on
    a shared machine), and the episodes' outputs."""
    best, out = 0.0, []
    for _ in range(rounds):
        t = time.perf_counter()
        out = _episodes(step, reset, n_eps)
        best = max(best, n_eps * len(ACTIONS) / (time.perf_counter() - t))
    return best, out


def part_openenv(args) -> str:
    from treegym.integrations.openenv import RemoteEnv, ServeEnvProcess, TreeGymEnvClient

    n_eps = 25 if args.quick else 100
    load_steps = 200 if args.quick else 1000
    local = gym.make("TreeSearchQA-v0")
    server = ServeEnvProcess("TreeSearchQA-v0", ["--max-sessions", "512"])
    lines = ["## OpenEnv server (`treegym serve-env`, openenv via `TreeGymEnvClient`)", ""]
    try:
        # -- steps/s on the same episodes ------------------------------------------------------
        env = treegym.fork(local)

        def local_reset(seed):
            return env.reset(seed=seed)[0]

        def local_step(a):
            obs, r, term, trunc, _ = env.step(a)
            return obs, float(r), bool(term or trunc)

        _episodes(local_step, local_reset, 5)  # warm the query cache like the server's warm-up below
        rate, want = _best_rate(local_step, local_reset, n_eps)
        rates = {"in-process env.step": rate}
        for transport in ("ws", "http"):
            with TreeGymEnvClient(server.url, transport=transport) as c:
                def reset(seed):
                    return c.reset(seed=seed).observation.text

                def step(a):
                    r = c.step(a)
                    return r.observation.text, float(r.reward), bool(r.done)
                _episodes(step, reset, 5)
                rates[f"{transport} (TreeGymEnvClient)"], got = _best_rate(step, reset, n_eps)
                if got != want:
                    raise AssertionError(f"{transport}: served episodes differ from in-process ones")
        remote = RemoteEnv(server.url)  # the Gymnasium view a tree rollout uses (sync HTTP, pooled)

        def remote_reset(seed):
            return remote.reset(seed=seed)[0]

        def remote_step(a):
            obs, r, term, trunc, _ = remote.step(a)
            return obs, float(r), bool(term or trunc)
        _episodes(remote_step, remote_reset, 5)
        rates["http (RemoteEnv, what tree rollouts use)"], got = _best_rate(remote_step, remote_reset, n_eps)
        if got != want:
            raise AssertionError("RemoteEnv: served episodes differ from in-process ones")
        base = rates["in-process env.step"]
        lines += [f"Env steps/s on the same {n_eps} episodes x {len(ACTIONS)} steps, best of 3 runs (resets "
                  "timed but not counted as steps; observations identical on every path):", "",
                  "| path | steps/s | vs in-process |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:,.0f} | {v / base:.3f}x |" for k, v in rates.items()]

        # -- fork round trip -------------------------------------------------------------------
        n_forks = 50 if args.quick else 200
        env.reset(seed=1)
        env.step(ACTIONS[0])
        t = time.perf_counter()
        for _ in range(n_forks):
            treegym.fork(env)
        forks = {"in-process treegym.fork": (time.perf_counter() - t) / n_forks}
        for transport in ("ws", "http"):
            with TreeGymEnvClient(server.url, transport=transport) as c:
                c.reset(seed=1)
                c.step(ACTIONS[0])
                forks[f"{transport} client.fork()"] = _mean_fork_s(c.fork, n_forks)
        remote.reset(seed=1)
        remote.step(ACTIONS[0])
        forks["http RemoteEnv.fork() (pooled connection)"] = _mean_fork_s(remote.fork, n_forks)
        remote.close()
        lines += ["", f"Fork round trip (mean of {n_forks}; a client's fork() includes opening the new "
                  "client (its own connection and event-loop thread), RemoteEnv.fork() is one POST):", "", "| path | ms per fork | vs in-process |", "|---|---:|---:|"]
        f0 = forks["in-process treegym.fork"]
        lines += [f"| {k} | {v * 1e3:.3f} | {v / f0:,.0f}x |" for k, v in forks.items()]

        # -- memory per idle session -----------------------------------------------------------
        import httpx
        http = httpx.Client(base_url=server.url)
        n_idle = 200
        time.sleep(0.5)
        rss0 = _rss_kib(server.proc.pid)
        ids = [http.post("/reset", json={"seed": i}).json()["observation"]["session_id"] for i in range(n_idle)]
        time.sleep(0.5)
        rss1 = _rss_kib(server.proc.pid)
        for sid in ids:
            http.post("/close", json={"session_id": sid})
        lines += ["", f"Server memory per idle (reset, unstepped) session: {(rss1 - rss0) / n_idle:.1f} KiB "
                  f"(RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB over {n_idle} sessions)."]

        # -- load ------------------------------------------------------------------------------
        errors: list[str] = []
        mismatches = [0]
        done_steps = [0]
        lock = threading.Lock()

        def client_job(k: int) -> None:
            try:
                mine = treegym.fork(local)
                with TreeGymEnvClient(server.url) as c:
                    steps, ep = 0, 0
                    while steps < load_steps:
                        seed = 1000 * k + ep
                        ok = c.reset(seed=seed).observation.text == mine.reset(seed=seed)[0]
                        for i, a in enumerate(ACTIONS):
                            if steps % 25 == 0 and i < len(ACTIONS) - 1:  # fork mid-episode, step the branch
                                branch, twin = c.fork(), treegym.fork(mine)
                                rb = branch.step(ACTIONS[-1])
                                ob = twin.step(ACTIONS[-1])
                                ok &= (rb.observation.text, rb.reward, rb.done) == (ob[0], float(ob[1]), True)
                                branch.close()
                                steps += 1
                            r = c.step(a)
                            o, rew, term, trunc, _ = mine.step(a)
                            ok &= (r.observation.text, r.reward, r.done) == (o, float(rew), bool(term or trunc))
                            steps += 1
                        ep += 1
                        if not ok:
                            with lock:
                                mismatches[0] += 1
                    with lock:
                        done_steps[0] += steps
            except Exception as exc:  # counted, reported
                with lock:
                    errors.append(f"client {k}: {type(exc).__name__}: {exc}")

        t = time.perf_counter()
        threads = [threading.Thread(target=client_job, args=(k,)) for k in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        left = http.get("/treegym").json()["sessions"]
        lines += ["", f"Load: 8 concurrent WebSocket clients x {load_steps:,} steps (a fork stepped every 25 "
                  f"steps): {done_steps[0]:,} steps in {wall:.1f} s ({done_steps[0] / wall:,.0f} steps/s), "
                  f"**{len(errors)} errors**, **{mismatches[0]} episodes whose observations differ** from the "
                  f"same actions in-process, {left} sessions left open afterwards."]
        lines += [f"- {e}" for e in errors[:5]]
    finally:
        server.stop()
    return "\n".join(lines) + "\n"


PARTS: dict[str, Callable] = {"openenv": part_openenv}


def _header(argv: list[str]) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    return (f"# treegym integrations benchmark\n\n`{' '.join(['benchmarks/integrations.py', *argv])}` at commit "
            f"{commit}{' (with uncommitted changes)' if dirty else ''}; {platform.platform()}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="fewer episodes and load steps")
    ap.add_argument("--out", default=None, help="report path (default benchmarks/results/integrations_<part>.md)")
    args = ap.parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    report = _header(argv) + "\n".join(PARTS[p](args) for p in parts)
    print(report)
    out = Path(args.out) if args.out else ROOT / "results" / f"integrations_{args.part}.md"
    out.write_text(report, encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
