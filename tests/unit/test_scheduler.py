"""The request scheduler with a simulated clock: FCFS order, MLFQ skip-join, demotion,
preemption, promotion, KV budget and eviction, a property test over random workloads,
and a simulated FCFS vs MLFQ comparison on a mixed workload. No model, no sockets."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastserve_edge.errors import ConfigError
from fastserve_edge.serving.scheduler import FCFS, MLFQ, Batch, Job, make_scheduler

BIG = 1_000_000  # a KV budget that never binds


def step(sched, now, dt, *, max_batch=8, kv=BIG) -> tuple[Batch, tuple[str, ...]]:
    """One step of the token loop that takes `dt` seconds starting at `now`."""
    batch = sched.next_batch(now, max_batch=max_batch, kv_budget_tokens=kv)
    return batch, sched.on_step(batch, now + dt, dt)


@dataclass(frozen=True)
class Req:
    id: str
    arrival: float
    prompt: int
    out: int
    cancel_after: int | None = None  # the client goes away once it has this many tokens


def step_cost(sched, batch: Batch) -> float:
    """A CPU pipeline's step: fixed overhead + per-row decode + prefill per token fed."""
    fed = sum(sched.job(i).context for i in batch.prefill)
    return 0.02 + 0.004 * len(batch.run) + 0.0005 * fed


def simulate(sched, reqs, *, max_batch, kv, max_steps=100_000, check=True) -> dict[str, float]:
    """Run the loop until every request finished or was cancelled; check the invariants of
    every step with a KV model of its own. Returns id -> completion time."""
    pending = sorted(reqs, key=lambda r: r.arrival)
    by_id = {r.id: r for r in reqs}
    kv_held: dict[str, int] = {}      # the test's own account of the KV the stages hold
    tokens: dict[str, int] = {}       # tokens each job has been given
    done: dict[str, float] = {}
    now, steps = 0.0, 0
    while pending or len(sched):
        while pending and pending[0].arrival <= now:
            r = pending.pop(0)
            sched.add(Job(r.id, r.arrival, r.prompt, r.out), now)
            tokens[r.id] = 0
        if not len(sched):
            now = pending[0].arrival
            continue
        batch = sched.next_batch(now, max_batch=max_batch, kv_budget_tokens=kv)
        steps += 1
        assert steps <= max_steps, "no progress"
        if check:
            assert batch.run, "a step with waiting jobs must run at least one"
            assert len(batch.run) == len(set(batch.run)) <= max_batch  # no job runs in two places
            assert not set(batch.run) & set(batch.evict) and not batch.oversized
            assert set(batch.run) <= set(tokens) - set(done)
            for i in batch.evict:
                kv_held[i] = 0
            needed = {i: by_id[i].prompt + tokens[i] for i in batch.run}
            assert set(batch.prefill) == {i for i in batch.run if kv_held.get(i, 0) == 0}
            after = sum(v for i, v in kv_held.items() if i not in needed) + sum(needed.values())
            assert after == batch.kv_tokens <= kv
        dt = step_cost(sched, batch)
        cancelled = [i for i in batch.run if by_id[i].cancel_after is not None and tokens[i] >= by_id[i].cancel_after]
        for i in cancelled:  # the client went away while its step was running
            sched.remove(i)
        now += dt
        finished = sched.on_step(batch, now, dt)
        for i in batch.run:
            if i in cancelled:
                done[i] = now
                kv_held.pop(i, None)
                continue
            tokens[i] += 1
            kv_held[i] = by_id[i].prompt + tokens[i] - 1
        for i in finished:
            assert tokens[i] == by_id[i].out
            done[i] = now
            kv_held.pop(i)
        assert sum(kv_held.values()) <= kv
    assert set(done) == set(by_id)
    return done


# -- FCFS -------------------------------------------------------------------------------------


def test_fcfs_runs_earliest_first_up_to_max_batch_and_never_preempts():
    s = FCFS()
    for k, t in enumerate([0.3, 0.1, 0.2, 0.4]):
        s.add(Job(f"j{k}", t, prompt_tokens=5, max_tokens=3), now=0.5)
    batch, _ = step(s, 0.5, 0.1, max_batch=2)
    assert batch.run == ("j1", "j2") and batch.prefill == ("j1", "j2")
    s.add(Job("late", 0.6, prompt_tokens=1, max_tokens=1), now=0.6)
    batch, _ = step(s, 0.6, 0.1, max_batch=2)
    assert batch.run == ("j1", "j2") and batch.prefill == () and batch.preempt == ()
    batch, finished = step(s, 0.7, 0.1, max_batch=2)
    assert finished == ("j1", "j2")
    assert step(s, 0.8, 0.1, max_batch=2)[0].run == ("j0", "j3")


