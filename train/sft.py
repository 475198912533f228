"""Warm start for RL: LM pre-training of the tiny model on oracle transcripts, then action-only SFT.

`treegym sft --world synthetic --out DIR` builds (or takes, `--model`) the tiny model, writes
oracle transcripts of the training split (the env's own prompts and observations, the oracle's
actions), then trains in two phases:

1. ``--lm-steps`` of next-token loss on *all* tokens of full transcripts (plus corpus passages
   formatted as search results). Measured in ../shared/REFERENCE.md: with loss on the model's own
   tokens only, a tiny model learned nothing in 5 CPU-minutes; an LM over the whole transcript
   first learns to read and copy from the `<information>` blocks.
2. ``--act-steps`` of next-token loss on the action tokens only (what RL will optimise).

Why tokens are built segment by segment (prompt via `encode_prompt`, each action and observation
via `encode`): that is exactly how a rollout assembles its ids, so the SFT model sees the same
token boundaries it will generate and condition on during RL.

The result is a normal Hugging Face directory with `sft_meta.json` (command, steps, timings, dev
EM along the way). A small one is committed in `treegym/train/warmstart/` for `treegym bench`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoTokenizer

from treegym.agents.base import GenResult
from treegym.agents.episode import Engine, env_stop_strings, play, start_episode
from treegym.agents.hf import HFPolicy
from treegym.agents.scripted import OraclePolicy
from treegym.agents.tiny import WEB_TAGS, add_tags, build_tiny_model, corpus_titles
from treegym.envs.core import fork
from treegym.envs.data import resolve_dataset
from treegym.envs.protocol import format_docs, make_prompt
from treegym.envs.web_agent import oracle_actions
from treegym.retrieval_index import Hit, iter_corpus
from treegym.train.evaluate import evaluate, make_env, select_tasks
from treegym.train.modeling import warmup_lambda
from treegym.train.logprobs import ForwardBatch, masked_logprobs

WARMSTART_DIR = Path(__file__).resolve().parent / "warmstart"


def oracle_plan(env: Any, dataset: Any) -> Any:
    """task -> the oracle's actions in `env`: for TreeSearchQA-v0 one `<search>` per gold hop then
    the answer; for TreeWebAgent-v0 the gold browsing path (`web_agent.oracle_actions`: search,
    click the result, click along the links, answer). The web oracle's `<think>` sentences are dropped so both
    envs' transcripts teach bare tool calls (the tiny model's action budget is ~30 tokens)."""
    base = env.unwrapped
    max_calls = int(base.max_tool_calls)
    if getattr(base, "site", None) is not None:
        def web(task: Any) -> list[str]:
            path = oracle_actions(base.site, task, search=base.result_urls)  # clicks the found result
            acts = [re.sub(r"<think>.*?</think>\s*", "", a, flags=re.S) for a in path]
            return acts[:max_calls] + acts[-1:] if len(acts) > max_calls + 1 else acts
        return web
    oracle = OraclePolicy(dataset, max_searches=max_calls)

    def qa(task: Any) -> list[str]:
        hops = oracle.hops(task)[:max_calls]
        return [f"<search> {h} </search>" for h in hops] + [f"<answer> {task.answers[0]} </answer>"]
    return qa


def oracle_transcripts(env: Any, tasks: Sequence[Any], policy: Any, plan: Any
                       ) -> list[tuple[list[int], list[int]]]:
    """(ids, action_mask) of one oracle episode per task, tokenized segment by segment;
    `plan(task)` gives the actions (`oracle_plan`).

    The episodes run on the one episode engine, with the plan standing in for `generate`: each
    action is `policy.encode`d (mask 1) and executed as written, each observation encoded once
    (mask 0), exactly as a rollout assembles its ids."""
    plans = [list(plan(task)) for task in tasks]
    slots = [start_episode(policy, fork(env), options={"task_id": task.id}, task=task, index=i)
             for i, task in enumerate(tasks)]

    def act(ready: Sequence[Any], requests: Sequence[Any]) -> list[GenResult]:
        out = []
        for s in ready:
            acts = plans[s.index]
            if s.turn >= len(acts):
                raise ValueError(f"the oracle plan of task {s.task.id!r} ended after {len(acts)} "
                                 "actions but its episode did not")
            text = acts[s.turn]
            ids = list(policy.encode(text))
            out.append(GenResult(token_ids=ids, logprobs=[0.0] * len(ids), text=text,
                                 finish_reason="stop"))
        return out

    engine = Engine(policy, stop=env_stop_strings(env), max_new_tokens=1 << 30,
                    max_turns=max((len(p) for p in plans), default=0) + 1, fit_context=False)
    return [(ep.token_ids, ep.action_mask) for ep in play(engine, slots, act=act)]


def passage_texts(dataset: Any, policy: Any, per_block: int = 3, seed: int = 0) -> list[list[int]]:
    """Corpus passages in the env's search-result format, `per_block` per sequence."""
    docs = [Hit(doc_id, 0.0, title, text) for doc_id, title, text in iter_corpus(dataset.corpus_path)]
    random.Random(seed).shuffle(docs)
    blocks = []
    for i in range(0, len(docs) - per_block + 1, per_block):
        blocks.append(policy.encode("\n\n<information>" + format_docs(docs[i:i + per_block]) + "</information>\n\n"))
    return blocks


