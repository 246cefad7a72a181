"""The planner on synthetic clusters: plain dataclasses in, a Plan out, no sockets.

The oracle for optimality is a brute force over every subset of peers, every order and
every split of the layers, scored by the cost model written out again here from the
planner's docstring (not imported from it)."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastserve_edge.cluster import planner
from fastserve_edge.cluster.planner import (
    Machine,
    ModelShape,
    Plan,
    describe_bytes,
    plan,
)
from fastserve_edge.errors import FastServeError, PlanError

MiB, GiB = 1 << 20, 1 << 30
LINK_GBPS, HOP_MS = 1.0, 0.5


def host(mem=8 * GiB, gflops=50.0, gbs=20.0, node_id="host") -> Machine:
    return Machine(node_id, node_id, "", mem, gflops, gflops * 2, gbs, is_host=True)


def peer(node_id, mem=8 * GiB, gflops=50.0, gbs=20.0) -> Machine:
    return Machine(node_id, f"pc-{node_id}", f"10.0.0.{len(node_id)}:50051", mem, gflops, gflops * 2, gbs)


def shape(n=24, layer=100 * MiB, *, sizes=None, kv=4096, ctx=2048, embed=200 * MiB, head=200 * MiB,
          tied=False, head_flops=0.0) -> ModelShape:
    sizes = tuple(sizes) if sizes is not None else (layer,) * n
    return ModelShape(n_layers=len(sizes), layer_bytes=sizes, layer_flops=2.0 * (sum(sizes) / len(sizes)),
                      kv_bytes_per_token=kv, embed_bytes=embed, head_bytes=head, hidden_bytes=4096, ctx=ctx,
                      tied_embeddings=tied, head_flops=head_flops)


# --- the cost model, written out independently -------------------------------------------


def usable(m: Machine, margin: float, margin_bytes: int) -> float:
    return m.memory_bytes * (1 - margin) - margin_bytes


def stage_need(m: Machine, a: int, b: int, md: ModelShape) -> int:
    need = sum(md.layer_bytes[a:b]) + (b - a) * md.kv_bytes_per_token * md.ctx
    if m.is_host:
        need += md.embed_bytes
    if b == md.n_layers:
        need += max(0, md.head_bytes - md.embed_bytes) if (m.is_host and md.tied_embeddings) else md.head_bytes
    return need


def stage_ms(m: Machine, a: int, b: int, md: ModelShape, link_gbps=LINK_GBPS, hop_ms=HOP_MS) -> float:
    last = b == md.n_layers
    nbytes = sum(md.layer_bytes[a:b]) + (md.head_bytes if last else 0)
    flops = (b - a) * md.layer_flops + (md.head_flops if last else 0)
    compute = max(nbytes / (m.bandwidth_gbs * 1e9), flops / (m.decode_gflops * 1e9)) * 1e3 if b > a else 0.0
    if m.is_host:
        return compute
    hop = hop_ms + md.hidden_bytes * 8 / (link_gbps * 1e9) * 1e3
    return compute + hop + (hop_ms if last else 0.0)


def brute_force(machines, md: ModelShape, *, min_stages=1, margin=0.10, margin_bytes=64 * MiB):
    """Least ms/token over every subset, order and split; None when nothing fits."""
    h = next(m for m in machines if m.is_host)
    peers = [m for m in machines if not m.is_host]
    n = md.n_layers
    best = math.inf
    for k in range(len(peers) + 1):
        for chosen in itertools.permutations(peers, k):
            order = [h, *chosen]
            # host takes cuts[0] layers (>= 0), each peer >= 1
            for cuts in itertools.product(range(n + 1), repeat=k):
                bounds = [0, *cuts, n]
                if any(bounds[i + 1] <= bounds[i] for i in range(1, k + 1)):  # every peer >= 1 layer
                    continue
                total, active, ok = 0.0, 0, True
                for m, a, b in zip(order, bounds, bounds[1:]):
                    if stage_need(m, a, b, md) > usable(m, margin, margin_bytes):
                        ok = False
                        break
                    total += stage_ms(m, a, b, md)
                    active += b > a
                if ok and active >= min_stages:
                    best = min(best, total)
    return None if best == math.inf else best


def single_machine_ms(m: Machine, md: ModelShape, h: Machine | None = None, margin=0.10,
                      margin_bytes=64 * MiB) -> float | None:
    """The whole model on m alone (a peer still needs the host h for the embedding)."""
    stages = [(m, 0, md.n_layers)] if m.is_host else [(h, 0, 0), (m, 0, md.n_layers)]
    total = 0.0
    for mm, a, b in stages:
        if stage_need(mm, a, b, md) > usable(mm, margin, margin_bytes):
            return None
        total += stage_ms(mm, a, b, md)
    return total


def check_invariants(p: Plan, machines, md: ModelShape, *, min_stages=1, margin=0.10, margin_bytes=64 * MiB):
    n = md.n_layers
    assert p.stages[0].machine.is_host
    assert p.stages[0].start == 0 and p.stages[-1].end == n
    for a, b in zip(p.stages, p.stages[1:]):
        assert a.end == b.start
    for s in p.stages:
        assert s.start <= s.end
        if not s.machine.is_host:
            assert s.n_layers >= 1
        need = stage_need(s.machine, s.start, s.end, md)
        assert s.memory_bytes == need
        assert need <= usable(s.machine, margin, margin_bytes)
        assert s.est_ms == pytest.approx(stage_ms(s.machine, s.start, s.end, md), rel=1e-9, abs=1e-12)
        assert s.holds_head == (s.end == n)
    covered = [i for s in p.stages for i in range(s.start, s.end)]
    assert covered == list(range(n))
    assert p.est_ms_per_token == pytest.approx(sum(s.est_ms for s in p.stages), rel=1e-12)
    assert p.n_active >= min_stages
    ids = [m.node_id for m, _ in p.decisions]
    assert sorted(ids) == sorted(m.node_id for m in machines)
    assert all(why for _, why in p.decisions)
    used = {s.machine.node_id for s in p.stages}
    assert len(used) == len(p.stages)
    assert {m.node_id for m in p.left_out} == {m.node_id for m in machines} - used


# --- strategies ---------------------------------------------------------------------------

SPEEDS = st.sampled_from([2.0, 5.0, 10.0, 20.0, 40.0])  # few values: ties happen


@st.composite
def clusters(draw, max_peers=3, max_layers=5, uniform=True):
    n = draw(st.integers(1, max_layers))
    if uniform:
        sizes = (draw(st.integers(50, 200)) * MiB,) * n
    else:
        sizes = tuple(draw(st.lists(st.integers(20, 300), min_size=n, max_size=n)))
        sizes = tuple(s * MiB for s in sizes)
    md = shape(sizes=sizes, kv=draw(st.sampled_from([0, 4096, 1 << 16])), embed=draw(st.integers(0, 100)) * MiB,
               head=draw(st.integers(0, 150)) * MiB, tied=draw(st.booleans()),
               head_flops=draw(st.sampled_from([0.0, 1e8])))
    per_layer = sum(sizes) // n
    def mem():
        return 64 * MiB + draw(st.integers(0, (n + 2) * per_layer + 300 * MiB))
    h = host(mem(), draw(SPEEDS), draw(SPEEDS))
    k = draw(st.integers(0, max_peers))
    peers = [peer(f"p{i}", mem(), draw(SPEEDS), draw(SPEEDS)) for i in range(k)]
    return [h, *peers], md


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ---------------------------------------------------------------------------


@PROPS
@given(clusters(uniform=False), st.integers(1, 3))
def test_valid_plan_or_plan_error(cluster, min_stages):
    machines, md = cluster
    try:
        p = plan(machines, md, min_stages=min_stages)
    except PlanError as err:
        assert isinstance(err, FastServeError)
        assert str(err)
        return
    check_invariants(p, machines, md, min_stages=min_stages)


@PROPS
@given(clusters(uniform=False))
def test_never_slower_than_best_single_fitting_machine(cluster):
    machines, md = cluster
    singles = [t for m in machines if (t := single_machine_ms(m, md, machines[0])) is not None]
    if not singles:
        return
    p = plan(machines, md)  # something fits, so no PlanError
    assert p.est_ms_per_token <= min(singles) * (1 + 1e-9)


def assert_matches_brute_force(machines, md, min_stages):
    best = brute_force(machines, md, min_stages=min_stages)
    if best is None:
        with pytest.raises(PlanError):
            plan(machines, md, min_stages=min_stages)
        return
    p = plan(machines, md, min_stages=min_stages)
    assert p.est_ms_per_token == pytest.approx(best, rel=1e-9)


@PROPS
@given(clusters(max_peers=3, max_layers=5, uniform=False), st.integers(1, 3))
def test_optimal_against_brute_force(cluster, min_stages):
    """Few peers: every peer order is searched, so the plan is the true optimum."""
    assert_matches_brute_force(*cluster, min_stages)


@settings(max_examples=100, deadline=None)
@given(clusters(max_peers=3, max_layers=5, uniform=True), st.integers(1, 3))
def test_tail_search_is_optimal_for_same_size_layers(cluster, min_stages):
    """Without the permutations, trying each peer as the tail is still exact when layers are equal."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner, "PERMUTATION_BUDGET", 0)
        assert_matches_brute_force(*cluster, min_stages)


