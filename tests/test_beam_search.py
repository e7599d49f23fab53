"""app/beam_search.py on hand-made next-token tables: the steps and the ranking worked out by
hand, and the ranking against vLLM's score computed as vLLM writes it."""

from __future__ import annotations

import random

import pytest

from app.beam_search import Beam, BeamSearch, BeamSearchParams, run

STOP = 9
PROMPT_LEN = 3
# the likeliest next tokens (2 x width of them) after each generated prefix
TABLE = {
    (): [(1, -0.1), (2, -0.5), (STOP, -1.0), (3, -3.0)],
    (1,): [(STOP, -0.2), (4, -2.0), (5, -2.5), (6, -4.0)],
    (2,): [(7, -0.3), (8, -0.4), (STOP, -5.0), (4, -6.0)],
}


def _search(length_penalty: float = 1.0, keep: bool = False, max_tokens: int = 2) -> BeamSearch:
    params = BeamSearchParams(2, max_tokens, frozenset({STOP}), length_penalty, keep)
    search = BeamSearch(params, PROMPT_LEN)
    while not search.done:
        search.advance([TABLE[beam.tokens] for beam in search.running])
    return search


def test_each_step_keeps_the_likeliest_running_beams_and_every_stopped_one():
    search = _search()
    # step 1: 1 and 2 run on, 3 does not; STOP ends a beam of no tokens
    # step 2: (2, 7) at -0.8 and (2, 8) at -0.9 beat (1, 4) at -2.1
    assert [(b.tokens, b.cum_logprob) for b in search.running] == [
        ((2, 7), pytest.approx(-0.8)),
        ((2, 8), pytest.approx(-0.9)),
    ]
    assert [(b.tokens, b.cum_logprob, b.finish_reason) for b in search.finished] == [
        ((), -1.0, "stop"),
        ((1,), pytest.approx(-0.3), "stop"),
        ((2,), pytest.approx(-5.5), "stop"),
    ]
    assert search.num_steps == 2 and search.done


def test_the_best_beams_by_length_penalty():
    # scores (cum / (3 + tokens) ** penalty): () -1/3, (1,) -0.3/4, (2,) -5.5/4, (2, 7) -0.8/5,
    # (2, 8) -0.9/5
    assert [b.tokens for b in _search(1.0).best()] == [(1,), (2, 7)]
    # penalty -2 (cum * length ** 2): () -9, (1,) -4.8, (2, 7) -20
    assert [b.tokens for b in _search(-2.0).best()] == [(1,), ()]
    # penalty 0: the cumulative logprob alone
    assert [b.tokens for b in _search(0.0).best()] == [(1,), (2, 7)]


def test_a_kept_stop_token_is_an_output_token_but_not_counted_in_the_length():
    plain, kept = _search(-2.0, keep=False).best(), _search(-2.0, keep=True).best()
    assert [b.tokens for b in kept] == [(1, STOP), (STOP,)]  # same ranking as without
    assert [b.tokens for b in plain] == [(1,), ()]
    assert [len(b.steps) for b in kept] == [2, 1] and [len(b.steps) for b in plain] == [1, 0]
    assert kept[0].steps == (TABLE[()], TABLE[(1,)])


def test_the_search_ends_when_every_candidate_stops():
    params = BeamSearchParams(1, 5, frozenset({STOP}))
    search = BeamSearch(params, PROMPT_LEN)
    search.advance([[(STOP, -0.1), (STOP + 1, -0.2)]])  # 10 runs on
    search.advance([[(STOP, -0.5)]])
    assert search.done and search.running == []
    [best] = search.best()
    assert best.tokens == () and best.finish_reason == "stop"  # -0.1 / 3 beats -0.7 / 4


def test_the_ranking_is_vllms_score_order():
    """Against cum_logprob / length ** length_penalty, computed as vLLM does."""
    rng = random.Random(0)
    for _ in range(200):
        penalty = rng.choice([0.0, 0.5, 1.0, 2.0, -1.0, rng.uniform(-3, 3)])
        search = BeamSearch(BeamSearchParams(4, 8, frozenset(), penalty), PROMPT_LEN)
        beams = [Beam(tuple(range(rng.randint(1, 8))), -rng.uniform(0.01, 30)) for _ in range(12)]
        search.running, search.finished = beams[:4], beams[4:]

        def score(beam: Beam, penalty=penalty) -> float:
            return beam.cum_logprob / (PROMPT_LEN + len(beam.tokens)) ** penalty

        want = sorted(beams, key=score, reverse=True)[:4]
        assert [score(b) for b in search.best()] == [score(b) for b in want]


def test_extreme_length_penalties_rank_without_overflow():
    for penalty in (1e308, -1e308):
        search = BeamSearch(BeamSearchParams(2, 8, frozenset(), penalty), PROMPT_LEN)
        search.running = [Beam((1,), -1.0), Beam((1, 2), -2.0), Beam((), 0.0)]
        assert search.best()[0].cum_logprob == 0.0  # probability 1 scores best


def test_a_step_for_each_running_beam():
    search = BeamSearch(BeamSearchParams(2, 3, frozenset()), PROMPT_LEN)
    with pytest.raises(ValueError, match="2 steps for 1 running beams"):
        search.advance([TABLE[()], TABLE[()]])
    with pytest.raises(ValueError, match="at least 1"):
        BeamSearch(BeamSearchParams(0, 3, frozenset()), PROMPT_LEN)


def test_token_logprobs_name_each_tokens_rank_among_its_steps_candidates():
    [best, second] = _search(-2.0, keep=True).best()
    assert best.token_logprobs(2) == [
        (1, -0.1, ((1, -0.1), (2, -0.5)), 1),
        (STOP, -0.2, ((STOP, -0.2), (4, -2.0)), 1),
    ]
    assert second.token_logprobs(1) == [(STOP, -1.0, ((1, -0.1),), 3)]


def test_run_takes_each_step_of_every_running_beam_side_by_side():
    import asyncio

    seen = []

    async def step(number: int, j: int, beam: Beam):
        seen.append((number, j, beam.tokens))
        await asyncio.sleep(0)
        return TABLE[beam.tokens]

    search = BeamSearch(BeamSearchParams(2, 2, frozenset({STOP})), PROMPT_LEN)
    best = asyncio.run(run(search, step))
    assert [b.tokens for b in best] == [(1,), (2, 7)]  # as _search's
    assert seen == [(0, 0, ()), (1, 0, (1,)), (1, 1, (2,))]


def test_a_failed_step_cancels_the_others_and_is_raised():
    import asyncio

    cancelled = []

    async def step(number: int, j: int, beam: Beam):
        if j == 1:
            raise RuntimeError("replica lost")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(j)
            raise
        return TABLE[beam.tokens]

    search = BeamSearch(BeamSearchParams(2, 3, frozenset()), PROMPT_LEN)
    search.running = [Beam((1,)), Beam((2,))]
    with pytest.raises(RuntimeError, match="replica lost"):
        asyncio.run(run(search, step))
    assert cancelled == [0]