def _batches(n: int, batch: int, rng: random.Random):
    order: list[int] = []
    while True:
        if len(order) < batch:
            more = list(range(n))
            rng.shuffle(more)
            order += more
        yield order[:batch]
        order = order[batch:]


def _lm_batch(rows: list[tuple[list[int], list[int]]], pad: int, action_only: bool):
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, m) in enumerate(rows):
        n = len(r)
        p = m.index(1) if 1 in m else 0  # prompt length (0 for passages)
        t = torch.tensor(r, dtype=torch.long)
        ids[i, :n] = t
        att[i, :n] = 1
        if action_only:
            mm = torch.tensor(m, dtype=torch.bool)
            labels[i, :n] = torch.where(mm, t, torch.full_like(t, -100))
        else:
            labels[i, :n] = t
            labels[i, :p] = -100  # the prompt: the same instruction in every row
    return ids, att, labels


def selected_lm_loss(model: Any, ids: Any, att: Any, labels: Any) -> Any:
    """Next-token cross-entropy, averaged over the positions that have a label.

    Why not `model(labels=...)`: with a ~7k-token vocabulary (BPE + one token per entity) the
    logits of every position dominate a tiny model's step; `masked_logprobs` projects only the
    labelled positions through the LM head (the same loss at a fraction of the cost).
    """
    mask = labels != -100
    mask[:, 0] = False  # the first token has no prediction
    logp, _ = masked_logprobs(model, ForwardBatch.padded(ids, att), mask)
    return -logp.sum() / mask.sum().clamp_min(1)


# The question pools of the synthetic world a warm start touches (issue 15): gradients come from
# the oracle transcripts of TRAIN_POOL only; MONITOR_POOL gives the periodic greedy dev EM (no
# gradient, and no checkpoint is chosen by it: a run stops at its planned or `max_minutes` step).
# `treegym bench` reads them back from `sft_meta.json` to refuse RL prompts from a pool the warm
# start trained on.
TRAIN_POOL, MONITOR_POOL = "train", "dev"
SFT_POOLS = {"trained_on": [TRAIN_POOL], "monitored_on": [MONITOR_POOL]}  # what `sft_meta.json` records
POOLS_LINE = (f"question pools: gradients from the `{TRAIN_POOL}` split's questions only (oracle transcripts, "
              f"plus corpus passages); the `{MONITOR_POOL}` split gave the greedy dev EM above (no gradient, "
              f"and the run stopped at its planned step or its time limit, never at a dev-chosen one); never the `test` split. "
              f"`treegym bench` draws RL prompts from `{MONITOR_POOL}` and scores on `test`")


