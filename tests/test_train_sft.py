"""`treegym sft` as a user runs it: a cut plan repeats exactly, and the same command gives the same weights."""

from __future__ import annotations

import json

from treegym.cli import main as treegym
from treegym.envs.data.synthetic import make_world


def test_sft_cli_stops_early_on_the_planned_schedule_and_is_deterministic(tmp_path, one_torch_thread):
    world = tmp_path / "world"
    make_world(3, n_people=30, n_cities=6, n_countries=3, n_orgs=6, n_works=8, n_questions=60).write(world)
    metas = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert treegym(["sft", "--world", str(world), "--out", str(out), "--lm-steps", "20", "--lm-stop", "4",
                        "--act-steps", "10", "--act-stop", "0", "--batch", "2", "--eval-every", "0",
                        "--eval-n", "2", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
                        "--threads", "1"]) == 0
        metas.append(json.loads((out / "sft_meta.json").read_text()))
    a, b = metas
    # cut at step 4 of a 20-step schedule; the action phase planned but stopped before its first step
    assert (a["lm_steps"], a["lm_steps_planned"], a["act_steps"], a["act_steps_planned"]) == (4, 20, 0, 10)
    assert "--lm-stop 4" in a["command"]
    # what `treegym bench --from-scratch` relies on: the same command, the same weights, bit for bit
    assert a["model_sha256"] == b["model_sha256"]