@settings(max_examples=60, deadline=None)
@given(clusters(max_peers=5, max_layers=8, uniform=False), st.randoms(use_true_random=False))
def test_deterministic_regardless_of_input_order(cluster, rnd):
    machines, md = cluster
    shuffled = list(machines)
    rnd.shuffle(shuffled)
    try:
        a = plan(machines, md)
    except PlanError as err:
        with pytest.raises(PlanError) as again:
            plan(shuffled, md)
        assert str(again.value) == str(err)
        return
    b = plan(shuffled, md)
    assert a == b
    assert a.decisions == b.decisions
    assert a.summary_rows() == b.summary_rows()


# --- scenarios ----------------------------------------------------------------------------


def test_slow_weak_node_left_out_when_host_holds_model():
    md = shape()
    weak = peer("weak", mem=4 * GiB, gflops=5.0, gbs=3.0)
    p = plan([host(), weak], md)
    assert [s.machine.node_id for s in p.stages] == ["host"]
    assert p.stages[0].holds_embedding and p.stages[0].holds_head
    assert p.left_out == (weak,)
    assert p.reason(weak) == "not needed: the host holds the whole model faster alone"
    assert p.est_ms_per_token == pytest.approx(single_machine_ms(host(), md))


def test_node_used_when_memory_requires_it():
    md = shape(n=24)
    small_host = host(mem=2 * GiB)          # ~14 layers of 24
    slow = peer("slow", mem=4 * GiB, gflops=5.0, gbs=3.0)
    p = plan([small_host, slow], md)
    check_invariants(p, [small_host, slow], md)
    assert [s.machine.node_id for s in p.stages] == ["host", "slow"]
    # the slow peer gets as few layers as memory allows: the host is full
    host_stage, slow_stage = p.stages
    assert stage_need(small_host, 0, host_stage.end + 1, md) > usable(small_host, 0.10, 64 * MiB)
    assert slow_stage.holds_head
    assert "needed for memory" in p.reason(slow)


