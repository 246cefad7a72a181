"""Who holds which layers, and why: a pure function from measurements to a pipeline plan.

The cost model (milliseconds per decoded token, at batch 1):

- A stage reads its weights once per token and does 2 * params FLOPs, so it costs
  `max(weight bytes / bandwidth, FLOPs / decode GFLOP/s)`; the last stage adds the final
  norm + LM head to both. The embedding is a lookup of one row: memory, no time.
  KV reads are left out (the estimate is for short contexts).
- Every peer stage costs one hop going in: `hop_ms + hidden_bytes / link rate`. When the
  last stage is a peer, the sampled token id returns to the host: one more `hop_ms`.
- A machine's usable memory is `memory_bytes * (1 - margin) - margin_bytes`; a stage needs
  its layers' weights + their KV for `ctx` tokens (+ the embedding on the host, + the head
  on the last stage; a tied head shares the embedding's bytes when both are on the host).

The search is a dynamic program over (layers covered, stages holding layers) that walks the
machines in one order, the host first, and lets each peer take a contiguous range or be
skipped: it is exact over every subset of machines for that order, so the fastest machines
get as many layers as their memory allows and a machine that only adds time is skipped.
Orders tried: every order of the peers when that is cheap (a few peers); else fastest
(ms per layer) first with each peer tried as the last stage, the one that carries the head
(up to `ENUMERATE_TAILS` peers); else fastest first only. When the layers are all the same
size only the tail matters, so the tail search is exact. A single machine holding the whole
model is one of the plans searched, hence the promise: never slower than the best single
machine that can hold the model alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fastserve_edge.errors import PlanError

ENUMERATE_TAILS = 12  # peers up to which every peer is tried as the last stage (cost ~ peers^2 * layers^2)
PERMUTATION_BUDGET = 2_000_000  # peers! * peers * layers^2 up to which every peer order is tried

SUMMARY_COLUMNS = ("machine", "address", "free memory", "GFLOP/s", "GB/s", "layers", "est ms/token", "reason")


@dataclass(frozen=True)
class Machine:
    node_id: str
    name: str
    address: str            # "ip:port" of its gRPC server; "" for the host itself
    memory_bytes: int       # memory it offers (free RAM, already capped by --max-memory)
    decode_gflops: float    # measured, decode-shaped (one row) matmul on quantized weights
    prefill_gflops: float   # measured, many rows
    bandwidth_gbs: float    # measured memory bandwidth
    is_host: bool = False


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    layer_bytes: tuple[int, ...]    # runtime weight bytes of each layer (len == n_layers)
    layer_flops: float              # FLOPs per token of one layer (2 * params)
    kv_bytes_per_token: int         # per layer, K and V
    embed_bytes: int                # token embedding (always on the host)
    head_bytes: int                 # final norm + lm head (on the last stage; == embedding when tied)
    hidden_bytes: int               # one token's hidden state on the wire
    ctx: int                        # tokens of context to reserve KV for
    tied_embeddings: bool = False   # the head reuses the embedding: one copy when the host holds both
    head_flops: float = 0.0         # 2 * vocab * hidden; 0 counts only the head's bytes
    exchange_floats: int = 0        # tensor parallel: floats all-gathered per layer per token
                                    # (attention output + 2 dim + ffn); 0: no tensor layout
    read_share: float = 1.0         # of a layer's weight bytes, what one token reads: a mixture of
                                    # experts reads its router's choice (memory counts them all)

    def __post_init__(self):
        if self.n_layers < 1 or len(self.layer_bytes) != self.n_layers:
            raise ValueError(f"ModelShape: {self.n_layers} layers but {len(self.layer_bytes)} layer sizes")
        if not 0 < self.read_share <= 1:
            raise ValueError(f"ModelShape: read_share {self.read_share} is not in (0, 1]")
        if min(self.layer_bytes) < 0 or min(self.kv_bytes_per_token, self.embed_bytes, self.head_bytes,
                                            self.hidden_bytes, self.ctx) < 0:
            raise ValueError("ModelShape: sizes must be >= 0")

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes)

    @property
    def kv_bytes_per_layer(self) -> int:
        return self.kv_bytes_per_token * self.ctx


@dataclass(frozen=True)
class Stage:
    machine: Machine
    start: int                      # layers [start, end)
    end: int
    memory_bytes: int               # weights + KV(ctx) (+ embedding / head where held)
    est_ms: float                   # its share of one decode token: compute_ms + network_ms
    compute_ms: float = 0.0
    network_ms: float = 0.0         # the hop into it (and the token's return when it is last)
    holds_embedding: bool = False
    holds_head: bool = False

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def describe_layers(self) -> str:
        return f"{self.start}-{self.end - 1}" if self.end > self.start else "none"


@dataclass(frozen=True)
class Share:
    """One machine of a tensor-parallel group: its share of every layer and its cost."""
    machine: Machine
    share: float                    # of the FFN columns, output rows and vocabulary (KV heads: near it)
    memory_bytes: int
    compute_ms: float
    network_ms: float


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]       # pipeline order; stages[0].machine is the host
    est_ms_per_token: float
    decisions: tuple[tuple[Machine, str], ...]  # every machine given, in/out and why
    layout: str = "pipeline"        # "single" | "pipeline" | "tensor"
    group: tuple[Share, ...] = ()   # layout "tensor": the group, host first
    alternatives: tuple[tuple[str, float | None, str], ...] = ()  # (layout, est ms/token or None, why)
    link: str = ""                  # what was measured of the links, for people

    def headline(self) -> str:
        """The choice in one line, for the plan table's title."""
        single = next((ms for name, ms, _ in self.alternatives if name == "single" and ms is not None), None)
        alone = f" (one machine: {single:.0f} ms)" if single is not None and self.layout != "single" else ""
        if self.layout == "tensor":
            shares = " / ".join(f"{100 * g.share:.0f}%" for g in self.group)
            return (f"tensor-parallel over {len(self.group)} machines, shares {shares} by measured speed, "
                    f"about {self.est_ms_per_token:.1f} ms per token{alone}")
        if self.layout == "single":
            return f"one machine, about {self.est_ms_per_token:.1f} ms per token"
        return f"pipeline over {self.n_active} machine(s), about {self.est_ms_per_token:.1f} ms per token{alone}"

    @property
    def machines(self) -> tuple[Machine, ...]:
        if self.layout == "tensor":
            return tuple(g.machine for g in self.group)
        return tuple(s.machine for s in self.stages)

    @property
    def left_out(self) -> tuple[Machine, ...]:
        used = {m.node_id for m in self.machines}
        return tuple(m for m, _ in self.decisions if m.node_id not in used)

    @property
    def n_active(self) -> int:
        """Machines that hold at least one layer (or a slice of every layer)."""
        if self.layout == "tensor":
            return len(self.group)
        return sum(1 for s in self.stages if s.n_layers)

    def reason(self, machine: Machine | str) -> str:
        node_id = machine if isinstance(machine, str) else machine.node_id
        for m, why in self.decisions:
            if m.node_id == node_id:
                return why
        raise KeyError(node_id)

    def stage_of(self, machine: Machine | str) -> Stage | None:
        node_id = machine if isinstance(machine, str) else machine.node_id
        return next((s for s in self.stages if s.machine.node_id == node_id), None)

    def summary_rows(self) -> tuple[tuple[str, ...], ...]:
        """One row of strings per machine, in SUMMARY_COLUMNS order: pipeline order, then left out."""
        rows = []
        shares = {g.machine.node_id: g for g in self.group}
        for m, why in self.decisions:
            st = self.stage_of(m) if self.layout != "tensor" else None
            g = shares.get(m.node_id)
            held = (f"{100 * g.share:.0f}% of each" if g else "-") if self.layout == "tensor" else (
                st.describe_layers() if st else "-")
            est = g.compute_ms + g.network_ms if g else (st.est_ms if st else None)
            rows.append((
                m.name,
                m.address or "(this machine)",
                describe_bytes(m.memory_bytes),
                f"{m.decode_gflops:.1f}",
                f"{m.bandwidth_gbs:.1f}",
                held,
                f"{est:.2f}" if est is not None else "-",
                why,
            ))
        return tuple(rows)


