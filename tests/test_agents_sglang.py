"""The SGLang backend over real HTTP against the stand-in (tests/sglang_standin.py) in each of its
emulation modes: 0.5.23 with and without --enable-deterministic-inference, 0.5.4 (prompt tokens
in front of output_ids), 0.5.2 (no sampling_seed), --api-key, --preferred-sampling-params."""

from __future__ import annotations

import inspect
import os
import time
import warnings

import gymnasium as gym
import httpx
import pytest
import torch
from fastapi import FastAPI
from netutil import free_port
from sglang_standin import (SEARCH_ACTION, SEARCH_PROMPT, SPLIT_HEAD, SPLIT_PROMPT, StandinServer,
                            build_split_stop_model)

from treegym.agents import GenRequest, run_episode
from treegym.agents.hf import HFPolicy
from treegym.agents.sglang import MIN_VERSION, SGLangError, SGLangPolicy, SGLangWarning

STOPS = ("</search>", "</answer>")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local(model_dir):
    return HFPolicy(model_dir)


@pytest.fixture(scope="module")
def standin(model_dir):
    """standin(**modes) -> a running stand-in, one per distinct mode for the whole module."""
    servers: dict = {}

    def get(**modes):
        key = repr(sorted(modes.items()))
        if key not in servers:
            srv = StandinServer(HFPolicy(modes.pop("model", model_dir)), **modes)
            servers[key] = srv.__enter__()
        srv = servers[key]
        srv.faults.clear()
        return srv

    yield get
    for srv in servers.values():
        srv.__exit__(None, None, None)


def client_for(srv, model_dir, **kw):
    kw = {"retries": 2, "backoff": 0.01, "timeout": 30, **kw}
    return SGLangPolicy(srv.url, tokenizer=model_dir, **kw)


