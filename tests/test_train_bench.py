"""Benchmark bookkeeping: the arms' budgets and the files `treegym bench` writes."""

import json

import pytest

from treegym.train.bench import ABLATION_ARMS, FULL_ARMS, QUICK_ARMS, select_arms, write_results


def test_arm_budgets_follow_the_paper_formula():
    # E[B] = M * (1 + N*L/2): M1N2L1 -> 2, M2N2L1 -> 4, M4N2L1 -> 8; chain G -> G
    budgets = {(a.method, a.config): a.budget for a in FULL_ARMS}
    assert budgets == {("chain", "G2"): 2, ("chain", "G4"): 4, ("chain", "G8"): 8, ("chain", "G16"): 16,
                       ("tree_grpo", "M1N2L1"): 2, ("tree_grpo", "M2N2L1"): 4, ("tree_grpo", "M4N2L1"): 8}
    quick = {a.config: a.budget for a in QUICK_ARMS}
    # quick compares the tree at the chain's matched budget (G4) and at a quarter of G16
    assert quick["M2N2L1"] == quick["G4"] == quick["G16"] / 4
    assert {a.advantage for a in ABLATION_ARMS} == {"", "tree_grpo_inter", "tree_grpo_intra"}


def _row(method, config, budget, seed, em):
    return {"method": method, "config": config, "budget": budget, "seed": seed, "test_em": em,
            "test_f1": em, "tokens_per_prompt": 10.0 * budget, "tool_calls_per_prompt": budget,
            "rollout_s": 1.0, "update_s": 2.0, "wall_s": 3.0}