def describe_bytes(n: float) -> str:
    """1288490189 -> '1.2 GiB'; binary units, one decimal above KiB."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{int(n)} B"


# --- the search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cost:
    """Everything the search needs, precomputed once per call."""
    model: ModelShape
    prefix: tuple[int, ...]         # prefix[i] = bytes of layers [0, i)
    link_ms: float                  # one hop into a peer
    hop_ms: float
    margin: float
    margin_bytes: int

    def usable(self, m: Machine) -> int:
        return math.floor(m.memory_bytes * (1 - self.margin)) - self.margin_bytes

    def memory(self, m: Machine, i: int, j: int) -> int:
        md = self.model
        need = self.prefix[j] - self.prefix[i] + (j - i) * md.kv_bytes_per_layer
        if m.is_host:
            need += md.embed_bytes
        if j == md.n_layers:
            need += max(0, md.head_bytes - md.embed_bytes) if (m.is_host and md.tied_embeddings) else md.head_bytes
        return need

    def compute(self, m: Machine, i: int, j: int) -> float:
        md = self.model
        if j == i:
            return 0.0
        nbytes = (self.prefix[j] - self.prefix[i]) * md.read_share
        flops = (j - i) * md.layer_flops
        if j == md.n_layers:
            nbytes += md.head_bytes
            flops += md.head_flops
        return max(nbytes / (m.bandwidth_gbs * 1e6), flops / (m.decode_gflops * 1e6))

    def network(self, m: Machine, j: int) -> float:
        if m.is_host:
            return 0.0
        return self.link_ms + (self.hop_ms if j == self.model.n_layers else 0.0)

    def ms_per_layer(self, m: Machine) -> float:
        md = self.model
        avg = self.prefix[-1] / md.n_layers * md.read_share
        return max(avg / (m.bandwidth_gbs * 1e6), md.layer_flops / (m.decode_gflops * 1e6))


def _measured(m: Machine) -> bool:
    return m.bandwidth_gbs > 0 and m.decode_gflops > 0


def _search(order: Sequence[Machine], cost: _Cost, need_stages: int) -> tuple[float, list[tuple[Machine, int, int]]] | None:
    """Exact DP for one machine order (order[0] is the host, always a stage).

    dp[i][s]: least ms for layers [0, i) on the machines seen so far, s = stages holding
    layers (capped at need_stages). Returns (ms, [(machine, start, end)]) or None.
    """
    n = cost.model.n_layers
    prefix, kv, flops, link = cost.prefix, cost.model.kv_bytes_per_layer, cost.model.layer_flops, cost.link_ms
    inf = math.inf
    host = order[0]
    dp = [[inf] * (need_stages + 1) for _ in range(n + 1)]
    back: list[list[list[tuple[int, int, int] | None]]] = []  # per machine: [i][s] -> (prev i, prev s, taken?)
    # the host: layers [0, j), j may be 0
    hb = [[None] * (need_stages + 1) for _ in range(n + 1)]
    cap = cost.usable(host)
    for j in range(n + 1):
        if cost.memory(host, 0, j) > cap:
            if j < n:
                break
            continue
        s = min(need_stages, 1 if j else 0)
        dp[j][s] = cost.compute(host, 0, j)
        hb[j][s] = (0, 0, 1)
    back.append(hb)
    for m in order[1:]:
        new = [row[:] for row in dp]
        mb: list[list[tuple[int, int, int] | None]] = [[(i, s, 0) for s in range(need_stages + 1)] for i in range(n + 1)]
        cap = cost.usable(m)
        # cost.memory / cost.compute / cost.network inlined: this loop is the whole search
        per_byte, per_flop = cost.model.read_share / (m.bandwidth_gbs * 1e6), 1 / (m.decode_gflops * 1e6)
        for i in range(n):
            row = dp[i]
            if all(v == inf for v in row):
                continue
            for j in range(i + 1, n + 1):
                if j < n:
                    w = prefix[j] - prefix[i]
                    if w + (j - i) * kv > cap:
                        break
                    c = max(w * per_byte, (j - i) * flops * per_flop) + link
                else:
                    if cost.memory(m, i, j) > cap:
                        continue
                    c = cost.compute(m, i, j) + cost.network(m, j)
                for s in range(need_stages + 1):
                    if row[s] == inf:
                        continue
                    s2 = min(need_stages, s + 1)
                    v = row[s] + c
                    if v < new[j][s2]:
                        new[j][s2] = v
                        mb[j][s2] = (i, s, 1)
        dp = new
        back.append(mb)
    best = dp[n][need_stages]
    if best == inf:
        return None
    # walk back
    taken: list[tuple[Machine, int, int]] = []
    i, s = n, need_stages
    for k in range(len(order) - 1, -1, -1):
        pi, ps, took = back[k][i][s]
        if took:
            taken.append((order[k], pi, i))
        i, s = pi, ps
    assert i == 0 and taken and taken[-1][0] is host
    taken.reverse()
    return best, taken


def _best(host: Machine, peers: Sequence[Machine], cost: _Cost, need_stages: int, *, exhaustive: bool = True):
    """Best over peer orders: every order when that is cheap, else fastest first with each
    peer tried as the tail (up to ENUMERATE_TAILS peers), else fastest first only."""
    peers = sorted(peers, key=lambda m: (cost.ms_per_layer(m), m.node_id))
    k, n = len(peers), cost.model.n_layers
    if not peers:
        orders = [[host]]
    elif exhaustive and math.factorial(k) * k * n * n <= PERMUTATION_BUDGET:
        orders = [[host, *perm] for perm in itertools.permutations(peers)]
    elif exhaustive and k <= ENUMERATE_TAILS:
        orders = [[host, *(p for p in peers if p is not t), t] for t in peers]
    else:
        orders = [[host, *peers]]
    best = None
    for order in orders:
        got = _search(order, cost, need_stages)
        if got is not None and (best is None or got[0] < best[0] - 1e-12):
            best = got
    return best


LAYOUTS = ("auto", "single", "pipeline", "tensor")
EXCHANGE_MS = 0.05  # one all-gather's latency on a LAN, beyond its bytes (bench/tensor.py measured
                    # 0.03-0.05 ms on veth; a switch adds ~0.02)


GRPC_RTT_MS = 0.6  # what a gRPC call from Python adds to a round trip on its own: on the namespace LAN
                   # Health round trips took 0.65-1.1 ms where the data path's exchanges took 0.03-0.06


def exchange_ms_of(rtt_ms: float) -> float:
    """A data-path exchange's latency from a measured gRPC round trip: the one-way part of what
    the round trip takes beyond gRPC's own cost, or EXCHANGE_MS on a link faster than that."""
    return max(EXCHANGE_MS, (rtt_ms - GRPC_RTT_MS) / 2)