def test_fast_peer_is_used_when_it_makes_tokens_faster():
    md = shape(n=12)
    slow_host = host(gflops=5.0, gbs=3.0)
    fast = peer("fast", gflops=100.0, gbs=40.0)
    p = plan([slow_host, fast], md)
    check_invariants(p, [slow_host, fast], md)
    assert p.stages[0].n_layers == 0       # the host only embeds
    assert p.stages[1].machine == fast and p.stages[1].n_layers == 12
    assert p.reason(slow_host) == "embedding only: the peers run every layer faster"
    assert "faster than without it" in p.reason(fast)
    assert p.est_ms_per_token < single_machine_ms(slow_host, md)


def test_fastest_machines_get_as_many_layers_as_they_can_hold():
    md = shape(n=30, head=0)   # layers of 108 MiB with KV
    machines = [host(gflops=10.0, gbs=5.0), peer("a", mem=2 * GiB, gflops=80.0, gbs=40.0),
                peer("b", mem=8 * GiB, gflops=40.0, gbs=20.0)]
    p = plan(machines, md)
    check_invariants(p, machines, md)
    # a (1779 MiB usable) is the fastest: it holds all the 16 layers it can, b the rest
    assert p.stage_of("a").n_layers == 16
    assert p.stage_of("b").n_layers == 14
    assert p.stage_of("host").n_layers == 0