def quiet(pol):
    """Read the server info with its SGLangWarning (asserted elsewhere) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLangWarning)
        return pol.server_info()


def assert_same(remote, ref):
    for r, h in zip(remote, ref, strict=True):
        assert r.token_ids == h.token_ids
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(h.logprobs),
                                   atol=1e-5, rtol=0)
        assert r.finish_reason == h.finish_reason and r.text == h.text


# -- the same samples as HFPolicy where seeds are honoured --------------------------------------

def test_generate_matches_the_local_backend_on_a_deterministic_server(standin, model_dir, local):
    srv = standin(deterministic=True)
    client = client_for(srv, model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SGLangWarning)  # seeds are honoured: nothing to warn about
        info = client.server_info()
    assert info.version == (0, 5, 23) and info.seeds_honoured and not info.prefixed_output_ids
    ids = tuple(client.encode_prompt(SEARCH_PROMPT))
    reqs = [GenRequest(ids, max_new_tokens=10, seed=s, top_p=0.95) for s in range(3)]
    reqs.append(GenRequest(ids, max_new_tokens=30, temperature=0.0, stop=STOPS))
    sent_before = len(srv.app.state.requests)
    remote = client.generate(reqs)  # one HTTP request for the whole batch
    assert_same(remote, local.generate(reqs))
    assert remote[-1].text == SEARCH_ACTION and remote[-1].finish_reason == "stop"
    assert client.stats["calls"] == 1 and client.stats["generated_tokens"] == sum(
        len(r.token_ids) for r in remote)
    # every sampling key explicitly (neutral where GenRequest has no say), the seed as given
    sent = srv.app.state.requests[sent_before:]
    assert [p["sampling_seed"] for p in sent[:3]] == [0, 1, 2]
    assert all(p["top_k"] == -1 and p["min_p"] == 0.0 and p["repetition_penalty"] == 1.0
               and p["frequency_penalty"] == 0.0 and p["presence_penalty"] == 0.0
               and p["min_new_tokens"] == 0 and p["no_stop_trim"] is True for p in sent)
    # an unseeded request still gets a seed (a deterministic SGLang would use 42 for all)
    client.generate([GenRequest(ids, max_new_tokens=2)] * 2)
    seeds = [p["sampling_seed"] for p in srv.app.state.requests[-2:]]
    assert seeds[0] != seeds[1] and all(0 <= s < 2**31 for s in seeds)


HONOURED = [dict(deterministic=True), dict(version="0.5.4", deterministic=True),
            dict(deterministic=True, api_key="s3cret")]
IGNORED = [dict(), dict(version="0.5.2")]
EPISODE = dict(max_new_tokens=24, temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def env():
    return gym.make("TreeSearchQA-v0", data="synthetic", split="train", max_tool_calls=2)


@pytest.mark.parametrize("modes", HONOURED, ids=["0.5.23-det", "0.5.4-det", "api-key"])
def test_seeded_episode_is_identical_through_both_backends(standin, model_dir, local, env, modes):
    client = client_for(standin(**modes), model_dir, api_key=modes.get("api_key"), seeds="require")
    for seed in (3, 4):
        remote = run_episode(client, env, seed=seed, **EPISODE)
        ref = run_episode(local, env, seed=seed, **EPISODE)
        assert remote.token_ids == ref.token_ids and remote.action_mask == ref.action_mask
        torch.testing.assert_close(torch.tensor(remote.logprobs), torch.tensor(ref.logprobs),
                                   atol=1e-5, rtol=0)
        assert remote.reward == ref.reward and remote.transcript == ref.transcript


@pytest.mark.parametrize("modes", IGNORED, ids=["0.5.23-default", "0.5.2"])
def test_seeded_episode_differs_where_seeds_are_ignored_and_greedy_still_agrees(
        standin, model_dir, local, env, modes):
    """The documented difference: a server that ignores seeds samples other tokens than the
    same seeded episode on HFPolicy (and than itself on a rerun); greedy episodes still agree."""
    client = client_for(standin(**modes), model_dir)
    with pytest.warns(SGLangWarning, match="ignores per-request seeds"):
        client.server_info()
    sampled = [run_episode(client, env, seed=3, **EPISODE).token_ids for _ in range(2)]
    ref = run_episode(local, env, seed=3, **EPISODE)
    assert not (sampled[0] == sampled[1] == ref.token_ids)
    greedy = dict(EPISODE, temperature=0.0)
    remote = run_episode(client, env, seed=3, **greedy)
    ref = run_episode(local, env, seed=3, **greedy)
    assert remote.token_ids == ref.token_ids and remote.transcript == ref.transcript


def test_preferred_sampling_params_cannot_change_our_sampling(standin, model_dir, local):
    srv = standin(deterministic=True, preferred_sampling_params={"top_k": 5, "min_p": 0.2,
                                                                  "temperature": 0.3})
    client = client_for(srv, model_dir)
    ids = tuple(client.encode_prompt(SEARCH_PROMPT))
    reqs = [GenRequest(ids, max_new_tokens=8, seed=s) for s in range(2)]
    assert_same(client.generate(reqs), local.generate(reqs))
    # keys the client cannot override on every release are refused before any rollout
    bad = standin(deterministic=True, preferred_sampling_params={"logit_bias": {"5": 3.0}})
    with pytest.raises(SGLangError, match=r"preferred-sampling-params.*logit_bias"):
        client_for(bad, model_dir).generate(reqs)


# -- the documented difference where they are not ----------------------------------------------

def test_a_default_server_ignores_seeds_and_the_client_says_so(standin, model_dir, local):
    srv = standin()  # 0.5.23 without --enable-deterministic-inference
    client = client_for(srv, model_dir)
    with pytest.warns(SGLangWarning, match="enable-deterministic-inference.*radix cache"):
        info = client.server_info()
    assert info.seeds_accepted and not info.seeds_honoured
    # the same seed no longer gives the same sample (a real default server behaves alike) ...
    req = GenRequest((11, 12, 13), max_new_tokens=12, seed=7, temperature=1.5)
    outs = {tuple(r.token_ids) for r in client.generate([req] * 8)}
    assert len(outs) > 1
    # ... but greedy decoding still does, and log-probs still belong to the sampled tokens
    ids = tuple(client.encode_prompt(SEARCH_PROMPT))
    greedy = [GenRequest(ids, max_new_tokens=30, temperature=0.0, stop=STOPS)]
    assert_same(client.generate(greedy), local.generate(greedy))
    with pytest.raises(SGLangError, match=f"{srv.url}.*ignores per-request seeds"):
        client_for(srv, model_dir, seeds="require").server_info()


# -- older releases -------------------------------------------------------------------------------

def test_pre_055_output_ids_with_prompt_tokens_parse(standin, model_dir, local):
    srv = standin(version="0.5.4", deterministic=True)
    client = client_for(srv, model_dir)
    assert client.server_info().prefixed_output_ids
    ids = tuple(client.encode_prompt(SEARCH_PROMPT))
    raw = httpx.post(f"{srv.url}/generate", json={
        "input_ids": list(ids), "sampling_params": {"max_new_tokens": 3, "temperature": 0.0},
        "return_logprob": True}).json()
    lp_ids = [row[1] for row in raw["meta_info"]["output_token_logprobs"]]
    assert raw["output_ids"] == list(ids[-5:]) + lp_ids  # the real pre-0.5.5 shape
    reqs = [GenRequest(ids, max_new_tokens=30, temperature=0.0, stop=STOPS),
            GenRequest(ids, max_new_tokens=6, seed=5)]
    assert_same(client.generate(reqs), local.generate(reqs))


def test_pre_053_server_is_detected_and_gets_no_seed(standin, model_dir, local):
    srv = standin(version="0.5.2")
    # what an unaware client met: sampling_seed is an unknown keyword there (HTTP 500)
    resp = httpx.post(f"{srv.url}/generate", json={
        "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "sampling_seed": 1}})
    assert resp.status_code == 500
    client = client_for(srv, model_dir)
    with pytest.warns(SGLangWarning, match="0.5.2, before sampling_seed"):
        info = client.server_info()
    assert not info.seeds_accepted and info.prefixed_output_ids
    ids = tuple(client.encode_prompt(SEARCH_PROMPT))
    reqs = [GenRequest(ids, max_new_tokens=30, temperature=0.0, stop=STOPS),
            GenRequest(ids, max_new_tokens=4, seed=3)]
    sent_before = len(srv.app.state.requests)
    res = client.generate(reqs)
    assert not any("sampling_seed" in p for p in srv.app.state.requests[sent_before:])
    assert_same(res[:1], local.generate(reqs[:1]))
    assert len(res[1].token_ids) == 4 and all(lp <= 0 for lp in res[1].logprobs)


# -- stop strings: SGLang's window vs the shared rule ---------------------------------------------

def test_a_stop_string_spelled_with_extra_tokens_is_cut_like_hf(standin, model_dir, tmp_path_factory):
    split_dir = build_split_stop_model(model_dir, tmp_path_factory.getbasetemp())
    srv = standin(deterministic=True, model=split_dir)
    client = client_for(srv, split_dir)
    ids = tuple(client.encode_prompt(SPLIT_PROMPT))
    req = GenRequest(ids, max_new_tokens=24, temperature=0.0, stop=STOPS)
    ref = HFPolicy(split_dir).generate([req])[0]
    assert ref.text == SPLIT_HEAD + "</search>" and ref.finish_reason == "stop"
    assert len(ref.token_ids) == len(client.encode(SPLIT_HEAD)) + len("</search>")
    # the server's window (1 canonical token + 1) misses this spelling and samples on
    raw = httpx.post(f"{srv.url}/generate", json={
        "input_ids": list(ids), "sampling_params": {"max_new_tokens": 24, "temperature": 0.0,
                                                     "stop": list(STOPS)},
        "return_logprob": True}).json()
    assert raw["meta_info"]["completion_tokens"] > len(ref.token_ids)
    assert raw["meta_info"]["finish_reason"]["type"] != "stop" or isinstance(
        raw["meta_info"]["finish_reason"]["matched"], int)
    res = client.generate([req])[0]
    assert_same([res], [ref])
    assert res.meta["overrun_tokens"] == raw["meta_info"]["completion_tokens"] - len(ref.token_ids)
    assert client.stats["overrun_tokens"] == res.meta["overrun_tokens"]


def test_generation_config_eos_ends_both_backends_alike(standin, model_dir, local, tmp_path):
    """SGLang stops on the EOS ids of generation_config.json too; so do HFPolicy and the client."""
    import json
    import shutil

    ids = tuple(local.encode_prompt(SEARCH_PROMPT))
    req = GenRequest(ids, max_new_tokens=30, temperature=0.0, stop=STOPS)
    plain = local.generate([req])[0].token_ids
    extra = plain[2]
    shutil.copytree(model_dir, tmp_path / "m")
    cfg_path = tmp_path / "m" / "generation_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], extra]
    cfg_path.write_text(json.dumps(cfg))
    ref = HFPolicy(tmp_path / "m").generate([req])[0]
    assert ref.finish_reason == "eos" and ref.token_ids == plain[:plain.index(extra) + 1]
    srv = standin(deterministic=True, model=tmp_path / "m")
    for tok in (tmp_path / "m", local.tokenizer):  # eos ids from the directory, or the server's
        assert_same(client_for(srv, tok).generate([req]), [ref])


# -- auth, weight sync, refusals -----------------------------------------------------------------

def test_api_key_is_sent_and_a_refusal_is_clear(standin, model_dir):
    srv = standin(deterministic=True, api_key="s3cret")
    assert client_for(srv, model_dir).health()  # /health needs no key, like SGLang's
    t0 = time.perf_counter()
    with pytest.raises(SGLangError, match=f"{srv.url}/server_info refused our credentials "
                                          r"\(HTTP 401.*api_key="):
        client_for(srv, model_dir, retries=5, backoff=2.0).generate(
            [GenRequest((5, 6), max_new_tokens=2)])
    assert time.perf_counter() - t0 < 30  # refused at once: retrying would take over 60 s
    with pytest.raises(SGLangError, match="HTTP 401"):
        client_for(srv, model_dir, api_key="wrong").server_info()
    good = client_for(srv, model_dir, api_key="s3cret")
    assert len(good.generate([GenRequest((5, 6), max_new_tokens=2, seed=0)])[0].token_ids) >= 1
    good.flush_cache()
    admin = standin(deterministic=True, api_key="s3cret", admin_api_key="root")
    with pytest.raises(SGLangError, match="admin_api_key"):
        client_for(admin, model_dir, api_key="s3cret").update_weights_from_disk(model_dir)
    both = client_for(admin, model_dir, api_key="s3cret", admin_api_key="root")
    assert both.update_weights_from_disk(model_dir)["success"]


def test_weight_updates_carry_a_version_and_refusals_name_the_reason(standin, model_dir, tmp_path):
    srv = standin(deterministic=True)
    client = client_for(srv, model_dir)
    ids = tuple(client.encode_prompt(SEARCH_PROMPT))
    req = GenRequest(ids, max_new_tokens=6, temperature=0.0)
    before = client.generate([req])[0]
    assert before.meta["weight_version"] == srv.app.state.weight_version
    # a "training step": perturb the weights, save, push to the server
    moved = HFPolicy(model_dir)
    with torch.no_grad():
        for p in moved.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved.model.save_pretrained(tmp_path / "step1")
    out = client.update_weights_from_disk(tmp_path / "step1", weight_version="step-1")
    assert out["success"] and "step-1" in out["message"]
    after = client.generate([req])[0]
    assert after.meta["weight_version"] == "step-1" and after.logprobs != before.logprobs
    # refused: HTTP 400 with the server's message; the old weights stay and are still checked
    with pytest.raises(SGLangError, match=rf"{srv.url}.*nowhere.*HTTP 400.*Failed to update weights"
                                          r".*weight_version 'step-1'"):
        client.update_weights_from_disk(str(tmp_path / "nowhere"))
    assert client.generate([req])[0].token_ids == after.token_ids
    # someone else swaps the weights: the next rollout refuses to pass them off as ours
    httpx.post(f"{srv.url}/update_weights_from_disk",
               json={"model_path": str(model_dir), "weight_version": "theirs"}).raise_for_status()
    with pytest.raises(SGLangError, match="weight_version 'theirs'.*'step-1'"):
        client.generate([req])
    assert client.update_weights_from_disk(model_dir)["success"]  # a fresh unique version
    assert client.generate([req])[0].token_ids == before.token_ids


def test_bad_requests_are_refused_once_with_the_servers_reason(standin, model_dir):
    srv = standin(deterministic=True)
    client = client_for(srv, model_dir, retries=3, backoff=0.5)
    quiet(client)
    sent_before = len(srv.app.state.requests)
    with pytest.raises(SGLangError, match=rf"{srv.url}/generate rejected the request \(HTTP 400\)"
                                          r".*context length"):
        client.generate([GenRequest((5,) * 2035, max_new_tokens=20)])
    assert len(srv.app.state.requests) == sent_before + 1  # not retried
    resp = httpx.post(f"{srv.url}/generate", json={  # the 0.5.23 contract: unknown keys are 400
        "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2, "top_kk": 3}})
    assert resp.status_code == 400 and "unknown field `top_kk`" in resp.text


def test_servers_that_are_not_sglang_or_too_old_are_refused(model_dir):
    app = FastAPI()
    app.get("/get_server_info")(lambda: {"status": "ok"})
    with StandinServer(app=app) as srv:
        with pytest.raises(SGLangError, match=f"{srv.url} does not look like an SGLang server"):
            client_for(srv, model_dir).generate([GenRequest((1, 2), max_new_tokens=2)])
    with StandinServer(app=FastAPI()) as srv:  # 404 everywhere
        with pytest.raises(SGLangError, match="none of /server_info, /get_server_info exists"):
            client_for(srv, model_dir).server_info()
    old = FastAPI()
    old.get("/get_server_info")(lambda: {"version": "0.4.9"})
    old.get("/get_model_info")(lambda: {"model_path": "m", "weight_version": "default"})
    with StandinServer(app=old) as srv:
        floor = ".".join(map(str, MIN_VERSION))
        with pytest.raises(SGLangError, match=rf"{srv.url} is version 0\.4\.9.*>= {floor}"):
            client_for(srv, model_dir).server_info()
        with pytest.warns(SGLangWarning, match="0.4.9"):
            client_for(srv, model_dir, version_check="warn", seeds="off").server_info()


def test_ids_and_logprobs_that_disagree_are_refused(standin, model_dir):
    from treegym.agents.sglang import parse_output

    tok = client_for(standin(deterministic=True), model_dir).tokenizer
    req = GenRequest((1, 2, 3, 4, 5, 6))
    item = {"output_ids": [9, 7], "meta_info": {"finish_reason": {"type": "length"},
                                                "output_token_logprobs": [[-0.1, 7, None]]}}
    with pytest.raises(SGLangError, match="http://x/generate.*different tokens"):
        parse_output(item, req, tok, "http://x/generate", prefixed_ids=True)  # 9 is not prompt
    item["output_ids"] = [6, 7]  # the pre-0.5.5 shape, accepted only from such a server
    assert parse_output(item, req, tok, "u", prefixed_ids=True).token_ids == [7]
    with pytest.raises(SGLangError, match="different tokens"):
        parse_output(item, req, tok, "u", prefixed_ids=False)


# -- plumbing that was here before ----------------------------------------------------------------

def test_radix_cache_hits_are_reported_and_flushed(standin, model_dir):
    client = client_for(standin(deterministic=True), model_dir)
    ids = tuple(client.encode_prompt(SEARCH_PROMPT + "Doc 1(Title: Pezon) Pezon is a company."))
    client.flush_cache()
    first = client.generate([GenRequest(ids, max_new_tokens=4, seed=1)])[0]
    again = client.generate([GenRequest(ids + (7,), max_new_tokens=4, seed=2)])[0]
    assert first.meta["cached_tokens"] == 0
    assert again.meta["cached_tokens"] == len(ids)
    client.flush_cache()
    cold = client.generate([GenRequest(ids + (7,), max_new_tokens=4, seed=2)])[0]
    assert cold.meta["cached_tokens"] == 0


def test_retries_transient_failures(standin, model_dir):
    srv = standin(deterministic=True)
    client = client_for(srv, model_dir)
    quiet(client)
    srv.faults.extend(["malformed", "503"])
    res = client.generate([GenRequest((5, 6, 7), max_new_tokens=3, seed=0)])
    assert len(res[0].token_ids) >= 1 and not srv.faults


def test_persistent_failures_name_the_url(standin, model_dir):
    srv = standin(deterministic=True)
    client = client_for(srv, model_dir)
    quiet(client)
    srv.faults.extend(["malformed"] * 3)
    with pytest.raises(SGLangError, match=srv.url.replace(".", r"\.") + "/generate"):
        client.generate([GenRequest((5, 6, 7), max_new_tokens=3)])


def test_server_down_names_the_url(model_dir):
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    pol = SGLangPolicy(url, tokenizer=model_dir, retries=2, backoff=0.01, timeout=2)
    assert not pol.health()
    t0 = time.perf_counter()
    with pytest.raises(SGLangError, match=f"127.0.0.1:{port}/server_info.*3 attempts"):
        pol.generate([GenRequest((1, 2), max_new_tokens=2)])
    assert time.perf_counter() - t0 < 20


def test_bad_arguments_are_rejected(model_dir):
    with pytest.raises(ValueError, match="http"):
        SGLangPolicy("localhost:30000", tokenizer=model_dir)
    with pytest.raises(ValueError, match="seeds"):
        SGLangPolicy("http://127.0.0.1:1", tokenizer=model_dir, seeds="sometimes")
    with pytest.raises(ValueError, match="version_check"):
        SGLangPolicy("http://127.0.0.1:1", tokenizer=model_dir, version_check="maybe")


# -- TrainConfig sets every client option -------------------------------------------------------

def test_train_config_sets_every_client_option(monkeypatch):
    from treegym.train.config import ConfigError, SGLangConfig, TrainConfig, parse_args

    params = set(inspect.signature(SGLangPolicy).parameters)
    # url and tokenizer come from rollout_server and the trainer's model; eos ids from its model
    assert params - {"url", "tokenizer", "eos_token_ids"} == set(SGLangConfig().client_kwargs())
    cfg = parse_args(["--model", "m", "--rollout-server", "http://127.0.0.1:30000",
                      "--sglang.api-key", "env:TG_TEST_KEY", "--sglang.seeds", "require",
                      "--sglang.version-check", "warn", "--sglang.timeout", "12.5"])
    assert isinstance(cfg, TrainConfig) and cfg.sglang.seeds == "require"
    with pytest.raises(ConfigError, match="TG_TEST_KEY"):
        cfg.sglang.client_kwargs()
    monkeypatch.setitem(os.environ, "TG_TEST_KEY", "k")
    kw = cfg.sglang.client_kwargs()
    assert kw["api_key"] == "k" and kw["admin_api_key"] is None and kw["timeout"] == 12.5
    assert kw["version_check"] == "warn"
