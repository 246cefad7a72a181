"""The planner's choice between one machine, a pipeline and a tensor-parallel group, on
synthetic clusters of 1 to 64 machines: memory never exceeded, never slower than the best
single machine, deterministic, and the group it picks is the best of every subset (brute force
on small clusters, with the tensor layout's cost written out again here)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastserve_edge.cluster.planner import Machine, ModelShape, kv_room_tokens, plan
from fastserve_edge.errors import PlanError

MiB, GiB = 1 << 20, 1 << 30


def machine(node_id, *, host=False, mem=8 * GiB, gbs=20.0, gflops=1000.0) -> Machine:
    return Machine(node_id, node_id, "" if host else f"10.0.0.9:{len(node_id)}", mem, gflops, gflops * 2, gbs,
                   is_host=host)


def llama_1b(ctx=1024) -> ModelShape:
    """Llama-3.2-1B-shaped, Q4_0: 16 layers of ~34 MiB, a 70 MiB tied embedding/head."""
    return ModelShape(n_layers=16, layer_bytes=(34 * MiB,) * 16, layer_flops=2.0 * 60e6, kv_bytes_per_token=2 * 8 * 64 * 2,
                      embed_bytes=70 * MiB, head_bytes=70 * MiB, hidden_bytes=2048 * 4, ctx=ctx, tied_embeddings=True,
                      head_flops=2.0 * 128256 * 2048, exchange_floats=2048 + 2 * 2048 + 8192)


def whole_ms(m: Machine, md: ModelShape) -> float:
    return max((md.weight_bytes + md.head_bytes) / (m.bandwidth_gbs * 1e6),
               (md.n_layers * md.layer_flops + md.head_flops) / (m.decode_gflops * 1e6))


def tensor_cost(group: list[Machine], md: ModelShape, link_gbps=1.0, exchange_ms=0.05) -> float:
    """The tensor layout's decode ms per token, from the planner's docstring, written out again."""
    speed = [1 / whole_ms(m, md) for m in group]
    k = len(group)
    net = max(s / sum(speed) * md.exchange_floats * 4 * md.n_layers * (k - 1) * 8 / (link_gbps * 1e6)
              + (4 * md.n_layers + 4) * exchange_ms for s in speed)
    return 1 / sum(speed) + net


def fits(group: list[Machine], md: ModelShape) -> bool:
    speed = [1 / whole_ms(m, md) for m in group]
    for m, s in zip(group, speed):
        share = s / sum(speed)
        need = share * (md.weight_bytes + md.n_layers * md.kv_bytes_per_token * md.ctx + md.head_bytes)
        if m.is_host:
            need += md.embed_bytes
        if need > m.memory_bytes:
            return False
    return True


def test_two_equal_machines_pick_the_tensor_layout_and_say_why():
    got = plan([machine("h", host=True), machine("p")], llama_1b(), margin=0, margin_bytes=0)
    assert got.layout == "tensor"
    assert len(got.group) == 2 and got.group[0].machine.is_host
    assert got.headline().startswith("tensor-parallel over 2 machines, shares 50% / 50% by measured speed")
    single = dict((name, ms) for name, ms, _ in got.alternatives)["single"]
    assert got.est_ms_per_token < single and f"(one machine: {single:.0f} ms)" in got.headline()


def test_shares_follow_measured_speed_and_a_much_slower_machine_is_left_out():
    fast, slow = machine("fast", gbs=30.0), machine("slow", gbs=1.0)
    got = plan([machine("h", host=True, gbs=20.0), fast, slow], llama_1b(), margin=0, margin_bytes=0)
    assert got.layout == "tensor"
    shares = {g.machine.node_id: g.share for g in got.group}
    assert "slow" not in shares and shares["fast"] == pytest.approx(0.6)
    assert "slower" in got.reason(slow)


def test_a_forced_layout_is_kept_or_refused_with_a_reason():
    machines = [machine("h", host=True), machine("p")]
    assert plan(machines, llama_1b(), layout="pipeline", margin=0, margin_bytes=0).layout == "pipeline"
    assert plan(machines, llama_1b(), layout="single", margin=0, margin_bytes=0).layout == "single"
    slow = [*machines, machine("slow", gbs=0.5)]
    assert len(plan(slow, llama_1b(), layout="tensor", margin=0, margin_bytes=0).group) == 3  # forced: everyone
    assert len(plan(slow, llama_1b(), margin=0, margin_bytes=0).group) == 2
    with pytest.raises(PlanError, match="at least one peer"):
        plan([machine("h", host=True)], llama_1b(), layout="tensor", margin=0, margin_bytes=0)
    with pytest.raises(ValueError, match="layout"):
        plan(machines, llama_1b(), layout="ring")


def test_a_model_no_machine_holds_alone_runs_over_a_group():
    small = [machine("h", host=True, mem=500 * MiB), machine("p", mem=500 * MiB)]
    got = plan(small, llama_1b(ctx=256), margin=0, margin_bytes=0)
    assert got.layout in ("tensor", "pipeline")
    assert dict((n, ms) for n, ms, _ in got.alternatives)["single"] is None
    for g in got.group:
        assert g.memory_bytes <= g.machine.memory_bytes
    assert kv_room_tokens(got, 2 * 8 * 64 * 2, 256, 16) >= 256


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 64), st.integers(0, 2**31), st.sampled_from([0.1, 1.0, 10.0]))
def test_any_cluster_gets_a_plan_that_fits_is_deterministic_and_keeps_the_promise(n, seed, gbps):
    rng = random.Random(seed)
    machines = [machine(f"m{i:02d}", host=i == 0, mem=rng.choice([300, 600, 1200, 4000]) * MiB,
                        gbs=rng.uniform(2, 40), gflops=rng.uniform(20, 200)) for i in range(n)]
    md = llama_1b(ctx=512)
    try:
        got = plan(machines, md, link_gbps=gbps, margin=0, margin_bytes=0)
    except PlanError:
        return
    for g in got.group:
        assert g.memory_bytes <= g.machine.memory_bytes
    for s in got.stages:
        assert s.memory_bytes <= s.machine.memory_bytes
    single = dict((name, ms) for name, ms, _ in got.alternatives)["single"]
    if single is not None:
        assert got.est_ms_per_token <= single + 1e-9  # never slower than the host alone
    shuffled = machines[:]
    rng.shuffle(shuffled)
    assert plan(shuffled, md, link_gbps=gbps, margin=0, margin_bytes=0) == got


@pytest.mark.parametrize("seed", range(40))
def test_the_group_is_the_best_of_every_subset(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    machines = [machine(f"m{i}", host=i == 0, mem=rng.choice([400, 800, 4000]) * MiB, gbs=rng.uniform(2, 40))
                for i in range(n)]
    md = llama_1b(ctx=256)
    got = plan(machines, md, layout="auto", margin=0, margin_bytes=0)
    tensor_ms = dict((name, ms) for name, ms, _ in got.alternatives)["tensor"]
    host, peers = machines[0], machines[1:]
    best = min((tensor_cost([host, *sub], md) for k in range(1, len(peers) + 1)
                for sub in itertools.combinations(peers, k) if fits([host, *sub], md)), default=None)
    if best is None:
        assert tensor_ms is None
    else:
        assert tensor_ms == pytest.approx(best, rel=1e-9)


def test_a_slow_link_keeps_the_model_on_one_machine_and_the_measured_latency_counts():
    from fastserve_edge.cluster.planner import EXCHANGE_MS, exchange_ms_of
    machines = [machine("h", host=True), machine("p")]
    assert plan(machines, llama_1b(), link_gbps=0.01, margin=0, margin_bytes=0).layout == "single"
    assert exchange_ms_of(0.2) == EXCHANGE_MS and exchange_ms_of(2.6) == pytest.approx(1.0)
    far = plan(machines, llama_1b(), exchange_ms=exchange_ms_of(20.0), margin=0, margin_bytes=0)
    assert far.layout == "single"  # 68 exchanges of ~10 ms each cost more than the second machine saves