def test_head_goes_to_the_fast_peer_when_kv_makes_layers_dear():
    # KV costs memory but no time (in the model), the head costs both: the fast peer should
    # carry the head, although the default order puts the slowest peer last
    md = shape(n=10, layer=100 * MiB, kv=1 << 16, ctx=1024, embed=50 * MiB, head=300 * MiB)  # 164 MiB/layer
    machines = [host(mem=200 * MiB), peer("a", mem=GiB, gflops=100.0, gbs=40.0),
                peer("b", mem=8 * GiB, gflops=10.0, gbs=5.0)]
    p = plan(machines, md)
    check_invariants(p, machines, md)
    assert [s.machine.node_id for s in p.stages] == ["host", "b", "a"]
    assert p.stages[-1].holds_head
    assert p.est_ms_per_token == pytest.approx(brute_force(machines, md), rel=1e-9)


def test_head_goes_to_the_fast_peer_with_tail_search_only(monkeypatch):
    monkeypatch.setattr(planner, "PERMUTATION_BUDGET", 0)
    test_head_goes_to_the_fast_peer_when_kv_makes_layers_dear()


def test_peer_order_matters_when_layers_differ_in_size():
    # found by search: with one fixed order of the middle peers (fastest first) the
    # 300 MiB layer cannot land where it should
    md = shape(sizes=(300 * MiB, 100 * MiB, 100 * MiB), kv=0, embed=0, head=100 * MiB)
    machines = [host(364 * MiB, 2.0, 10.0), peer("p0", 164 * MiB, 40.0, 10.0), peer("p1", 364 * MiB, 10.0, 2.0),
                peer("p2", 364 * MiB, 10.0, 40.0)]
    p = plan(machines, md, margin=0.0)
    check_invariants(p, machines, md, margin=0.0, margin_bytes=64 * MiB)
    assert p.est_ms_per_token == pytest.approx(brute_force(machines, md, margin=0.0), rel=1e-9)


def test_min_stages_forces_a_spread():
    md = shape(n=24)
    machines = [host(), peer("a", gflops=5.0, gbs=3.0), peer("b", gflops=4.0, gbs=2.0)]
    assert plan(machines, md).n_active == 1
    p = plan(machines, md, min_stages=3)
    check_invariants(p, machines, md, min_stages=3)
    assert p.n_active == 3
    assert all(s.n_layers >= 1 for s in p.stages)
    assert "needed for --min-stages 3" in p.reason("a")
    # forced onto slow machines, each gets as little as possible: one layer
    assert sorted(s.n_layers for s in p.stages if not s.machine.is_host) == [1, 1]


def test_min_stages_more_than_machines():
    with pytest.raises(PlanError, match=r"--min-stages 3 needs 3 machines but only 2"):
        plan([host(), peer("a")], shape(), min_stages=3)


def test_min_stages_when_a_machine_has_no_room_for_a_layer():
    machines = [host(), peer("a"), peer("tiny", mem=100 * MiB)]
    with pytest.raises(PlanError, match=r"cannot spread the model over 3 machines: only 2 of 3"):
        plan(machines, shape(n=8), min_stages=3)


def test_plan_error_says_how_much_memory_is_missing():
    md = shape(n=10, layer=100 * MiB, kv=0, embed=200 * MiB, head=200 * MiB)
    # usable = mem - 64 MiB (margin 0): need 10*100 + 200 + 200 = 1400 MiB, offered 1000 MiB
    machines = [host(mem=464 * MiB), peer("a", mem=664 * MiB)]
    with pytest.raises(PlanError) as err:
        plan(machines, md, margin=0.0)
    msg = str(err.value)
    amount = re.match(r"([\d.]+) MiB more memory is needed", msg)
    assert amount, msg
    # 400 MiB missing in total; whole layers may round it up by at most one layer
    assert 400 <= float(amount.group(1)) <= 400 + 100 + 2
    assert "fastserve join" in msg and "--max-memory" in msg
    # and with that much more memory the model fits
    newcomer = peer("b", mem=64 * MiB + int(float(amount.group(1)) * MiB) + MiB)
    bigger = [*machines, newcomer]
    check_invariants(plan(bigger, md, margin=0.0), bigger, md, margin=0.0)


