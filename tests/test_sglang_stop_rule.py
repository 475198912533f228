"""The one finish rule (`treegym.agents.base.first_end`) that HFPolicy applies while sampling and
SGLangPolicy applies to what a server sampled past it: the earliest EOS or stop-string completion,
whatever number of tokens spells the stop string."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from treegym.agents import ByteTokenizer
from treegym.agents.base import ends_generation, eos_token_ids, first_end, stop_window

TOK = ByteTokenizer()
EOS = TOK.eos_token_id
ALPHABET = "ab</>sé世 "


def walk(ids, stops):
    """HFPolicy's incremental rule, token by token (what first_end must equal)."""
    window = stop_window(stops)
    for k in range(1, len(ids) + 1):
        why = ends_generation(ids[:k], stops, TOK.decode, {EOS}, window)
        if why is not None:
            return k, why
    return None


def reference(ids, stops):
    """Earliest k whose *whole* prefix shows a stop string (or ends in EOS): no window at all."""
    for k in range(1, len(ids) + 1):
        if ids[k - 1] == EOS:
            return k, "eos"
        if any(s in TOK.decode(ids[:k]) for s in stops):
            return k, "stop"
    return None


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40),
       stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=6), max_size=3),
       eos_at=st.one_of(st.none(), st.integers(min_value=0, max_value=60)))
def test_first_end_is_the_earliest_completion_however_it_is_spelled(text, stops, eos_at):
    ids = TOK.encode(text)  # byte tokens: a multi-byte character spans several tokens
    if eos_at is not None:
        ids.insert(min(eos_at, len(ids)), EOS)
    assert first_end(ids, stops, TOK.decode, {EOS}) == walk(ids, stops) == reference(ids, stops)


def test_window_and_eos_union():
    assert stop_window(["</search>", "世"]) == 10 and stop_window([]) == 1
    assert first_end(TOK.encode("x</search> more"), ["</search>"], TOK.decode, ()) == (10, "stop")
    assert first_end(TOK.encode("no stop"), ["</search>"], TOK.decode, ()) is None
    # SGLang stops on config + generation_config EOS ids too; so does every treegym backend
    assert eos_token_ids(TOK, {"eos_token_id": [2, 3]}, {"eos_token_id": None}, None) == {256, 2, 3}
