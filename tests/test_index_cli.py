"""`treegym index build | search | eval` as a user runs them (through the top-level CLI)."""

from __future__ import annotations

import json

import pytest

from treegym.cli import main as treegym
from treegym.envs.data.synthetic import make_world


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(0, n_people=40, n_cities=8, n_countries=3, n_orgs=8, n_works=10, n_questions=80).write(out)
    return out


def test_build_search_eval_bm25(world_dir, tmp_path, capsys):
    idx = tmp_path / "bm25"
    assert treegym(["index", "build", "--corpus", str(world_dir / "corpus.jsonl"), "--kind", "bm25",
                    "--out", str(idx), "--quiet"]) == 0
    assert "built bm25 index of" in capsys.readouterr().out
    name = json.loads((world_dir / "corpus.jsonl").read_text().splitlines()[0])["contents"].split("\n")[0].strip('"')
    assert treegym(["index", "search", str(idx), name, "another query", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"query: {name}" in out and "  1. [0]" in out
    assert treegym(["index", "search", str(idx), name, "-k", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["result"]
    assert res[0][0]["document"]["id"] == "0" and res[0][0]["document"]["contents"].startswith(f"{name}\n")
    assert treegym(["index", "eval", str(idx), "--data", str(world_dir), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["tasks"] > 0 and 0.3 < m["recall@10"] <= 1 and m["recall@1"] <= m["recall@3"] <= m["recall@10"]
    assert treegym(["index", "eval", str(idx), "--data", str(world_dir), "--split", "train", "-k", "5",
                    "--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "recall@5" in out and "tasks              10" in out


def test_build_dense_ivfpq(world_dir, tmp_path, capsys):
    idx = tmp_path / "dense"
    assert treegym(["index", "build", "--corpus", str(world_dir / "corpus.jsonl"), "--kind", "dense",
                    "--faiss", "ivfpq", "--nprobe", "2", "--out", str(idx), "--quiet"]) == 0
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["kind"] == "dense" and manifest["params"]["faiss"] == "ivfpq"
    assert manifest["params"]["nprobe"] == 2
    capsys.readouterr()
    import torch

    before = torch.get_num_threads()
    try:
        assert treegym(["index", "search", str(idx), "born in", "-k", "3", "--nprobe", "4", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "  3. [" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(world_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "\\"A\\"\\ntext"}\n{"id": "2", "contents": \n')
    assert treegym(["index", "build", "--corpus", str(bad), "--kind", "bm25", "--out", str(tmp_path / "i")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert treegym(["index", "build", "--corpus", str(world_dir / "corpus.jsonl"), "--kind", "bm25",
                    "--faiss", "hnsw", "--out", str(tmp_path / "j")]) == 2
    assert "--faiss only apply to --kind dense or hybrid" in capsys.readouterr().err
    assert treegym(["index", "search", str(tmp_path), "q"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert treegym(["index", "build", "--corpus", str(tmp_path / "missing.jsonl"), "--kind", "bm25",
                    "--out", str(tmp_path / "k")]) == 2
    assert "not found" in capsys.readouterr().err
    assert treegym(["index", "search", str(tmp_path), "q", "--threads", "0"]) == 2
    assert "threads must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        treegym(["index", "build", "--corpus", "x", "--kind", "nope", "--out", "y"])


def test_build_hybrid_with_weighted_rrf(world_dir, tmp_path, capsys):
    idx = tmp_path / "hybrid"
    assert treegym(["index", "build", "--corpus", str(world_dir / "corpus.jsonl"), "--kind", "hybrid",
                    "--rrf-k", "100", "--sparse-weight", "1.25", "--out", str(idx), "--quiet"]) == 0
    params = json.loads((idx / "manifest.json").read_text())["params"]
    assert (params["rrf_k"], params["weights"], params["sparse"]) == (100.0, [1.25, 1.0], "bm25")
    capsys.readouterr()
    assert treegym(["index", "search", str(idx), "born in", "-k", "3"]) == 0
    assert "  3. [" in capsys.readouterr().out
    # bad fusion settings: one line, exit 2, nothing half-built
    assert treegym(["index", "build", "--corpus", str(world_dir / "corpus.jsonl"), "--kind", "hybrid",
                    "--sparse-weight", "-1", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "weights must be finite, >= 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert treegym(["index", "build", "--corpus", str(world_dir / "corpus.jsonl"), "--kind", "bm25",
                    "--rrf-k", "10", "--out", str(tmp_path / "b")]) == 2
    assert "--rrf-k only apply to --kind hybrid" in capsys.readouterr().err


def test_interrupted_index_build_leaves_no_half_written_index(tmp_path):
    """Ctrl-C (SIGINT) in the middle of `treegym index build`: no index directory appears, the
    staging directory is gone, and an index already at --out is left as it was."""
    import os
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "big.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
    with corpus.open("w") as fh:
        for i in range(150_000):  # large enough that the build is still running when interrupted
            text = " ".join(words[(i * 7 + j) % len(words)] + str(i % 997) for j in range(20))
            fh.write(json.dumps({"id": str(i), "title": f"Doc {i}", "text": text}) + "\n")
    small = tmp_path / "small.jsonl"
    small.write_text('{"id": "a", "title": "Kept", "text": "the old index"}\n')
    out = tmp_path / "idx"
    assert treegym(["index", "build", "--corpus", str(small), "--out", str(out), "--quiet"]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    # A test run started in the background (nohup, `&` without job control) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child the default.
    proc = subprocess.Popen([sys.executable, "-m", "treegym.cli", "index", "build", "--corpus", str(corpus),
                             "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    staging = tmp_path / ".idx.building"
    deadline = time.monotonic() + 60
    # Interrupt as soon as the build holds its staging directory: waiting for its first file raced
    # with the end of the build on a loaded machine (the files come last, just before the rename),
    # and a build that finished first tested nothing.
    while not staging.is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "idx", "small.jsonl"]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