def test_plan_error_counts_whole_layers():
    # 2 machines with 150 MiB usable each and layers of 100 MiB: 300 >= 200 + head... but
    # each holds one layer only, so a third layer needs a newcomer
    md = shape(n=3, layer=100 * MiB, kv=0, embed=0, head=0)
    machines = [host(mem=214 * MiB), peer("a", mem=214 * MiB)]
    with pytest.raises(PlanError, match=r"^100\.\d MiB more memory is needed"):
        plan(machines, md, margin=0.0)


def test_plan_error_when_host_cannot_hold_embedding():
    with pytest.raises(PlanError, match=r"more memory is needed on the host"):
        plan([host(mem=100 * MiB), peer("a")], shape(embed=500 * MiB))


def test_one_layer_model():
    md = shape(n=1)
    p = plan([host(), peer("a")], md)
    check_invariants(p, [host(), peer("a")], md)
    assert [(s.start, s.end) for s in p.stages] == [(0, 1)]


def test_one_layer_model_on_a_peer_when_host_has_no_room():
    md = shape(n=1)
    machines = [host(mem=300 * MiB), peer("a")]
    p = plan(machines, md)
    check_invariants(p, machines, md)
    assert [(s.machine.node_id, s.start, s.end) for s in p.stages] == [("host", 0, 0), ("a", 0, 1)]


def test_host_without_room_for_layers_peers_hold_them_all():
    md = shape(n=16)
    machines = [host(mem=400 * MiB, gflops=100.0, gbs=50.0), peer("a", mem=2 * GiB), peer("b", mem=2 * GiB)]
    p = plan(machines, md)
    check_invariants(p, machines, md)
    assert p.stages[0].start == p.stages[0].end == 0
    assert p.stages[0].memory_bytes == md.embed_bytes
    assert p.reason("host") == "embedding only: no room for a layer on the host"
    assert {s.machine.node_id for s in p.stages[1:]} == {"a", "b"}


def test_zero_peers():
    md = shape(n=4)
    p = plan([host()], md)
    assert len(p.stages) == 1 and p.stages[0].holds_head and p.left_out == ()
    assert p.est_ms_per_token == pytest.approx(single_machine_ms(host(), md))
    with pytest.raises(PlanError, match="more memory is needed"):
        plan([host(mem=500 * MiB)], md)


def test_tied_head_shares_the_embedding_on_the_host():
    md_tied = shape(n=4, layer=100 * MiB, kv=0, embed=200 * MiB, head=200 * MiB, tied=True)
    h = host(mem=64 * MiB + 600 * MiB)     # 4 layers + one embedding, margin 0
    p = plan([h], md_tied, margin=0.0)
    assert p.stages[0].memory_bytes == 600 * MiB
    with pytest.raises(PlanError):
        plan([h], shape(n=4, layer=100 * MiB, kv=0, embed=200 * MiB, head=200 * MiB), margin=0.0)


def test_kv_and_margin_are_reserved():
    md = shape(n=4, layer=100 * MiB, kv=1 << 15, ctx=1024, embed=0, head=0)   # 32 MiB KV per layer
    exact = 4 * 132 * MiB
    h = host(mem=math.ceil((exact + 64 * MiB) / 0.9))
    assert plan([h], md).stages[0].memory_bytes == exact
    with pytest.raises(PlanError):
        plan([host(mem=h.memory_bytes - 2 * MiB)], md)


def test_unmeasured_and_tiny_peers_are_left_out_with_reasons():
    md = shape(n=8)
    machines = [host(mem=GiB), peer("zero", gflops=0.0), peer("tiny", mem=120 * MiB), peer("ok", mem=4 * GiB)]
    p = plan(machines, md)
    check_invariants(p, machines, md)
    assert p.reason("zero").startswith("no measured speed")
    assert p.reason("tiny").startswith("too little memory:")
    assert p.stage_of("ok") is not None