def test_fcfs_new_job_waits_for_kv_room_and_blocks_later_ones():
    s = FCFS()
    s.add(Job("a", 0.0, prompt_tokens=60, max_tokens=10), 0.0)
    step(s, 0.0, 0.1, kv=100)
    s.add(Job("big", 0.1, prompt_tokens=50, max_tokens=5), 0.1)
    s.add(Job("small", 0.2, prompt_tokens=5, max_tokens=5), 0.2)
    batch, _ = step(s, 0.2, 0.1, kv=100)
    assert batch.run == ("a",) and batch.evict == () and batch.kv_tokens == 61  # "small" fits but may not pass "big"


# -- MLFQ: skip-join, demotion, preemption, promotion -----------------------------------------


def test_skip_join_places_by_estimated_prefill_time():
    s = MLFQ(levels=4, base_quantum_s=0.1, prefill_s_per_token=0.001)  # quanta 0.1 0.2 0.4 inf
    for name, prompt in [("short", 50), ("edge", 100), ("long", 300), ("huge", 10_000)]:
        s.add(Job(name, 0.0, prompt, 10), 0.0)
    assert [s.job(n).level for n in ("short", "edge", "long", "huge")] == [0, 0, 2, 3]
    s.observe_prefill(tokens=100, seconds=1.0)  # the cluster is slower than guessed
    assert s.prefill_s_per_token > 0.001
    s.add(Job("short2", 0.1, 50, 10), 0.1)
    assert s.job("short2").level > 0


def test_demotion_after_quantum_is_used_up():
    s = MLFQ(levels=3, base_quantum_s=0.6, starvation_s=100)  # quanta 0.6 1.2 inf
    s.add(Job("a", 0.0, 4, 100), 0.0)
    now = 0.0

    def run(n):
        nonlocal now
        for _ in range(n):
            step(s, now, 0.25)
            now += 0.25

    run(2)
    assert (s.job("a").level, s.job("a").level_service) == (0, 0.5)
    run(1)
    assert (s.job("a").level, s.job("a").level_service) == (1, 0.0)  # 0.75 s >= 0.6 s
    run(4)
    assert s.job("a").level == 1  # 1.0 s < 1.2 s
    run(1)
    assert s.job("a").level == 2
    run(20)  # the last queue keeps its jobs
    assert s.job("a").level == 2 and s.job("a").generated == 28


def test_each_job_is_charged_its_own_part_of_a_step():
    """A chat that decodes in the same step as another request's long prefill is charged the
    batched decode forward it took part in, not the prefill: it keeps its queue."""
    s = MLFQ(levels=3, base_quantum_s=0.1, starvation_s=100, prefill_s_per_token=1e-4)
    s.add(Job("chat", 0.0, 4, 100), 0.0)
    step(s, 0.0, 0.02)  # its prefill
    s.add(Job("essay", 0.0, 400, 100), 0.02)
    batch = s.next_batch(0.02, max_batch=4, kv_budget_tokens=10_000)
    assert set(batch.run) == {"chat", "essay"} and batch.prefill == ("essay",)
    s.on_step(batch, 1.02, 1.0, {"essay": 0.98, "chat": 0.02})
    assert (s.job("chat").level, s.job("chat").service) == (0, 0.04)
    assert s.job("essay").service == 0.98
    with pytest.raises(ValueError):
        s.on_step(batch, 1.1, 0.1, {"chat": -1.0})


def test_new_short_job_preempts_long_running_job_next_step():
    s = MLFQ(levels=4, base_quantum_s=0.1, starvation_s=100)
    s.add(Job("long", 0.0, 10, 1000), 0.0)
    now = 0.0
    while s.job("long").level < 2:
        batch, _ = step(s, now, 0.05, max_batch=1)
        assert batch.run == ("long",)
        now += 0.05
    s.add(Job("short", now, 10, 3), now)
    batch, _ = step(s, now, 0.05, max_batch=1)
    assert batch.run == ("short",) and batch.preempt == ("long",) and batch.evict == ()
    assert s.job("long").kv_tokens > 0  # preempted, KV kept: the budget allows it
    now += 0.05
    assert step(s, now, 0.05, max_batch=1)[0].run == ("short",)
    now += 0.05
    _, finished = step(s, now, 0.05, max_batch=1)
    assert finished == ("short",)
    now += 0.05
    batch, _ = step(s, now, 0.05, max_batch=1)
    assert batch.run == ("long",) and batch.prefill == ()  # resumes from its kept KV


