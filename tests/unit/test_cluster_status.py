"""/v1/status's machines (serving/cluster_status.py): the planner's real plans and the engine's
stage reports in, one entry per machine out, no sockets."""

from __future__ import annotations

from fastserve_edge.cluster.planner import plan
from fastserve_edge.serving.cluster_status import machines
from fastserve_edge.serving.engine_loop import StageReport
from tests.unit.test_planner_layouts import GiB, llama_1b, machine


def report(i: int, start: int, end: int, name: str, tokens: int = 100, seconds: float = 2.0) -> StageReport:
    return StageReport(index=i, start=start, end=end, machine=name, seconds=seconds, tokens=tokens, calls=10,
                       kv_bytes=1000 * (end - start), kv_budget_bytes=9000 * (end - start), kv_allocated_bytes=None)


def test_this_machine_alone_holds_every_layer():
    (m,) = machines(None, [report(0, 0, 30, "this machine")])
    assert m["name"] == "this machine" and m["host"] and m["in_use"] and m["layers"] == [0, 30]
    assert m["share"] is None and m["tokens_per_s"] == 50.0 and m["kv_bytes"] == 30_000


def test_a_pipeline_lists_each_machine_with_its_layers_and_its_stage_figures():
    # the host cannot hold the model: the planner must spread it
    cluster = [machine("h", host=True, mem=int(0.4 * GiB)), machine("p1", mem=int(0.4 * GiB)),
               machine("p2", mem=int(0.4 * GiB))]
    p = plan(cluster, llama_1b(), layout="pipeline", margin=0, margin_bytes=0)
    stages = [report(i, s.start, s.end, "this machine" if i == 0 else s.machine.name, tokens=10 * (i + 1))
              for i, s in enumerate(p.stages)]
    out = machines(p, stages)
    used = [m for m in out if m["in_use"]]
    assert len(used) >= 2 and used[0]["host"] and used[0]["address"] == ""
    covered = sorted(tuple(m["layers"]) for m in used)
    assert covered[0][0] == 0 and covered[-1][1] == 16
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, every layer once
    for m in used:
        i = next(i for i, s in enumerate(p.stages) if s.machine.name == m["name"])
        assert m["tokens"] == stages[i].tokens and m["kv_budget_bytes"] == stages[i].kv_budget_bytes
    for m in out:
        if not m["in_use"]:
            assert m["layers"] is None and m["why"] and m["tokens_per_s"] == 0.0
    # while the cluster re-plans the engine has no stages: the plan still shows, without figures
    assert [m["layers"] for m in machines(p, [])] == [m["layers"] for m in out]
    assert all(m["tokens"] == 0 for m in machines(p, []))


def test_a_tensor_group_lists_each_machine_with_its_share_of_every_layer():
    cluster = [machine("h", host=True), machine("p1", gbs=40.0), machine("p2")]  # p1: twice the memory bandwidth
    p = plan(cluster, llama_1b(), layout="tensor", margin=0, margin_bytes=0)
    out = machines(p, [report(0, 0, 16, "this machine")])
    assert {m["name"] for m in out} == {"h", "p1", "p2"}
    shares = {m["name"]: m["share"] for m in out}
    assert abs(sum(shares.values()) - 1) < 1e-6 and shares["p1"] > shares["h"]
    assert all(m["layers"] is None and m["in_use"] and m["tokens_per_s"] == 50.0 for m in out)