def test_slower_peer_left_out_names_the_machines_used():
    md = shape(n=30)
    machines = [host(mem=2 * GiB), peer("fast", mem=3 * GiB, gflops=60.0, gbs=30.0),
                peer("slow", mem=8 * GiB, gflops=5.0, gbs=3.0)]
    p = plan(machines, md)
    assert p.stage_of("slow") is None
    assert p.reason("slow").startswith("slower than using host, pc-fast")


def test_greedy_beyond_enumeration_still_valid_and_fast():
    rnd = random.Random(7)
    md = shape(n=48, layer=150 * MiB)
    machines = [host(mem=2 * GiB)] + [
        peer(f"p{i:02d}", mem=rnd.randint(1, 6) * GiB, gflops=rnd.choice([5.0, 20.0, 60.0]),
             gbs=rnd.choice([3.0, 10.0, 25.0]))
        for i in range(20)]
    p = plan(machines, md)
    check_invariants(p, machines, md)
    singles = [t for m in machines if (t := single_machine_ms(m, md, machines[0])) is not None]
    assert not singles or p.est_ms_per_token <= min(singles)


def test_summary_rows_one_per_machine():
    machines = [host(), peer("weak", gflops=5.0, gbs=3.0)]
    rows = plan(machines, shape(n=4)).summary_rows()
    assert [r[0] for r in rows] == ["host", "pc-weak"]
    assert rows[0][1] == "(this machine)" and rows[0][5] == "0-3"
    assert rows[1][5] == "-" and rows[1][7].startswith("not needed")


def test_bad_input_is_a_bug_not_a_plan_error():
    with pytest.raises(ValueError):
        plan([peer("a")], shape())
    with pytest.raises(ValueError):
        plan([host(), host(node_id="h2")], shape())
    with pytest.raises(ValueError):
        plan([host(), peer("a"), peer("a")], shape())
    with pytest.raises(ValueError):
        ModelShape(2, (1,), 1.0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * MiB, "5.0 MiB"),
                                     (int(1.25 * GiB), "1.2 GiB"), (-2 * GiB, "-2.0 GiB")])
def test_describe_bytes(n, text):
    assert describe_bytes(n) == text


def test_kv_room_is_the_tightest_stage_s_free_memory_over_its_kv_per_token():
    md = shape(n=4, layer=100 * MiB, kv=4096, ctx=1000)
    big, small = host(mem=8 * GiB), peer("b", mem=800 * MiB)
    p = Plan(stages=(planner.Stage(big, 0, 2, memory_bytes=1 * GiB, est_ms=1.0),
                     planner.Stage(small, 2, 4, memory_bytes=500 * MiB, est_ms=1.0)),
             est_ms_per_token=2.0, decisions=())
    # the small peer: 800 MiB - 500 MiB + one context of KV given back, over 2 layers x 4096 B per token
    expected = (300 * MiB + 2 * 4096 * 1000) // (2 * 4096)
    assert planner.kv_room_tokens(p, 4096, 1000) == expected
    embed_only = Plan(stages=(planner.Stage(big, 0, 0, memory_bytes=GiB, est_ms=0.0),), est_ms_per_token=0.0,
                      decisions=())
    assert planner.kv_room_tokens(embed_only, 4096, 1000) >= 1000


def test_a_mixture_counts_every_expert_as_memory_and_the_chosen_ones_as_time():
    """A mixture of experts (read_share: what one token reads of each layer) needs the memory of
    all its weights but is predicted as fast as the share it reads."""
    dense = shape(n=8, layer=1 * GiB, embed=100 * MiB, head=100 * MiB)
    mixture = ModelShape(**{**dense.__dict__, "read_share": 0.1})
    alone = host(mem=16 * GiB, gflops=1e4, gbs=10.0)
    d, m = planner.plan([alone], dense), planner.plan([alone], mixture)
    assert m.est_ms_per_token < 0.2 * d.est_ms_per_token  # 8 GiB held, ~0.8 GiB read a token
    small = host(mem=6 * GiB, gflops=1e4, gbs=10.0)
    with pytest.raises(PlanError):  # memory still counts every expert
        planner.plan([small], mixture)
    with pytest.raises(ValueError, match="read_share"):
        ModelShape(**{**dense.__dict__, "read_share": 0.0})
