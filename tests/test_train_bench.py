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
    assert "## TreeSearchQA-v0 (test EM)" in qa_part and "| chain | G4 | 4 | 40.0 ± 0.0 |  | 40.0 |" in qa_part
    # the web table leads with F1 and shows EM next to it (no per-question scores: no interval)
    assert "| chain | G4 | 4 | 35.0 ± 0.0 |  | 10.0 |" in web_part
    assert "| tree_grpo | M2N2L1 | 4 | 45.0 ± 0.0 |  | 20.0 |" in web_part
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


# -- issue 15: pools, budgets, curves, the pilot's design, the quick path -----------------------


@pytest.mark.parametrize("env_id", ["TreeSearchQA-v0", "TreeWebAgent-v0"])
def test_the_three_question_pools_are_disjoint(env_id):
    """SFT trains on one pool, RL draws from a second, every test score comes from a third: no
    question (by id or by text) is in two of them, and RL's pool is large enough for a study's
    runs (no prompt repeats within 800 prompts)."""
    from treegym.train.bench import RL_POOL, TEST_POOL
    from treegym.train.evaluate import make_env
    from treegym.train.sft import TRAIN_POOL

    assert len({TRAIN_POOL, RL_POOL, TEST_POOL}) == 3
    pools = {p: list(make_env("synthetic", p, env_id).unwrapped.tasks) for p in (TRAIN_POOL, RL_POOL, TEST_POOL)}
    for a, b in ((TRAIN_POOL, RL_POOL), (TRAIN_POOL, TEST_POOL), (RL_POOL, TEST_POOL)):
        assert not {t.id for t in pools[a]} & {t.id for t in pools[b]}
        assert not {t.question for t in pools[a]} & {t.question for t in pools[b]}, (a, b)
    assert len(pools[RL_POOL]) >= 800


def test_the_committed_warm_starts_record_the_pools_they_saw():
    from treegym.train.bench import WARMSTARTS, warmstart_pools

    for where in WARMSTARTS.values():
        assert warmstart_pools(where)["trained_on"] == ["train"]


@pytest.mark.parametrize("argv, message", [
    (["--rl-split", "train"], "was trained on the 'train' questions"),
    (["--rl-split", "test"], "the test questions score every arm"),
    (["--rl-split", "nope"], "nope"),
    (["--steps", "100", "--prompts", "16"], "prompts would repeat"),
    (["--max-minutes", "0.5"], "over --max-minutes 0.5"),
    (["--arms", "G5"], "no arm named G5"),
])
def test_bench_refuses_a_bad_design_before_training(tmp_path, argv, message):
    """SFT/RL pool overlap, RL on test questions, repeated prompts, an over-budget design or an
    unknown arm: refused with what to change, before any model loads (no output folder made)."""
    from treegym.train.bench import cli_main

    out = tmp_path / "never-created"
    with pytest.raises(SystemExit, match=message):
        cli_main(["--quick", "--env", "TreeSearchQA-v0", "--out", str(out), *argv])
    assert not out.exists()


def test_from_scratch_warm_starts_count_as_trained_on_the_train_pool(tmp_path):
    from treegym.train.bench import cli_main

    with pytest.raises(SystemExit, match="to be built"):
        cli_main(["--quick", "--from-scratch", "--rl-split", "train", "--out", str(tmp_path / "x")])


def test_study_needs_the_pilot_design(tmp_path, monkeypatch):
    from treegym.train import bench

    monkeypatch.setattr(bench, "PILOT_FILE", tmp_path / "no_pilot.json")
    with pytest.raises(SystemExit, match="--pilot"):
        bench.cli_main(["--study", "--out", str(tmp_path / "x")])