def run_sft(dataset: Any, out: Path, *, model_dir: Path | None = None, lm_steps: int = 2000,
            act_steps: int = 500, batch: int = 16, lr: float = 2e-3, act_lr: float | None = None,
            passages_frac: float = 0.2, max_tool_calls: int | None = None, eval_every: int = 250,
            eval_n: int = 100, seed: int = 0, max_minutes: float = 0.0, n_layer: int = 2,
            d_model: int = 128, n_head: int = 4, log: Any = print, command: str = "",
            lm_stop: int | None = None, act_stop: int | None = None,
            env_id: str = "TreeSearchQA-v0") -> dict:
    """Build/load the model, write transcripts, train both phases, save `out`; returns the meta.

    `lm_stop` / `act_stop` end a phase early at that step while keeping the learning-rate schedule
    of the planned `lm_steps` / `act_steps`: that is how `treegym bench --from-scratch` repeats a
    committed warm start whose run was cut by `max_minutes`.

    `env_id="TreeWebAgent-v0"` trains on the web env's oracle browsing transcripts; a `model_dir`
    whose tokenizer lacks the web tool tags gets them first (`agents.tiny.add_tags`, into
    `out/init`), which is how the web warm start is grown from the QA one.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    if model_dir is None:
        model_dir = out / "init"
        build_tiny_model(dataset.corpus_path, model_dir,
                         entity_names=corpus_titles(dataset.corpus_path),
                         prompts=[make_prompt(t.question) for t in dataset.tasks(TRAIN_POOL)],
                         n_layer=n_layer, d_model=d_model, n_head=n_head, seed=seed,
                         max_position_embeddings=1024)
        log(f"built tiny model in {model_dir}")
    if env_id == "TreeWebAgent-v0":
        if not set(WEB_TAGS) <= set(AutoTokenizer.from_pretrained(model_dir).get_vocab()):
            # Five browsing turns run past the QA model's 1,024 positions (RoPE: no table to grow).
            model_dir = add_tags(model_dir, out / "init", WEB_TAGS, max_positions=2048)
            log(f"added the web tool tags {' '.join(WEB_TAGS)} to the tokenizer: {model_dir}")
    policy = HFPolicy(model_dir)
    model = policy.model
    tok = policy.tokenizer
    env = make_env(dataset, TRAIN_POOL, env_id, max_tool_calls=max_tool_calls)
    dev_env = make_env(dataset, MONITOR_POOL, env_id, max_tool_calls=max_tool_calls)
    dev_tasks = select_tasks(dev_env, eval_n, seed=seed)
    t0 = time.perf_counter()
    transcripts = oracle_transcripts(env, dataset.tasks(TRAIN_POOL), policy, oracle_plan(env, dataset))
    passages = [(p, [0] * len(p)) for p in passage_texts(dataset, policy, seed=seed)]
    lens = [len(t[0]) for t in transcripts]
    log(f"{len(transcripts)} oracle transcripts (mean {sum(lens) / len(lens):.0f} tokens, "
        f"max {max(lens)}), {len(passages)} passage blocks in {time.perf_counter() - t0:.1f}s")
    params = sum(p.numel() for p in model.parameters())
    meta: dict[str, Any] = {"command": command, "env": env_id, "params": params, "seed": seed, "batch": batch,
                            "lr": lr, "lm_steps_planned": lm_steps, "act_steps_planned": act_steps,
                            "mean_transcript_tokens": sum(lens) / len(lens), "evals": [],
                            "pools": SFT_POOLS}
    rng = random.Random(seed)
    pad = policy.pad_id
    deadline = t_start + max_minutes * 60 if max_minutes > 0 else float("inf")

    def do_eval(phase: str, step: int) -> dict:
        model.eval()
        m = evaluate(policy, dev_env, dev_tasks, max_new_tokens=32, seed=seed)
        model.train()
        rec = {"phase": phase, "step": step, "elapsed_s": round(time.perf_counter() - t_start, 1),
               "dev_em": m["greedy/em"], "dev_f1": m["greedy/f1"], "dev_tool_calls": m["greedy/tool_calls"],
               "dev_invalid": m["greedy/invalid_actions"],
               **{k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("greedy/em/")}}
        meta["evals"].append(rec)
        log(json.dumps(rec))
        save(out)  # keep the latest evaluated weights: a long run can be stopped at any time
        return rec

    def save(where: Path) -> None:
        model.save_pretrained(where, safe_serialization=True)
        (tok.tokenizer if hasattr(tok, "tokenizer") else tok).save_pretrained(where)
        meta["saved_at_step"] = meta["evals"][-1]["step"] if meta["evals"] else 0
        (where / "sft_meta.json").write_text(json.dumps(meta, indent=1))

    tokens_seen = 0
    for phase, steps, action_only, plr, stop in (("lm", lm_steps, False, lr, lm_stop),
                                                 ("act", act_steps, True, act_lr or lr / 2, act_stop)):
        if steps <= 0:
            continue
        opt = torch.optim.AdamW(model.parameters(), lr=plr, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(min(100, steps // 10), steps, 0.1))
        tb = _batches(len(transcripts), batch, rng)
        model.train()
        t_phase = time.perf_counter()
        done = 0
        ema = None
        for step in range(1, steps + 1):
            if time.perf_counter() > deadline:
                log(f"time limit reached in phase {phase} at step {step - 1}")
                break
            if stop is not None and step > stop:
                break
            rows = [transcripts[i] for i in next(tb)]
            if not action_only and passages_frac > 0:
                k = int(round(batch * passages_frac))
                rows = rows[:batch - k] + [passages[rng.randrange(len(passages))] for _ in range(k)]
            ids, att, labels = _lm_batch(rows, pad, action_only)
            loss = selected_lm_loss(model, ids, att, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += int(att.sum())
            done = step
            lv = loss.item()
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            if step % 50 == 0:
                dt = time.perf_counter() - t_phase
                log(f"[{phase}] step {step}/{steps} loss {ema:.3f} lr {sched.get_last_lr()[0]:.2e} "
                    f"{tokens_seen / (time.perf_counter() - t_start):.0f} tok/s, {dt:.0f}s")
            if eval_every and step % eval_every == 0:
                do_eval(phase, step)
        meta[f"{phase}_steps"] = done
        meta[f"{phase}_final_loss"] = ema
        meta[f"{phase}_wall_s"] = round(time.perf_counter() - t_phase, 1)
    final = do_eval("final", meta.get("act_steps", 0))
    model.eval()
    meta["dev_em"] = final["dev_em"]
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["tokens_seen"] = tokens_seen
    meta["torch_threads"] = torch.get_num_threads()
    weights = out / "model.safetensors"
    save(out)
    meta["model_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (out / "sft_meta.json").write_text(json.dumps(meta, indent=1))
    return meta


WARMSTART_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "sft_meta.json")


def install_warmstart(src: str | Path, dst: str | Path = WARMSTART_DIR, commit: str = "") -> Path:
    """Copy a finished SFT directory to the committed warm-start location with a README that
    records its sha256, the command and the commit it was built from."""
    src, dst = Path(src), Path(dst)
    meta = json.loads((src / "sft_meta.json").read_text())
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    if meta.get("model_sha256") != digest:
        raise ValueError(f"{src}/model.safetensors does not match sft_meta.json's model_sha256")
    dst.mkdir(parents=True, exist_ok=True)
    for name in WARMSTART_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    evals = "\n".join(f"| {e['phase']} | {e['step']} | {e['elapsed_s']:.0f} | {100 * e['dev_em']:.1f} |"
                      for e in meta["evals"])
    web = meta.get("env") == "TreeWebAgent-v0"
    origin = ("the model given by `--model` was the committed QA warm start `train/warmstart/`; "
              "`treegym sft --env TreeWebAgent-v0` added the web tool tags to its tokenizer and raised "
              "its context to 2,048 positions (`agents.tiny.add_tags`) before training on oracle browsing "
              "transcripts" if web else
              "without `--model`, `treegym sft` builds the tiny model first: `build_tiny_model(corpus, out, "
              "entity_names=corpus_titles(corpus), prompts=<train prompts>, max_position_embeddings=1024)`")
    title = "web-agent (TreeWebAgent-v0)" if web else "tiny model"
    rebuild = ("`treegym bench --from-scratch` rebuilds it (after rebuilding the QA warm start it grows from)"
               if web else "`treegym bench --from-scratch` rebuilds it with the same plan instead of loading it")
    (dst / "README.md").write_text(f"""# Committed SFT warm start ({title})

