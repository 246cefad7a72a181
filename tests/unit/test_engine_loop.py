"""The serving loop's prompt cache, over a fake pipeline: an ended session keeps its KV, a
prompt that starts the same way takes it over and prefills only the rest, and kept KV gives
way (to the KV budget, to --prompt-cache, to a re-plan). No model, no sockets.

The fake is a real Pipeline stand-in plugged in the way the loop uses one (next_token,
first_tokens, next_tokens, drop, ctx, config): it keeps, per session, the tokens its "KV" holds, checks that every
call continues at a position it has, and answers with a token that depends on every token
before it: a session fed from a wrong position, or with a stale cache, gives another answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fastserve_edge.engine.generate import DecodeStep, PipelineReset, Prefill
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.engine.kv_cache import INITIAL_TOKENS
from fastserve_edge.models.config import ModelConfig
from fastserve_edge.serving.engine_loop import KV_GROWTH, PROMPT_CACHE_MIN, STALE_TAIL, EngineLoop, Finished, Token

CTX = 128
GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)


class FakePipeline:
    ctx = CTX
    # what the loop reads of the model: no sliding window, so any prefix of a kept session's KV is reusable
    config = ModelConfig("llama", n_layers=1, dim=64, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=128,
                         vocab_size=256, context_length=CTX)
    stages: list = []
    meters: list = []

    def __init__(self) -> None:
        self.kv: dict[str, list[int]] = {}     # session -> tokens its KV holds, by position
        self.fed: list[tuple[str, int, int]] = []  # (session, position, tokens) of every call
        self.drops: list[str] = []
        self.reset_next = False
        self.broken: set[str] = set()  # sessions whose rows make any call that carries them fail

    def _feed(self, session: str, ids: Sequence[int], pos: int) -> int:
        held = self.kv.get(session, [])
        if session in self.broken:
            raise RuntimeError("this session's rows break the kernel")
        assert pos <= len(held), f"{session} fed at {pos} but holds {len(held)} tokens"
        self.kv[session] = held = held[:pos] + list(ids)  # positions from pos on are overwritten
        self.fed.append((session, pos, len(ids)))
        return 100 + sum((i + 1) * t for i, t in enumerate(held)) % 97  # depends on every token and its place

    def next_token(self, session, ids, pos, sampler, context) -> int:
        return self._feed(session, ids, pos)

    def first_tokens(self, prefills: Sequence[Prefill]) -> list[int]:
        return [self._feed(p.session, p.ids, p.pos) for p in prefills]  # one failure fails the call

    def next_tokens(self, steps: Sequence[DecodeStep]) -> list[int]:
        if self.reset_next:
            self.reset_next = False
            self.kv.clear()
            raise PipelineReset("a peer left")
        return [self._feed(s.session, [s.token], s.pos) for s in steps]

    def drop(self, session: str) -> None:
        self.drops.append(session)
        self.kv.pop(session, None)

    can_fork = True  # False: as a cluster's, whose peers cannot copy a session's KV

    def fork(self, source: str, copies: Sequence[str]) -> bool:
        if not self.can_fork:
            return False
        for copy in copies:
            self.kv[copy] = list(self.kv[source])
        return True


def prompt(first: int, n: int, *, shared: Sequence[int] = ()) -> list[int]:
    return list(shared) + list(range(first, first + n - len(shared)))


SYSTEM = prompt(1, PROMPT_CACHE_MIN + 4)  # a system prompt longer than the cache's minimum


async def answer(engine: EngineLoop, ids: Sequence[int], max_tokens: int = 5):
    """-> (session, tokens, finish reason)"""
    s = engine.submit(ids, Sampler(GREEDY), max_tokens=max_tokens, stop_ids=frozenset())
    tokens = []
    while True:
        event = await s.events.get()
        if isinstance(event, Token):
            tokens.append(event.id)
        else:
            assert isinstance(event, Finished)
            return s, tokens, event.reason


def run(body, ctx: int = CTX, **options):
    """body(engine, fake) inside a running engine loop over a fresh fake pipeline."""
    fake = FakePipeline()
    fake.ctx = ctx

    async def main():
        engine = EngineLoop(fake, **{"max_sessions": 2, **options})
        engine.start()
        try:
            return await body(engine, fake)
        finally:
            await engine.close()

    return asyncio.run(main()), fake


def fresh_answer(ids: Sequence[int], max_tokens: int = 5, ctx: int = CTX) -> list[int]:
    async def body(engine, fake):
        return (await answer(engine, ids, max_tokens))[1]
    return run(body, ctx, prompt_cache=0)[0]


def test_the_next_turn_of_a_chat_prefills_only_the_new_message():
    turn1 = prompt(1, 40)

    async def body(engine, fake):
        s1, a1, reason = await answer(engine, turn1)
        assert reason == "length" and engine.kept_sessions == 1
        assert fake.kv[s1.kv] == turn1 + a1[:-1]  # the last token was sampled, never fed
        turn2 = turn1 + a1 + prompt(500, 12)   # the client sends the whole conversation again
        s2, a2, _ = await answer(engine, turn2)
        return s1, s2, turn2, a2

    (s1, s2, turn2, a2), fake = run(body)
    reuse = 40 + 5 - 1
    assert s2.kv == s1.kv and s2.id != s1.id and s2.cached == reuse  # it took the ended session's KV over
    assert (s2.kv, reuse, len(turn2) - reuse) in fake.fed  # and fed only what it did not hold
    assert a2 == fresh_answer(turn2)  # the same answer as with no cache at all


def test_a_shared_system_prompt_is_reused_and_the_same_prompt_again_decodes_its_last_token():
    first, second = prompt(100, 30, shared=SYSTEM), prompt(300, 33, shared=SYSTEM)

    async def body(engine, fake):
        await answer(engine, first)
        s2, a2, _ = await answer(engine, second)
        s3, a3, _ = await answer(engine, second)  # the very same prompt: only its last token runs
        return s2, a2, s3, a3, engine.metrics

    (s2, a2, s3, a3, metrics), fake = run(body)
    assert s2.cached == len(SYSTEM) and a2 == fresh_answer(second)
    assert s3.cached == len(second) - 1 and a3 == a2
    assert metrics.cached_tokens == len(SYSTEM) + len(second) - 1
    assert metrics.prompt_tokens == len(first) + 2 * len(second)


def test_too_short_a_shared_start_reuses_nothing_and_a_cancelled_session_is_not_kept():
    first = prompt(1, 30)
    short = first[:PROMPT_CACHE_MIN - 1] + prompt(900, 20)

    async def body(engine, fake):
        s1, _, _ = await answer(engine, first)
        s2, _, _ = await answer(engine, short)
        assert s2.kv != s1.kv and s2.cached == 0
        s3 = engine.submit(prompt(2000, 30), Sampler(GREEDY), max_tokens=50, stop_ids=frozenset())
        await s3.events.get()
        engine.cancel(s3)
        await asyncio.sleep(0.05)
        return engine.kept_sessions, s3

    (kept, s3), fake = run(body)
    assert kept == 2 and s3.kv in fake.drops and s3.kv not in fake.kv


def test_a_long_kept_conversation_is_not_spent_on_a_prompt_that_shares_only_its_start():
    """A kept session's caches never shrink: one whose KV is mostly other tokens than the
    shared start (more than STALE_TAIL of them) is left for its own next turn."""
    long = prompt(1, STALE_TAIL + 80, shared=SYSTEM)

    async def body(engine, fake):
        s1, a1, _ = await answer(engine, long)
        other, _, _ = await answer(engine, prompt(5000, 40, shared=SYSTEM))
        assert other.cached == 0 and other.kv != s1.kv and s1.kv in fake.kv  # still kept
        nxt, _, _ = await answer(engine, long + a1 + prompt(9000, 6))
        return s1, nxt

    (s1, nxt), fake = run(body, ctx=512)
    assert nxt.kv == s1.kv and nxt.cached == len(long) + 4


def test_a_kept_session_a_request_would_grow_to_anyway_is_taken_over():
    """A kept answer (prompt + 300 tokens) shares only a system prompt with the next request,
    whose prompt + max_tokens reach its size: the next request takes it over (its caches would
    grow that large anyway) and answers as with no cache."""
    first, second = prompt(100, 40, shared=SYSTEM), prompt(300, 40, shared=SYSTEM)

    async def body(engine, fake):
        s1, _, _ = await answer(engine, first, max_tokens=300)
        s2, a2, _ = await answer(engine, second, max_tokens=300)
        return s1, s2, a2

    (s1, s2, a2), fake = run(body, ctx=1024)
    assert s2.kv == s1.kv and s2.cached == len(SYSTEM)
    assert a2 == fresh_answer(second, max_tokens=300, ctx=1024)


class SizedPipeline(FakePipeline):
    """The fake, with each session's caches sized as KVCache sizes them (INITIAL_TOKENS, then
    doubling, never shrinking)."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity: dict[str, int] = {}

    def _feed(self, session, ids, pos):
        token = super()._feed(session, ids, pos)
        have = self.capacity.get(session, INITIAL_TOKENS)
        end = pos + len(ids)
        self.capacity[session] = have if end <= have else min(self.ctx, max(end, 2 * have))
        return token

    def drop(self, session):
        super().drop(session)
        self.capacity.pop(session, None)