def test_estimated_minutes_follow_the_cost_model():
    from treegym.train.bench import QA_ENV, Job, chain_arm, estimate_minutes

    costs = {QA_ENV: {"train_s": 0.01, "eval_s": 0.02}}
    job = Job(QA_ENV, chain_arm(4), 0, steps=10, prompts=6, test_n=100, curve_every=5, curve_n=50)
    # 10 x 6 x (4 + 1.7) x 0.01 = 3.42 s of training; (100 + 1 curve point x 50) x 0.02 = 3 s of eval
    assert job.curve_points == 1 and job.cpu_seconds(costs) == pytest.approx(6.42)
    assert estimate_minutes([job, job], {QA_ENV: 60}, costs, workers=2) == pytest.approx((12.84 + 1.2) / 2 / 60)


def test_pilot_design_gives_more_seeds_to_a_noisier_difference():
    """`pilot_design` on simulated pilot rows: the components are those of the paired difference,
    the design stays inside the budget, and seed noise in the difference costs seeds."""
    import numpy as np

    from treegym.train.bench import PILOT_ARMS, QA_ENV, pilot_design

    def rows_for(shifts):
        rng = np.random.default_rng(0)
        base = (rng.random(800) < 0.55).astype(float)
        out = []
        for seed, shift in enumerate(shifts):  # the tree gains on 8% + shift of the misses, loses 6% of the hits
            gain = (base == 0) & (rng.random(800) < 0.08 + shift)
            loss = (base == 1) & (rng.random(800) < 0.06)
            for arm, em in zip(PILOT_ARMS, (base, base + gain - loss)):
                out.append({"env": QA_ENV, "method": arm.method, "config": arm.config, "budget": arm.budget,
                            "seed": seed, "prompts": 16, "steps": 20,
                            "test_scores": {"task_ids": list(range(800)), "em": em.tolist(), "f1": em.tolist()}})
        return out

    costs = {QA_ENV: {"train_s": 0.008, "eval_s": 0.013}}
    quiet = pilot_design(rows_for([0.0, 0.0, 0.0]), [QA_ENV], (16, 20), costs, cpu_minutes=120, curve_n=200)[QA_ENV]
    noisy = pilot_design(rows_for([-0.06, 0.0, 0.08]), [QA_ENV], (16, 20), costs, cpu_minutes=120, curve_n=200)[QA_ENV]
    for d in (quiet, noisy):
        assert d["cpu_minutes"] <= 120 and d["prompts"] == 16 and d["steps"] == 20 and d["seeds"] >= 2
        assert d["components"]["resid"] > 0
    assert noisy["components"]["seed"] > quiet["components"]["seed"]
    assert noisy["expected_half_width"] > quiet["expected_half_width"]


