"""What /v1/status adds about the cluster's layout: the machines, what each holds (a layer range
or a share of every layer), and their speed and KV, for the web page and `fastserve status --json`.

The stage reports (engine_loop.StageReport) are per stage of the running pipeline; a person thinks
in machines. Pipeline: stage i runs on the plan's machine i. Tensor: one stage, the whole group.
A machine the planner left out is listed too, with the planner's reason.
"""

from __future__ import annotations

from typing import Any

from fastserve_edge.cluster.planner import Machine, Plan
from fastserve_edge.engine.generate import Pipeline
from fastserve_edge.serving.engine_loop import EngineLoop, StageReport


def cluster_status(engine: EngineLoop, stages: list[StageReport]) -> dict[str, Any]:
    """The keys /v1/status adds: layout, plan, machines, kv_budget_tokens, decode_tokens_per_s."""
    plan = _plan(engine.pipeline)
    per_token = engine.metrics.per_token  # seconds between a session's tokens, over every session so far
    return {
        "layout": "single" if plan is None else plan.layout,
        "plan": "this machine alone" if plan is None else plan.headline(),
        "machines": machines(plan, stages),
        "kv_budget_tokens": engine.kv_budget_tokens,
        # one session's decode speed, the mean since start (the aggregate rate: tokens_generated over time)
        "decode_tokens_per_s": per_token.count / per_token.sum if per_token.sum else 0.0,
    }


def _plan(pipeline: object) -> Plan | None:
    """The coordinator's plan when serving on a cluster (ClusterPipeline); None on this machine alone."""
    if isinstance(pipeline, Pipeline):
        return None
    coordinator = getattr(pipeline, "coordinator", None)  # ClusterPipeline's; any other runner: this machine
    return getattr(coordinator, "plan", None)


def machines(plan: Plan | None, stages: list[StageReport]) -> list[dict[str, Any]]:
    """One entry per machine: name, address ("" = this machine), host, in_use, layers [start, end)
    or share (tensor), why (the planner's reason), and its stage's tokens/s and KV bytes."""
    def live(report: StageReport | None) -> dict[str, Any]:
        if report is None:
            return {"tokens_per_s": 0.0, "tokens": 0, "kv_bytes": 0, "kv_budget_bytes": 0}
        return {"tokens_per_s": report.tokens_per_s, "tokens": report.tokens, "kv_bytes": report.kv_bytes,
                "kv_budget_bytes": report.kv_budget_bytes}

    if plan is None:  # this machine alone: one stage holds every layer
        return [{"name": "this machine", "address": "", "host": True, "in_use": True,
                 "layers": [r.start, r.end], "share": None, "why": "", **live(r)} for r in stages[:1]]
    out = []
    if plan.layout == "tensor":
        group = {g.machine.node_id: g for g in plan.group}
        report = stages[0] if len(stages) == 1 else None  # no stage while the cluster re-plans
        for m, why in plan.decisions:
            share = group.get(m.node_id)
            out.append(_machine(m, why, in_use=share is not None, layers=None,
                                share=share.share if share is not None else None)
                       | live(report if share is not None else None))
        return out
    # pipeline (or one machine): the pipeline is built from plan.stages in order, host first
    reports = stages if len(stages) == len(plan.stages) else [None] * len(plan.stages)
    index = {s.machine.node_id: i for i, s in enumerate(plan.stages)}
    for m, why in plan.decisions:
        i = index.get(m.node_id)
        stage = plan.stages[i] if i is not None else None
        held = stage is not None and stage.n_layers > 0
        out.append(_machine(m, why, in_use=held, layers=[stage.start, stage.end] if held else None, share=None)
                   | live(reports[i] if i is not None else None))
    return out


def _machine(m: Machine, why: str, *, in_use: bool, layers: list[int] | None, share: float | None) -> dict[str, Any]:
    return {"name": m.name, "address": m.address, "host": m.is_host, "in_use": in_use, "layers": layers,
            "share": share, "why": why, "memory_bytes": m.memory_bytes, "decode_gflops": m.decode_gflops}