def test_a_taken_over_kv_is_charged_for_its_caches_until_the_session_holds_as_much():
    """The KV budget's bound on what a session's caches allocate (2 * counted + INITIAL_TOKENS)
    holds before every step for a session that took over caches grown far past what it holds:
    the loop counts it for its caches' size, not only for its tokens."""
    fake = SizedPipeline()
    fake.ctx = 1024
    checked = []

    async def main():
        engine = EngineLoop(fake, max_sessions=2)
        one_step = engine._one_step

        async def checked_step():  # the bound, for every session that holds KV, as the step is planned
            extra = dict((s.id, e) for s, e in engine._overcharged())
            for job in engine.sched.jobs():
                s = engine._sessions[job.id]
                if job.kv_tokens and s.kv in fake.capacity:
                    assert fake.capacity[s.kv] <= 2 * (job.kv_tokens + extra.get(s.id, 0)) + INITIAL_TOKENS
                    checked.append(extra.get(s.id, 0))
            await one_step()

        engine._one_step = checked_step
        engine.start()
        try:
            await answer(engine, prompt(100, 40, shared=SYSTEM), max_tokens=400)
            return await answer(engine, prompt(300, 40, shared=SYSTEM), max_tokens=420)
        finally:
            await engine.close()

    s, tokens, reason = asyncio.run(main())
    assert reason == "length", "a failed check ends the loop's sessions with an error"
    assert s.cached == len(SYSTEM) and max(checked) > 0  # it took the kept KV over, and was charged for it
    assert tokens == fresh_answer(s.prompt, max_tokens=420, ctx=1024)