def plan(machines: Sequence[Machine], model: ModelShape, *, layout: str = "auto", min_stages: int = 1,
         link_gbps: float = 1.0, hop_ms: float = 0.5, exchange_ms: float = EXCHANGE_MS, margin: float = 0.10,
         margin_bytes: int = 64 << 20) -> Plan:
    """The fastest layout that fits, by estimated decode ms per token: one machine, a pipeline
    (contiguous layer ranges), or a tensor-parallel group (a slice of every layer on each).
    layout: "auto", or one of them forced. The plan lists the others' estimates. Never slower
    than the best single machine that can hold the model (a pipeline of one is searched).

    machines: exactly one with is_host=True. Raises PlanError when the model cannot fit (the
    message says how much memory is missing) or the layout / min_stages cannot be met.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    host = next((m for m in machines if m.is_host), None)
    piped: Plan | PlanError
    try:
        piped = _pipeline_plan(machines, model, min_stages=min_stages, link_gbps=link_gbps, hop_ms=hop_ms,
                               margin=margin, margin_bytes=margin_bytes)
    except PlanError as err:
        piped = err
    single: Plan | PlanError
    try:
        single = _pipeline_plan([host] if host else machines, model, min_stages=1, link_gbps=link_gbps,
                                hop_ms=hop_ms, margin=margin, margin_bytes=margin_bytes)
        single = replace(single, layout="single")
    except PlanError as err:
        single = err
    tensor = _tensor_plan(machines, model, link_gbps=link_gbps, exchange_ms=exchange_ms, margin=margin,
                          margin_bytes=margin_bytes, everyone=layout == "tensor") \
        if min_stages <= 1 or layout == "tensor" else None
    options = {"single": single, "pipeline": piped, "tensor": tensor}
    alternatives = tuple(
        (name, option.est_ms_per_token if isinstance(option, Plan) else None,
         str(option) if isinstance(option, PlanError) else ("needs 2 machines and quantized weights"
                                                            if option is None else ""))
        for name, option in options.items())
    if layout == "auto":
        fits = [o for o in (piped, tensor) if isinstance(o, Plan)]
        if not fits:
            raise piped if isinstance(piped, PlanError) else PlanError("no layout fits")
        chosen = min(fits, key=lambda o: (o.est_ms_per_token, o.layout != "pipeline"))
        if chosen.layout == "pipeline" and chosen.n_active == 1 and len(chosen.stages) == 1:
            chosen = replace(chosen, layout="single")
    else:
        chosen = options[layout]
        if chosen is None:
            raise PlanError("the tensor-parallel layout needs at least one peer with a measured speed "
                            "(and a model whose dims split in groups of 32): use --layout auto or pipeline")
        if isinstance(chosen, PlanError):
            raise chosen
    return replace(chosen, alternatives=alternatives)


TP_GROUP = 32  # engine/tensor.py ROW_GROUP: a machine holds at least this many FFN columns and dims
TP_SUBSETS_UP_TO = 10  # peers up to which every subset is tried as the group (2^10 cheap estimates)


def _tensor_plan(machines: Sequence[Machine], model: ModelShape, *, link_gbps: float, exchange_ms: float,
                 margin: float, margin_bytes: int, everyone: bool = False) -> Plan | None:
    """The best tensor-parallel group: the host and the subset of measured peers with the lowest
    estimate that fits (every subset up to TP_SUBSETS_UP_TO peers; beyond, the k - 1 fastest for
    every k); everyone (a forced --layout tensor): every measured machine, if they fit. Each machine's share is proportional to its speed, so
    all finish a layer together: compute = 1 / sum(1 / whole-model ms). The exchanges: four
    all-gathers a layer (+ the step and the candidates), each machine sending its share of
    exchange_floats fp32 to each other one. None without a tensor-parallel shape or a peer."""
    host = next((m for m in machines if m.is_host), None)
    if host is None or model.exchange_floats <= 0 or not _measured(host):
        return None
    peers = sorted((m for m in machines if not m.is_host and _measured(m)), key=lambda m: (_whole_ms(m, model), m.node_id))
    cost = _Cost(model, _prefix(model.layer_bytes), 0.0, 0.0, margin, margin_bytes)
    best: Plan | None = None
    if everyone and peers:  # --layout tensor: every measured machine, as the person asked (if they fit)
        candidates = [[host, *peers]]
    elif len(peers) <= TP_SUBSETS_UP_TO:  # every subset: a fast peer short of memory may lose to a slower one
        candidates = [[host, *sub] for k in range(1, len(peers) + 1) for sub in itertools.combinations(peers, k)]
    else:  # the fastest k - 1 peers, for every k
        candidates = [[host, *peers[:k - 1]] for k in range(2, len(peers) + 2)]
    for group in candidates:
        k = len(group)
        speeds = [1.0 / _whole_ms(m, model) for m in group]
        total = sum(speeds)
        shares = [v / total for v in speeds]
        compute = 1.0 / total
        per_layer = model.exchange_floats * 4
        net = []
        for share in shares:  # bytes this machine sends each token, over its one link
            out = share * per_layer * model.n_layers * (k - 1)
            net.append(out * 8 / (link_gbps * 1e6) + (4 * model.n_layers + 4) * exchange_ms)
        fits = True
        members = []
        for m, share, n_ms in zip(group, shares, net):
            need = share * (model.weight_bytes + model.n_layers * model.kv_bytes_per_layer + model.head_bytes)
            if m.is_host:
                need += model.embed_bytes
            if need > cost.usable(m):
                fits = False
            members.append(Share(m, share, int(need), compute, n_ms))
        if not fits:
            continue
        est = compute + max(net)
        if best is None or est < best.est_ms_per_token - 1e-12:
            used = {g.machine.node_id for g in members}
            decisions = tuple((m, f"{100 * g.share:.0f}% of every layer, by measured speed")
                              for g in members for m in [g.machine])
            decisions += tuple((m, "slower: the group is faster without it" if _measured(m)
                                else "no measured speed: run `fastserve join --reprofile` on it")
                               for m in sorted(machines, key=lambda m: m.node_id) if m.node_id not in used)
            best = Plan(stages=(), est_ms_per_token=est, decisions=decisions, layout="tensor", group=tuple(members))
    return best


def _whole_ms(m: Machine, model: ModelShape) -> float:
    """The whole model's decode step alone on m (layers and head), by its measurements."""
    nbytes = model.weight_bytes * model.read_share + model.head_bytes
    flops = model.n_layers * model.layer_flops + model.head_flops
    return max(nbytes / (m.bandwidth_gbs * 1e6), flops / (m.decode_gflops * 1e6))