def test_write_results(tmp_path):
    rows = [_row("sft", "warmstart", 0.0, 0, 0.30),
            _row("chain", "G4", 4.0, 0, 0.30), _row("chain", "G4", 4.0, 1, 0.40),
            _row("tree_grpo", "M2N2L1", 4.0, 0, 0.50), _row("tree_grpo", "M2N2L1", 4.0, 1, 0.60)]
    meta = {"commit": "abc", "machine": "test", "quick": True, "steps": 2, "prompts": 2, "lr": 1e-4,
            "test_n": 10, "seeds": 2}
    md, js, png = write_results(tmp_path, rows, meta)
    text = md.read_text()
    # mean ± sample std over seeds, in percent: chain (30, 40) -> 35.0 ± 7.1
    assert "| chain | G4 | 4 | 35.0 ± 7.1 |" in text
    assert "| tree_grpo | M2N2L1 | 4 | 55.0 ± 7.1 |" in text
    data = json.loads(js.read_text())
    assert data["rows"] == rows and {s["config"] for s in data["summary"]} == {"warmstart", "G4", "M2N2L1"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_results_has_a_web_section_scored_by_f1(tmp_path):
    web = "TreeWebAgent-v0"
    rows = [_row("sft", "warmstart", 0.0, 0, 0.30), _row("chain", "G4", 4.0, 0, 0.40),
            {**_row("sft", "warmstart", 0.0, 0, 0.10), "env": web, "test_f1": 0.25},
            {**_row("chain", "G4", 4.0, 0, 0.10), "env": web, "test_f1": 0.35},
            {**_row("tree_grpo", "M2N2L1", 4.0, 0, 0.20), "env": web, "test_f1": 0.45}]
    meta = {"commit": "abc", "machine": "test", "quick": True, "steps": 2, "prompts": 2, "lr": 1e-4,
            "test_n": 10, "seeds": 1}
    md, js, png = write_results(tmp_path, rows, meta)
    qa_part, web_part = md.read_text().split("## TreeWebAgent-v0 (test F1)")
    assert "## TreeSearchQA-v0 (test EM)" in qa_part and "| chain | G4 | 4 | 40.0 ± 0.0 | 40.0 |" in qa_part
    # the web table leads with F1 and shows EM next to it
    assert "| chain | G4 | 4 | 35.0 ± 0.0 | 10.0 |" in web_part
    assert "| tree_grpo | M2N2L1 | 4 | 45.0 ± 0.0 | 20.0 |" in web_part
    summary = json.loads(js.read_text())["summary"]
    assert {(s["env"], s["config"]) for s in summary} >= {(web, "M2N2L1"), ("TreeSearchQA-v0", "G4")}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_rejects_bad_flags(capsys):
    from treegym.train.bench import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--steps", "many"])
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--env", "TreeChess-v0"])
    assert "--env" in capsys.readouterr().err


def test_select_arms_by_config_method_or_both(capsys):
    arms = list(FULL_ARMS) + list(ABLATION_ARMS)
    picked = select_arms(arms, "tree_grpo:M2N2L1, tree_grpo_token,G16")
    assert [(a.method, a.config) for a in picked] == [("chain", "G16"), ("tree_grpo", "M2N2L1"),
                                                      ("tree_grpo_token", "M2N2L1-token")]
    # a bare config picks every arm with it: the tree and its two advantage ablations
    assert {a.method for a in select_arms(arms, "M2N2L1")} == {"tree_grpo", "tree_grpo_inter", "tree_grpo_intra"}
    with pytest.raises(SystemExit, match="no arm named G99.*chain:G2"):
        select_arms(arms, "G4,G99")
    with pytest.raises(SystemExit, match="no arm named"):
        select_arms(arms, " , ")
    from treegym.train.bench import cli_main

    # the ablation names exist only with --ablations
    with pytest.raises(SystemExit, match="tree_grpo_token"):
        cli_main(["--arms", "tree_grpo_token", "--out", "/nonexistent/never-created"])


def test_from_scratch_builds_the_qa_then_the_web_warm_start(tmp_path, one_torch_thread):
    """`bench --from-scratch`'s path, on a small world with a tiny plan: the web warm start is
    grown from a freshly built QA one (tags added), never from the committed files."""
    from transformers import AutoTokenizer

    from treegym.agents.tiny import WEB_TAGS
    from treegym.envs.data.synthetic import synthetic_dataset
    from treegym.train.bench import WEB_ENV, warm_start

    world = synthetic_dataset(5, n_people=30, n_cities=6, n_countries=3, n_orgs=6, n_works=8,
                              n_questions=60)
    plan = dict(lm_steps=2, act_steps=2, batch=2, lr=1e-3, eval_every=0, eval_n=2, seed=0,
                n_layer=1, d_model=32, n_head=2)
    web = warm_start(tmp_path, from_scratch=True, sft_kwargs=plan, log=lambda *_: None,
                     env_id=WEB_ENV, data=world, replan=False)
    assert web == tmp_path / "sft_web" and (tmp_path / "sft" / "model.safetensors").is_file()
    meta = json.loads((web / "sft_meta.json").read_text())
    assert meta["env"] == WEB_ENV and meta["lm_steps"] == 2 and meta["act_steps"] == 2
    assert set(WEB_TAGS) <= set(AutoTokenizer.from_pretrained(web).get_vocab())
    assert not set(WEB_TAGS) & set(AutoTokenizer.from_pretrained(tmp_path / "sft").get_vocab())


def test_bench_name_writes_its_result_files_with_provenance(tmp_path, monkeypatch, one_torch_thread):
    """`treegym bench --name NAME` writes NAME.{json,md,png} itself, recording the exact argv, the
    commit, the machine and the sha256 of the warm start every row started from."""
    import hashlib

    from treegym.train import bench

    results = tmp_path / "results"
    monkeypatch.setattr(bench, "REPO_RESULTS", results)
    argv = ["--env", "TreeSearchQA-v0", "--arms", "G4", "--steps", "1", "--prompts", "1",
            "--seeds", "1", "--test-n", "2", "--threads", "1", "--out", str(tmp_path / "run"), "--name", "tiny_run"]
    assert bench.cli_main(argv) == 0
    data = json.loads((results / "tiny_run.json").read_text())
    assert data["argv"] == ["treegym", "bench", *argv]
    assert data["command"].startswith("treegym bench --env TreeSearchQA-v0 --arms G4")
    assert len(data["commit"]) == 40 or data["commit"] == "unknown"
    assert "cpus" in data["machine"] and data["dirty"] in (True, False, None)
    weights = bench.WARMSTART_DIR / "model.safetensors"
    assert data["warmstart_sha256"] == {"TreeSearchQA-v0": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert [(r["method"], r["config"]) for r in data["rows"]] == [("sft", "warmstart"), ("chain", "G4")]
    assert data["command"] in (results / "tiny_run.md").read_text()
    assert (results / "tiny_run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        bench.cli_main(["--name", "../escape"])


def _scored(method, config, budget, seed, p, n=400, rng=None):
    """A run whose n per-question EMs are Bernoulli(p) (seeded), as `test_metrics` records them."""
    import numpy as np

    em = (np.random.default_rng(rng if rng is not None else seed).random(n) < p).astype(float).tolist()
    return {**_row(method, config, budget, seed, sum(em) / n),
            "test_scores": {"task_ids": [f"t{i}" for i in range(n)], "em": em, "f1": em}}


def test_findings_pair_arms_over_the_same_questions_and_give_verdicts(tmp_path):
    from treegym.train.bench import findings

    rows = [_row("sft", "warmstart", 0.0, 0, 0.3)]
    for seed in range(3):  # the tree clearly better than G16 (+30 points), G4 tied with the tree
        rows += [_scored("chain", "G16", 16.0, seed, 0.3, rng=100 + seed),
                 _scored("chain", "G4", 4.0, seed, 0.6, rng=200 + seed),
                 _scored("tree_grpo", "M2N2L1", 4.0, seed, 0.6, rng=200 + seed)]
    found = {(f["finding"], f["b"]): f for f in findings(rows)}
    quarter = found[("(a) tree at <= 1/4 of the chain budget", "chain:G16")]
    assert quarter["verdict"] == "confirmed" and quarter["diff"]["lo"] > 0.2
    assert quarter["seeds"] == [0, 1, 2] and quarter["questions"] == 400
    matched = found[("(a) tree vs chain, matched budget", "chain:G4")]  # identical scores: a tie shown
    assert matched["diff"]["mean"] == 0 and matched["verdict"] == "equivalent"
    md, js, _ = write_results(tmp_path, rows, {"commit": "abc", "machine": "test", "quick": False, "steps": 2,
                                               "prompts": 2, "lr": 1e-4, "test_n": 400, "seeds": 3})
    assert "## Findings" in md.read_text() and "| confirmed |" in md.read_text()
    assert len(json.loads(js.read_text())["findings"]) == 2


def test_one_seed_findings_are_inconclusive_and_say_why(tmp_path):
    rows = [_scored("chain", "G16", 16.0, 0, 0.2), _scored("tree_grpo", "M2N2L1", 4.0, 0, 0.9, rng=5)]
    md, js, _ = write_results(tmp_path, rows, {"commit": "abc", "machine": "test", "quick": True, "steps": 2,
                                               "prompts": 2, "lr": 1e-4, "test_n": 400, "seeds": 1})
    (f,) = json.loads(js.read_text())["findings"]
    assert f["diff"]["lo"] > 0 and f["verdict"] == "inconclusive"  # clear on questions, silent on seeds
    assert "inconclusive (1 seed: seed spread unknown)" in md.read_text()


def test_findings_refuse_arms_scored_on_different_questions():
    from treegym.train.bench import findings

    a, b = _scored("chain", "G16", 16.0, 0, 0.5), _scored("tree_grpo", "M2N2L1", 4.0, 0, 0.5)
    b["test_scores"]["task_ids"] = list(reversed(b["test_scores"]["task_ids"]))
    with pytest.raises(ValueError, match="different test questions"):
        findings([a, b])