def test_starved_job_is_promoted_to_the_top_queue():
    s = MLFQ(levels=3, base_quantum_s=1.0, starvation_s=1.5)
    s.add(Job("old", 0.0, 10, 10_000), 0.0)
    now = 0.0
    while s.job("old").level < 2:  # 1 s in queue 0, 2 s in queue 1
        step(s, now, 0.5, max_batch=1)
        now += 0.5
    s.add(Job("hog", now, 10, 10_000), now)
    start = now
    ran = []
    while True:
        batch, _ = step(s, now, 0.5, max_batch=1)
        now += 0.5
        ran.append(batch.run)
        if batch.run == ("old",):
            break
    # "old" waits from `start`; at start + 2.0 s it has waited > 1.5 s and runs at the top
    assert ran == [("hog",)] * 4 + [("old",)]
    assert now - 0.5 - start == 2.0 and s.job("old").level == 0


# -- KV memory --------------------------------------------------------------------------------


def test_kv_pressure_evicts_lowest_priority_waiting_job_and_re_prefills_it():
    s = MLFQ(levels=3, base_quantum_s=0.1, starvation_s=100, prefill_s_per_token=1e-4)
    s.add(Job("a", 0.0, 30, 100), 0.0)
    s.add(Job("b", 0.01, 30, 100), 0.01)
    now = 0.01
    for _ in range(4):  # both use up q0 = 0.1 s and go to queue 1
        step(s, now, 0.05, max_batch=2, kv=100)
        now += 0.05
    assert (s.job("a").level, s.job("b").level) == (1, 1) and s.job("b").kv_tokens == 33
    s.add(Job("c", now, 40, 5), now)  # needs 40; 66 held of 100
    batch, _ = step(s, now, 0.05, max_batch=2, kv=100)
    assert batch.run == ("c", "a") and batch.evict == ("b",) and batch.prefill == ("c",)
    assert s.job("b").kv_tokens == 0 and s.job("b").generated == 4  # KV gone, tokens kept
    assert batch.kv_tokens == 40 + 34 <= 100
    while True:
        now += 0.05
        batch, _ = step(s, now, 0.05, max_batch=2, kv=100)
        assert batch.kv_tokens <= 100
        if "b" in batch.run:
            break
    assert "b" in batch.prefill  # the first step it runs again feeds 30 + 4 tokens
    assert (s.job("b").kv_tokens, s.job("b").generated) == (34, 5)


def test_low_priority_new_job_waits_when_kv_is_full_and_smaller_ones_pass_it():
    s = MLFQ(levels=3, base_quantum_s=0.1, prefill_s_per_token=1e-3)  # quanta 0.1 0.2 inf
    s.add(Job("a", 0.0, 50, 100), 0.0)
    step(s, 0.0, 0.01, kv=540)
    s.add(Job("long-prompt", 0.01, 500, 5), 0.01)  # 0.5 s of prefill: queue 2, behind "a"
    s.add(Job("later", 0.02, 400, 5), 0.02)        # queue 2, behind "long-prompt"
    assert (s.job("long-prompt").level, s.job("later").level) == (2, 2)
    batch, _ = step(s, 0.02, 0.01, kv=540)
    # 51 + 500 > 540 and nothing behind it holds KV: it waits; 51 + 400 fits
    assert batch.run == ("a", "later") and batch.evict == () and batch.kv_tokens == 451
    assert s.job("long-prompt").kv_tokens == 0


def test_shrunk_budget_sheds_lowest_priority_kv_first_and_oversized_is_reported():
    s = FCFS()
    for k in range(3):
        s.add(Job(f"j{k}", k, 20, 50), k)
    step(s, 3.0, 0.1, kv=BIG)
    batch = s.next_batch(3.1, max_batch=8, kv_budget_tokens=45)
    assert batch.evict == ("j2",) and batch.run == ("j0", "j1") and batch.kv_tokens == 42
    s.add(Job("wide", 4.0, 80, 5), 4.0)
    assert s.next_batch(4.0, max_batch=8, kv_budget_tokens=45).oversized == ("wide",)


# -- the property: random workloads -----------------------------------------------------------