Used by `treegym bench` (and `make run`) as the RL starting point; {rebuild}.

- model.safetensors sha256: `{digest}`
- parameters: {meta['params']:,}
- built by: `{meta['command']}` ({origin})
- from commit: {commit or 'see git log'}
- steps done: {meta.get('lm_steps', 0)} LM (all tokens after the prompt) + {meta.get('act_steps', 0)}
  action-only, batch {meta['batch']}, lr {meta['lr']}, {meta['wall_s']:.0f} s wall on a shared 2-core
  CPU ({meta.get('torch_threads')} torch threads), {meta.get('tokens_seen', 0):,} tokens seen
- dev EM (greedy, {50} dev tasks) at the end: {100 * meta['dev_em']:.1f}%
- {POOLS_LINE}

| phase | step | elapsed s | dev EM % |
|---|---:|---:|---:|
{evals}
""")
    return dst


def cli_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treegym sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="synthetic",
                   help="dataset spec or a `treegym world` directory (default: synthetic)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--model", type=Path, default=None, help="start from this model dir (default: build a tiny one)")
    p.add_argument("--lm-steps", type=int, default=2000)
    p.add_argument("--act-steps", type=int, default=500)
    p.add_argument("--lm-stop", type=int, default=None,
                   help="end the LM phase at this step, keeping --lm-steps' learning-rate schedule (how a "
                        "committed warm start cut by a time limit is repeated exactly)")
    p.add_argument("--act-stop", type=int, default=None, help="the same for the action-only phase")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--act-lr", type=float, default=None)
    p.add_argument("--passages-frac", type=float, default=0.2)
    p.add_argument("--env", default="TreeSearchQA-v0", choices=("TreeSearchQA-v0", "TreeWebAgent-v0"),
                   help="whose oracle transcripts to train on (web: search/visit/click paths)")
    p.add_argument("--max-tool-calls", type=int, default=None, help="default: the env's own (QA 3, web 5)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop each phase at this total wall time (0 = no limit)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(max(1, a.threads))
    try:
        ds = resolve_dataset(a.world)
    except (ValueError, FileNotFoundError) as e:
        print(f"treegym sft: {e}", file=sys.stderr)
        return 2
    command = "treegym sft " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = run_sft(ds, a.out, model_dir=a.model, lm_steps=a.lm_steps, act_steps=a.act_steps,
                   batch=a.batch, lr=a.lr, act_lr=a.act_lr, passages_frac=a.passages_frac,
                   max_tool_calls=a.max_tool_calls, eval_every=a.eval_every, eval_n=a.eval_n,
                   seed=a.seed, max_minutes=a.max_minutes, n_layer=a.n_layer, d_model=a.d_model,
                   n_head=a.n_head, command=command, env_id=a.env, lm_stop=a.lm_stop, act_stop=a.act_stop)
    print(f"wrote {a.out}: dev EM {meta['dev_em']:.3f} after {meta['wall_s']:.0f}s "
          f"({meta.get('lm_steps', 0)} LM + {meta.get('act_steps', 0)} action steps)")
    return 0


__all__ = ["oracle_plan", "oracle_transcripts", "passage_texts", "run_sft", "install_warmstart", "cli_main",
           "WARMSTART_DIR"]