def _pipeline_plan(machines: Sequence[Machine], model: ModelShape, *, min_stages: int = 1,
                   link_gbps: float = 1.0, hop_ms: float = 0.5, margin: float = 0.10,
                   margin_bytes: int = 64 << 20) -> Plan:
    """Give each machine a contiguous range of layers, minimising estimated decode ms per token."""
    hosts = [m for m in machines if m.is_host]
    if len(hosts) != 1:
        raise ValueError(f"plan() needs exactly one host machine, got {len(hosts)}")
    ids = [m.node_id for m in machines]
    if len(set(ids)) != len(ids):
        raise ValueError("plan(): two machines share a node_id")
    if min_stages < 1:
        raise ValueError("min_stages must be >= 1")
    if not 0 <= margin < 1:
        raise ValueError("margin must be in [0, 1)")
    if link_gbps <= 0:
        raise ValueError("link_gbps must be > 0")
    host = hosts[0]
    cost = _Cost(model, _prefix(model.layer_bytes), hop_ms + model.hidden_bytes * 8 / (link_gbps * 1e6),
                 hop_ms, margin, margin_bytes)
    everyone = sorted(machines, key=lambda m: m.node_id)
    if min_stages > len(everyone):
        raise PlanError(f"--min-stages {min_stages} needs {min_stages} machines but only {len(everyone)} "
                        f"{'is' if len(everyone) == 1 else 'are'} here; start `fastserve join` on "
                        f"{min_stages - len(everyone)} more or lower --min-stages")
    if not _measured(host):
        raise ValueError("plan(): the host has no measured speed (bandwidth_gbs and decode_gflops must be > 0)")
    peers = [m for m in everyone if not m.is_host and _measured(m)]
    got = _best(host, peers, cost, min_stages)
    if got is None:
        raise _no_fit(host, peers, everyone, cost, min_stages)
    total, taken = got
    stages = tuple(_stage(m, i, j, cost) for m, i, j in taken)
    decisions = _decisions(stages, total, everyone, peers, cost, min_stages)
    return Plan(stages=stages, est_ms_per_token=sum(s.est_ms for s in stages), decisions=decisions)