reqs_strategy = st.lists(
    st.tuples(
        st.floats(0, 2, allow_nan=False),               # arrival
        st.integers(1, 40),                             # prompt tokens
        st.integers(1, 25),                             # output tokens
        st.one_of(st.none(), st.integers(0, 10)),       # client goes away after this many
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=reqs_strategy,
    name=st.sampled_from(["fcfs", "mlfq"]),
    max_batch=st.integers(1, 4),
    slack=st.integers(0, 120),
)
def test_random_workloads_finish_within_budget(raw, name, max_batch, slack):
    reqs = [Req(f"r{k}", a, p, o, c) for k, (a, p, o, c) in enumerate(raw)]
    kv = max(r.prompt + r.out for r in reqs) + slack  # every job fits alone
    sched = make_scheduler(name) if name == "fcfs" else make_scheduler(
        name, levels=3, base_quantum_s=0.05, starvation_s=0.3, prefill_s_per_token=1e-3)
    # every step gives a token to at least one job (or ends a cancelled one): that bounds the steps
    simulate(sched, reqs, max_batch=max_batch, kv=kv, max_steps=sum(r.out for r in reqs) + len(reqs))
    assert len(sched) == 0


# -- the point of MLFQ ------------------------------------------------------------------------


def mixed_workload() -> list[Req]:
    longs = [Req(f"long{k}", 0.01 * k, 300, 200) for k in range(3)]
    shorts = [Req(f"short{k}", 0.5 + 0.2 * k, 20, 12) for k in range(20)]
    return longs + shorts


def test_mlfq_cuts_mean_completion_time_on_mixed_workload():
    reqs = mixed_workload()
    arrival = {r.id: r.arrival for r in reqs}
    jct = {}
    for name in ("fcfs", "mlfq"):
        sched = make_scheduler(name) if name == "fcfs" else make_scheduler(
            name, levels=5, base_quantum_s=0.1, starvation_s=10.0, prefill_s_per_token=5e-4)
        done = simulate(sched, reqs, max_batch=2, kv=2000)
        jct[name] = statistics.mean(done[i] - arrival[i] for i in done)
    assert jct["mlfq"] * 1.5 < jct["fcfs"], jct


# -- construction -----------------------------------------------------------------------------


def test_make_scheduler_names_and_errors():
    assert isinstance(make_scheduler("fcfs"), FCFS)
    assert isinstance(make_scheduler(" MLFQ ", levels=2), MLFQ)
    with pytest.raises(ConfigError, match="choose one of: fcfs, mlfq"):
        make_scheduler("sjf")
    with pytest.raises(ConfigError, match="takes no settings"):
        make_scheduler("fcfs", levels=3)
    with pytest.raises(ConfigError, match="unknown mlfq scheduler setting"):
        make_scheduler("mlfq", quanta=3)
    with pytest.raises(ConfigError, match="levels"):
        make_scheduler("mlfq", levels=0)
    s = FCFS()
    s.add(Job("x", 0, 1, 1), 0)
    with pytest.raises(ValueError, match="added twice"):
        s.add(Job("x", 0, 1, 1), 0)
    s.remove("x")
    s.remove("x")  # a disconnect racing the last step: no error
    assert len(s) == 0


@pytest.mark.parametrize("name", ["fcfs", "mlfq"])
def test_max_held_bounds_the_jobs_that_hold_kv_and_everyone_finishes(name):
    """A cluster keeps a peer stream open per job with KV: never more than max_held of them,
    and new jobs (which preempt under mlfq) take the place of the lowest-priority ones."""
    s = make_scheduler(name) if name == "fcfs" else MLFQ(levels=3, base_quantum_s=0.05, starvation_s=100)
    now, done = 0.0, set()
    for i in range(10):
        s.add(Job(f"j{i}", now, 5, 12 - i), now)
        for _ in range(3):
            batch = s.next_batch(now, max_batch=2, kv_budget_tokens=BIG, max_held=3)
            now += 0.03
            done.update(s.on_step(batch, now, 0.03))
            assert sum(1 for j in s.jobs() if j.kv_tokens) <= 3
    while len(s):
        batch = s.next_batch(now, max_batch=2, kv_budget_tokens=BIG, max_held=3)
        now += 0.03
        done.update(s.on_step(batch, now, 0.03))
        assert sum(1 for j in s.jobs() if j.kv_tokens) <= 3
    assert done == {f"j{i}" for i in range(10)}
    with pytest.raises(ValueError):
        s.next_batch(now, max_batch=4, kv_budget_tokens=BIG, max_held=3)