def test_a_taken_over_kv_evicted_before_its_first_step_counts_as_no_cache():
    """usage.cached_tokens and /metrics count what a prefill really reused: a session that
    took a kept KV over but lost it to the KV budget before it ran prefills everything."""
    kept_prompt = prompt(1, 40)

    async def body(engine, fake):
        _, a1, _ = await answer(engine, kept_prompt)
        first = asyncio.ensure_future(answer(engine, prompt(5000, 60), max_tokens=50))
        await asyncio.sleep(0)  # it is submitted, and runs first (fcfs, one at a time)
        second = await answer(engine, kept_prompt + a1 + prompt(9000, 5))
        await first
        return second, engine.metrics

    ((s, tokens, _), metrics), fake = run(body, kv_room=lambda: 0, max_sessions=1)
    assert metrics.evictions >= 1 and s.cached == 0 and metrics.cached_tokens == 0
    assert tokens == fresh_answer(s.prompt)


def test_the_cache_keeps_the_most_recent_sessions_and_zero_turns_it_off():
    prompts = [prompt(1000 * i, 30) for i in range(1, 4)]

    async def three(engine, fake):
        return [(await answer(engine, p))[0].kv for p in prompts]

    ids, fake = run(three, prompt_cache=2)
    assert set(fake.kv) == set(ids[1:])  # the oldest went first
    ids, fake = run(three, prompt_cache=0)
    assert not fake.kv


def test_kept_kv_gives_way_to_live_sessions_within_the_kv_budget():
    """A budget of one context (128 tokens): a kept session of 64 and two live ones of 40 + 5
    each do not fit together; the kept KV is dropped before the step, never a live session's."""

    async def body(engine, fake):
        assert engine.kv_budget_tokens == CTX
        kept, _, _ = await answer(engine, prompt(1, 60))
        assert engine.kept_sessions == 1
        results = await asyncio.gather(answer(engine, prompt(5000, 40)), answer(engine, prompt(6000, 40)))
        assert engine.metrics.evictions == 0 and all(r[2] == "length" for r in results)
        return kept

    kept, fake = run(body, kv_room=lambda: 0)  # no memory to speak of: the budget's floor, one context
    assert kept.kv in fake.drops