def _prefix(sizes: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for b in sizes:
        out.append(out[-1] + b)
    return tuple(out)


def _stage(m: Machine, i: int, j: int, cost: _Cost) -> Stage:
    compute, network = cost.compute(m, i, j), cost.network(m, j)
    return Stage(machine=m, start=i, end=j, memory_bytes=cost.memory(m, i, j), est_ms=compute + network,
                 compute_ms=compute, network_ms=network, holds_embedding=m.is_host,
                 holds_head=j == cost.model.n_layers)


def _smallest_layer_need(cost: _Cost) -> int:
    return min(cost.model.layer_bytes) + cost.model.kv_bytes_per_layer


def _decisions(stages, total, everyone, peers, cost: _Cost, min_stages: int) -> tuple[tuple[Machine, str], ...]:
    used = {s.machine.node_id for s in stages}
    out: list[tuple[Machine, str]] = []
    exhaustive = len(peers) <= 4  # counterfactuals: cheap single-order search beyond a few peers
    for s in stages:
        m = s.machine
        what = f"layers {s.describe_layers()}" if s.n_layers else "no layers"
        if m.is_host:
            if len(stages) == 1:
                why = f"{what} + embedding + head: the whole model, fastest on the host alone"
            elif s.n_layers:
                why = f"{what} + embedding: the host runs the first stage"
            elif cost.usable(m) < cost.memory(m, 0, 1):
                why = "embedding only: no room for a layer on the host"
            else:
                why = "embedding only: the peers run every layer faster"
            out.append((m, why))
            continue
        head = " + head" if s.holds_head else ""
        others = [p for p in peers if p.node_id != m.node_id]
        without = _best(stages[0].machine, others, cost, min_stages, exhaustive=exhaustive)
        if without is None:
            feasible = _best(stages[0].machine, others, cost, 1, exhaustive=exhaustive) is not None
            why = f"needed for --min-stages {min_stages}" if feasible and min_stages > 1 else "needed for memory"
        else:
            saved = without[0] - total
            why = f"{saved:.2f} ms/token faster than without it" if saved > 0 else "as fast as without it"
        out.append((m, f"{what}{head}: {why}"))
    users = ", ".join(s.machine.name for s in stages if s.n_layers)
    for m in everyone:
        if m.node_id in used:
            continue
        usable = cost.usable(m)
        if not _measured(m):
            why = "no measured speed: run `fastserve join --reprofile` on it"
        elif usable < _smallest_layer_need(cost):
            why = (f"too little memory: {describe_bytes(max(0, usable))} usable, one layer with its KV "
                   f"needs {describe_bytes(_smallest_layer_need(cost))}")
        elif len(stages) == 1:
            why = "not needed: the host holds the whole model faster alone"
        else:
            per = cost.ms_per_layer(m)
            why = (f"slower than using {users}: {per:.2f} ms/layer + {cost.link_ms:.2f} ms per hop")
        out.append((m, why))
    return tuple(out)


def _no_fit(host: Machine, peers: Sequence[Machine], everyone: Sequence[Machine], cost: _Cost,
            min_stages: int) -> PlanError:
    md = cost.model
    if min_stages > 1 and _best(host, peers, cost, 1) is not None:
        layer = _smallest_layer_need(cost)
        roomy = [m for m in [host, *peers] if cost.usable(m) >= layer + (md.embed_bytes if m.is_host else 0)]
        return PlanError(f"cannot spread the model over {min_stages} machines: only {len(roomy)} of "
                         f"{len(everyone)} have room for a layer ({describe_bytes(layer)} with its KV); "
                         f"lower --min-stages or start `fastserve join` on another machine")
    if cost.usable(host) < md.embed_bytes:
        short = md.embed_bytes - max(0, cost.usable(host))
        return PlanError(f"{describe_bytes(short)} more memory is needed on the host: the embedding alone "
                         f"needs {describe_bytes(md.embed_bytes)} and the host offers "
                         f"{describe_bytes(max(0, cost.usable(host)))} usable after the safety margin; "
                         f"free memory on the host or raise --max-memory")
    need = md.weight_bytes + md.n_layers * md.kv_bytes_per_layer + md.embed_bytes + md.head_bytes
    if md.tied_embeddings:
        need -= min(md.embed_bytes, md.head_bytes)  # lower bound: the host may hold both
    have = sum(max(0, cost.usable(m)) for m in [host, *peers])
    # Whole layers may not divide among the machines, so the total shortfall is only a lower
    # bound: search the least usable memory one more machine would have to add.
    lo, hi = max(1, need - have), need
    step = max(1 << 20, hi >> 10)
    while hi - lo > step:
        mid = (lo + hi) // 2
        if _fits_with_newcomer(host, peers, mid, cost):
            hi = mid
        else:
            lo = mid + 1
    n_all = len(everyone)
    return PlanError(f"{describe_bytes(hi)} more memory is needed: the model needs {describe_bytes(need)} "
                     f"(weights + KV for {md.ctx} tokens + embedding/head) and the {n_all} "
                     f"machine{'s' if n_all != 1 else ''} offer{'' if n_all != 1 else 's'} {describe_bytes(have)} "
                     f"usable after the safety margin; start `fastserve join` on another machine "
                     f"or raise --max-memory")


def _fits_with_newcomer(host: Machine, peers: Sequence[Machine], usable: int, cost: _Cost) -> bool:
    """Would the model fit if one more machine with `usable` bytes joined? (it sorts last: the tail)"""
    offered = math.ceil((usable + cost.margin_bytes) / (1 - cost.margin)) + 1
    newcomer = Machine("\uffff", "newcomer", "", offered, 1e-6, 1e-6, 1e-6)
    return _best(host, [*peers, newcomer], cost, 1, exhaustive=False) is not None


def kv_room_tokens(plan: Plan, kv_bytes_per_token: int, ctx: int, n_layers: int = 1) -> int:
    """Tokens of KV that every stage of `plan` can hold for all sessions together: what its
    machine offers, less the stage's weights (a stage's memory_bytes counts one context of
    KV; that is given back here), over its layers' KV bytes per token (a tensor-parallel
    machine: its share of n_layers layers'). The serving loop bounds the KV of all its sessions
    by this."""
    rooms = []
    for g in plan.group:  # tensor parallel: each machine holds its share of every layer's KV
        per_token = max(1, math.ceil(kv_bytes_per_token * n_layers * g.share))
        rooms.append(max(0, g.machine.memory_bytes - g.memory_bytes) // per_token + ctx)
    for s in plan.stages:
        if s.n_layers == 0:
            continue
        per_token = kv_bytes_per_token * s.n_layers
        free = s.machine.memory_bytes - s.memory_bytes + per_token * ctx
        rooms.append(max(0, free) // per_token)
    return min(rooms) if rooms else ctx * 1024  # no layer anywhere: the host embeds only