def test_quick_path_end_to_end_in_parallel_with_curves(tmp_path, one_torch_thread):
    """`treegym bench --quick` (what `make run` runs) on a tiny plan, its runs in 2 worker
    processes: every arm's row, learning curves from the SFT point to the last step, the findings
    table, pools and CPU-minutes in the metadata; and a worker's row equals the same run
    in-process (curve evaluations included: they do not disturb training)."""
    from treegym.train import bench

    out = tmp_path / "run"
    argv = ["--quick", "--env", "TreeSearchQA-v0", "--steps", "2", "--prompts", "2", "--test-n", "6",
            "--curve-every", "1", "--curve-n", "3", "--jobs", "2", "--out", str(out), "--no-repo-results"]
    assert bench.cli_main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["config"]) for r in data["rows"]] == [
        ("sft", "warmstart"), ("chain", "G4"), ("chain", "G16"), ("tree_grpo", "M2N2L1")]
    assert data["rl_split"] == "dev" and data["warmstart_pools"]["TreeSearchQA-v0"]["trained_on"] == ["train"]
    assert data["cpu_minutes"] > 0 and {f["finding"] for f in data["findings"]} == {
        "(a) tree vs chain, matched budget", "(a) tree at <= 1/4 of the chain budget"}
    g4 = data["rows"][1]
    assert [p["step"] for p in g4["curve"]] == [1, 2] and g4["curve"][0]["tokens"] > 0
    curves = bench.curve_means(data["rows"])
    assert [p["step"] for p in curves[("TreeSearchQA-v0", "chain:G4")]] == [0, 1, 2]
    assert (out / "results_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Findings" in (out / "results.md").read_text()
    again = bench.run_arm(bench.chain_arm(4), 0, bench.WARMSTART_DIR, tmp_path / "again", steps=2, prompts=2,
                          lr=1e-4, test_n=6, threads=1, max_new_tokens=24, log=lambda *_: None, progress=False)
    for key in ("test_scores", "tokens_per_prompt", "train_reward", "tool_calls_per_prompt"):
        assert again[key] == g4[key], key
    assert again["curve"] == []


def test_study_shares_one_budget_between_the_pilots_envs(tmp_path):
    """`--study` re-derives seeds and test questions for all its envs together from the pilots'
    components and costs (`design_study`), and refuses the result when over --max-minutes."""
    from treegym.train import bench, stats

    qa, web = bench.QA_ENV, bench.WEB_ENV
    comps = {qa: stats.Components(seed=0.0, question=0.0, resid=0.1, n_seeds=3, n_questions=800),
             web: stats.Components(seed=2e-5, question=0.0, resid=0.15, n_seeds=3, n_questions=400)}
    costs = {qa: {"train_s": 0.03, "eval_s": 0.013}, web: {"train_s": 0.1, "eval_s": 0.065}}
    settings = {qa: (8, 40), web: (8, 40)}
    small = bench.design_study(settings, comps, costs, cpu_minutes=60, curve_n=200)
    large = bench.design_study(settings, comps, costs, cpu_minutes=240, curve_n=200)
    for d in (small, large):
        assert sum(d[e]["cpu_minutes"] for e in d) <= (60 if d is small else 240)
    assert max(d["expected_half_width"] for d in large.values()) < max(d["expected_half_width"] for d in small.values())
    assert large[web]["seeds"] >= small[web]["seeds"] and large[qa]["curve_every"] == 10
    for e, f in ((qa, "p_qa.json"), (web, "p_web.json")):
        (tmp_path / f).write_text(json.dumps({"design": {e: large[e]}, "costs": {e: costs[e]}}))
    with pytest.raises(SystemExit, match="over --max-minutes 1"):
        bench.cli_main(["--study", "--env", qa, web, "--design", str(tmp_path / "p_qa.json"), str(tmp_path / "p_web.json"),
                        "--max-minutes", "1", "--out", str(tmp_path / "never")])
    with pytest.raises(SystemExit, match="no pilot design for TreeWebAgent-v0"):
        bench.cli_main(["--study", "--env", qa, web, "--design", str(tmp_path / "p_qa.json"), "--out", str(tmp_path / "x")])


def test_pilot_end_to_end_writes_components_costs_and_a_design(tmp_path, one_torch_thread):
    """`treegym bench --pilot` on a tiny plan: the pair's runs, measured CPU costs, the paired
    variance components and a design (with the command that runs it) in NAME.{md,json}."""
    from treegym.train import bench

    out = tmp_path / "pilot"
    argv = ["--pilot", "--env", "TreeSearchQA-v0", "--steps", "2", "--prompts", "2", "--seeds", "2",
            "--test-n", "10", "--jobs", "1", "--threads", "1", "--out", str(out), "--no-repo-results", "--name", "p"]
    assert bench.cli_main(argv) == 0
    data = json.loads((out / "p.json").read_text())
    assert [(r["method"], r["seed"]) for r in data["rows"]] == [("chain", 0), ("tree_grpo", 0), ("chain", 1), ("tree_grpo", 1)]
    assert data["costs"]["TreeSearchQA-v0"]["train_s"] > 0 and data["costs"]["TreeSearchQA-v0"]["eval_s"] > 0
    d = data["design"]["TreeSearchQA-v0"]
    assert (d["prompts"], d["steps"]) == (2, 2) and d["seeds"] >= 2 and d["components"]["n_seeds"] == 2
    assert data["study_command"].startswith("treegym bench --study --env TreeSearchQA-v0 --design")
    assert "## The design" in (out / "p.md").read_text()
    with pytest.raises(SystemExit):
        bench.cli_main(["--pilot", "--arms", "G4", "--out", str(tmp_path / "never")])