def test_the_kv_budget_leaves_room_for_every_caches_first_allocation():
    """KVCache allocates INITIAL_TOKENS positions however little a session holds, and grows by
    doubling: the budget is what the room holds after a first allocation per session, halved."""
    room = 900  # between one context (128) and max_sessions (2) full ones, once the first allocations are out

    async def body(engine, fake):
        return engine.kv_budget_tokens

    budget, _ = run(body, kv_room=lambda: room)
    assert budget == (room - 2 * INITIAL_TOKENS) // KV_GROWTH  # max_sessions 2, nothing held yet


def test_a_replan_drops_the_kept_sessions():
    async def body(engine, fake):
        s1, _, _ = await answer(engine, prompt(1, 30))
        fake.reset_next = True  # the next batched decode step meets a re-plan
        s2, a2, reason = await answer(engine, prompt(4000, 30))
        return s1, s2, a2, reason, engine.kept_sessions

    (s1, s2, a2, reason, kept), fake = run(body)
    assert s1.kv in fake.drops and reason == "length" and a2 == fresh_answer(prompt(4000, 30))
    assert kept == 1 and set(fake.kv) == {s2.kv}  # only the session that ended after the re-plan


def test_a_negative_prompt_cache_is_refused_by_serve_before_any_model_loads():
    from cli.serve import serve
    from fastserve_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="--prompt-cache must be at least 0"):
        serve(model=None, host="127.0.0.1", port=0, api_key=None, max_sessions=4, scheduler="fcfs", ctx=None,
              threads=None, insecure=False, prompt_cache=-1)


def test_a_session_that_breaks_a_batched_step_ends_alone_and_the_others_go_on():
    """A batched prefill or decode step that raises is run again one session at a time: the
    session that fails alone too ends with an error; the ones beside it keep their answers."""
    good, bad = prompt(1, 30), prompt(7000, 30)

    async def finish(s):
        tokens = []
        while not isinstance(event := await s.events.get(), Finished):
            tokens.append(event.id)
        return tokens, event.reason

    async def body(engine, fake):
        # in the prefill: both prompts' prefills are one call, and one of them breaks it
        a = engine.submit(good, Sampler(GREEDY), max_tokens=5, stop_ids=frozenset())
        b = engine.submit(bad, Sampler(GREEDY), max_tokens=5, stop_ids=frozenset())
        fake.broken.add(b.kv)
        prefill = await asyncio.gather(finish(a), finish(b))
        fake.broken.clear()
        # in a decode step: it breaks once both are decoding together
        a = engine.submit(prompt(3000, 30), Sampler(GREEDY), max_tokens=5, stop_ids=frozenset())
        b = engine.submit(bad, Sampler(GREEDY), max_tokens=5, stop_ids=frozenset())
        first = await b.events.get()  # its first token was sent; the step in flight may send one more
        fake.broken.add(b.kv)
        decode = await asyncio.gather(finish(a), finish(b))
        return prefill, decode, [first.id] + decode[1][0]

    (prefill, decode, sent), fake = run(body, prompt_cache=0)
    assert prefill == [(fresh_answer(good), "length"), ([], "error")]
    assert decode[0] == (fresh_answer(prompt(3000, 30)), "length") and decode[1][1] == "error"
    assert 1 <= len(sent) < 5 and sent == fresh_answer(bad)[:len(sent)]  # what it was sent stays right


@pytest.mark.parametrize("can_fork", [True, False])
def test_n_answers_share_one_prefill_and_each_answers_as_alone(can_fork):
    """submit_many: the first session prefills; the others take a copy of its prompt's KV and
    feed only the prompt's last token (or, where the stages cannot copy, prefill alone)."""
    ids = prompt(1, 30)

    async def body(engine, fake):
        fake.can_fork = can_fork
        sessions = engine.submit_many(ids, [Sampler(GREEDY) for _ in range(3)], max_tokens=5, stop_ids=frozenset())
        answers = []
        for s in sessions:
            tokens = []
            while not isinstance(event := await s.events.get(), Finished):
                tokens.append(event.id)
            answers.append((tokens, event.reason))
        return sessions, answers

    (sessions, answers), fake = run(body, prompt_cache=0, max_sessions=4)
    assert answers == [(fresh_answer(ids), "length")] * 3
    leader, *followers = sessions
    assert (leader.kv, 0, 30) in fake.fed
    for f in followers:
        assert ((f.kv, 29, 1) in fake.fed) == can_fork and ((f.kv, 0, 30) in fake.fed) != can_fork
        assert f.cached == (29 if can_fork else 0)
