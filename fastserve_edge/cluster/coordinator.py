"""The host: find the peers, plan, hand out stages, drive the pipeline, re-plan on loss.

    discover()  mDNS (and --peer addresses) -> Hello each peer of our cluster -> Machines
    plan()      planner.plan(host + peers, the model's shape) -> Plan
    apply()     the host builds its own stage from the model file; each peer gets LoadStage
                and fetches what its cache lacks from the host's FetchLayer
    pipeline    a Pipeline over [LocalStage, RemoteStage, ...]; ClusterPipeline wraps it so
                that a peer lost mid-answer costs a re-plan and a re-prefill, never the answer.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from fastserve_edge.cluster import datapath, discovery, planner
from fastserve_edge.cluster.auth import DEFAULT_MAX_WORKERS, cluster_id, serve
from fastserve_edge.cluster.peer import ModelProvider, WeightServer, part_to_pb
from fastserve_edge.cluster.profile import Profile, load_profile
from fastserve_edge.cluster.protocol import peer_pb2
from fastserve_edge.cluster.remote import PeerClient, PeerLost, PeerRefused, RemoteStage, SessionLost
from fastserve_edge.cluster.shard_cache import Manifest, build_manifest, parts_for_stage
from fastserve_edge.engine.generate import (
    DecodeStep,
    GenerationStats,
    LocalStage,
    Pipeline,
    PipelineReset,
    Prefill,
    StageRunner,
)
from fastserve_edge.engine.kernels import ExchangeError
from fastserve_edge.engine.kv_cache import kv_bytes_per_token
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import RuntimeWeights
from fastserve_edge.engine.sampling import Sampler
from fastserve_edge.engine.tensor import Slices, SliceWeights, TensorGroup, TensorSlice
from fastserve_edge.errors import FastServeError, PlanError
from fastserve_edge.models.tensors import ModelSource, block_rows
from fastserve_edge.settings import Paths

GROUP_TIMEOUT_MS = 10_000  # an exchange of a tensor-parallel group that makes no progress this long fails
GROUP_CONNECT_S = 60.0     # the data path opens once every machine has loaded its slice
REPLAN_BROWSE_S = 1.0  # a short look for machines that joined since the last plan


@dataclass(frozen=True)
class ClusterOptions:
    token: str
    want_peers: int = 0            # --peers: wait until this many peers of our cluster answered
    wait_s: float = 2.0            # --wait: how long to look
    min_stages: int = 1            # --min-stages: force a spread (tests, or people who want it)
    max_memory: int | None = None  # --max-memory for the host's own share
    interface: str | None = None   # --interface
    static_peers: tuple[str, ...] = ()  # --peer ADDR: peers to use without mDNS
    threads: int = 1
    reprofile: bool = False
    layout: str = "auto"           # --layout: auto | single | pipeline | tensor (planner.LAYOUTS)


@dataclass
class PeerEntry:
    client: PeerClient
    hello: peer_pb2.HelloReply
    link: tuple[float, float] | None = None  # (round trip ms, Gbit/s) measured when it was greeted

    @property
    def machine(self) -> planner.Machine:
        p = self.hello.profile
        return planner.Machine(node_id=self.hello.node_id, name=self.hello.name, address=self.client.address,
                               memory_bytes=p.memory_bytes, decode_gflops=p.decode_gflops,
                               prefill_gflops=p.prefill_gflops, bandwidth_gbs=p.bandwidth_gbs)


@dataclass
class Transfer:
    """What the host sent one peer while it loaded its stage (for the progress bars)."""
    name: str
    expected: int           # bytes of the parts its stage needs (all of them, if none are cached)
    sent: int = 0
    done: bool = False
    reply: peer_pb2.LoadStageReply | None = None


def model_shape(source: ModelSource, manifest: Manifest, ctx: int) -> planner.ModelShape:
    c = source.config
    rb = manifest.runtime_bytes
    attn = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2
    ffn, read_share = 3 * c.dim * c.ffn_dim, 1.0
    if c.moe:  # every expert is held, the chosen ones are read and computed
        ffn = 3 * c.dim * c.expert_ffn_dim * c.n_experts_used + c.dim * c.n_experts
        read_share = (attn + ffn) / (attn + 3 * c.dim * c.expert_ffn_dim * c.n_experts + c.dim * c.n_experts)
    return planner.ModelShape(
        n_layers=c.n_layers,
        layer_bytes=tuple(rb.get(f"layer.{i}", 0) for i in range(c.n_layers)),
        layer_flops=2.0 * (attn + ffn),
        read_share=read_share,
        kv_bytes_per_token=kv_bytes_per_token(c.n_kv_heads, c.head_dim),
        embed_bytes=rb.get("embed", 0) + rb.get("common", 0),
        head_bytes=rb.get("head", 0) + rb.get("common", 0),
        hidden_bytes=c.dim * 4,
        ctx=ctx,
        tied_embeddings=c.tie_embeddings,
        head_flops=2.0 * c.vocab_size * c.dim,
        # all-gathered a layer: the heads, wo's rows, then the FFN's columns and down's rows (a
        # mixture: each row's chosen experts' weighted outputs); 0: too narrow to split
        exchange_floats=(0 if (c.dim if c.moe else min(c.dim, c.ffn_dim)) < 2 * planner.TP_GROUP else
                         c.n_heads * c.head_dim + c.dim + c.n_experts_used * c.dim if c.moe else
                         c.n_heads * c.head_dim + 2 * c.dim + c.ffn_dim),
    )


class Coordinator:
    def __init__(self, *, paths: Paths, source: ModelSource, model_path: Path, model_name: str, ctx: int,
                 options: ClusterOptions, notice: Callable[[str], None] = lambda message: None):
        self.paths, self.source, self.model_name, self.ctx = paths, source, model_name, ctx
        self.options, self.notice = options, notice
        self.config = source.config
        self.cluster_id = cluster_id(options.token)
        self.node_id = discovery.load_node_id(paths.config)
        self.name = socket.gethostname()
        self.profile: Profile = load_profile(paths.cache, threads=options.threads, max_memory=options.max_memory,
                                             reprofile=options.reprofile)
        self.manifest = build_manifest(source, model_path, paths.cache)
        self.shape = model_shape(source, self.manifest, ctx)
        self.peers: dict[str, PeerEntry] = {}
        self.refused: list[tuple[str, str]] = []  # (machine, why) seen but not usable
        self.plan: planner.Plan | None = None
        self.pipeline: Pipeline | None = None
        self.transfers: dict[str, Transfer] = {}
        self._weights = RuntimeWeights(source)
        self._server: grpc.Server | None = None
        self._provider: ModelProvider | None = None
        self._data_listener: socket.socket | None = None  # the tensor-parallel data port, opened on first use
        self.address = ""

    # -- finding machines -------------------------------------------------------------------
    def _interfaces(self) -> list[tuple[str, str]]:
        return discovery.lan_interfaces(self.options.interface)

    def discover(self, *, wait_s: float | None = None, on_found: Callable[[int], None] = lambda n: None) -> None:
        """Look for peers of our cluster (mDNS + --peer) and greet each new one."""
        addresses = list(self.options.static_peers)
        if not self.options.static_peers or self.options.interface:
            interfaces = self._interfaces()
            want = self.options.want_peers or None
            # keep_gone: a goodbye (anyone on the LAN can send one) does not hide a peer; its Hello decides
            nodes = discovery.browse_sync(timeout=self.options.wait_s if wait_s is None else wait_s,
                                          interfaces=interfaces, want=want, cluster_id=self.cluster_id,
                                          keep_gone=True)
            for node in nodes:
                if node.role != "peer" or node.node_id == self.node_id or not node.addresses:
                    continue
                if node.cluster_id != self.cluster_id:
                    self.refused.append((node.name, "belongs to another cluster (a different --token)"))
                    continue
                addresses.append(f"{node.addresses[0]}:{node.port}")
        addresses = [a for a in dict.fromkeys(addresses)
                     if not any(entry.client.address == a for entry in self.peers.values())]
        if not addresses:
            return

        def greet(address: str) -> tuple[PeerClient, peer_pb2.HelloReply | Exception]:
            client = PeerClient(address, self.options.token)
            try:
                return client, client.hello(self.node_id, self.name)
            except (PeerLost, PeerRefused) as err:
                return client, err

        # every address at once: a LAN full of fake announcements costs one Hello timeout, not one each
        with ThreadPoolExecutor(max_workers=min(16, len(addresses))) as pool:
            greeted = list(pool.map(greet, addresses))
        for address, (client, hello) in zip(addresses, greeted):
            if isinstance(hello, Exception):
                client.close()
                self.refused.append((address, str(hello)))
                continue
            old = self.peers.get(hello.node_id)
            if old is not None and self._alive(old):
                client.close()  # a second machine with a node id we use: the one we have stays
                self.refused.append((address, f"claims node id {hello.node_id}, which {old.client.address} has"))
                continue
            if old is not None:
                old.client.close()
            self.peers[hello.node_id] = PeerEntry(client, hello)
            on_found(len(self.peers))
        self._measure_links()

    def _measure_links(self) -> None:
        """Time the link to every peer not yet measured (in parallel): the planner's latency and
        bandwidth. A peer that fails it is measured again at the next look."""
        todo = [e for e in self.peers.values() if e.link is None]
        if not todo:
            return

        def measure(entry: PeerEntry) -> None:
            try:
                entry.link = entry.client.measure_link()
            except (PeerLost, PeerRefused):
                entry.link = None

        with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
            list(pool.map(measure, todo))

    def link(self) -> tuple[float, float] | None:
        """The slowest measured link: (round trip ms, Gbit/s), or None before any peer."""
        links = [e.link for e in self.peers.values() if e.link is not None]
        if not links:
            return None
        return max(rtt for rtt, _ in links), min(gbps for _, gbps in links)

    @staticmethod
    def _alive(entry: PeerEntry) -> bool:
        try:
            entry.client.health(timeout=2.0)
        except FastServeError:
            return False
        return True

    def machines(self) -> list[planner.Machine]:
        p = self.profile
        host = planner.Machine(node_id=self.node_id, name=self.name, address="", memory_bytes=p.memory_bytes,
                               decode_gflops=p.decode_gflops, prefill_gflops=p.prefill_gflops,
                               bandwidth_gbs=p.bandwidth_gbs, is_host=True)
        machines = [host] + [entry.machine for entry in self.peers.values()]
        names = [m.name for m in machines]
        return [replace(m, name=f"{m.name} ({m.node_id[:6]})") if names.count(m.name) > 1 else m for m in machines]

    def make_plan(self, *, min_stages: int | None = None) -> planner.Plan:
        want = self.options.min_stages if min_stages is None else min_stages
        machines = self.machines()
        link = self.link()
        measured = {} if link is None else dict(link_gbps=link[1], exchange_ms=planner.exchange_ms_of(link[0]))
        self.plan = planner.plan(machines, self.shape, layout=self.options.layout, min_stages=min(want, len(machines)),
                                 margin=0.0, margin_bytes=0, **measured)
        if link is not None:
            self.plan = replace(self.plan, link=f"slowest link {link[0]:.2f} ms round trip, {link[1]:.2f} Gbit/s")
        return self.plan

    # -- handing out stages -------------------------------------------------------------------
    def _serve_weights(self) -> None:
        """The host's Peer service (FetchLayer only), on the address the peers reach us at."""
        if self._server is not None:
            return
        if self.options.static_peers and not self.options.interface and all(
                a.startswith(("127.", "localhost")) for a in self.options.static_peers):
            ip = "127.0.0.1"
        else:
            ip = self._interfaces()[0][1]
        provider = self._provider = ModelProvider(self.source, self.manifest, on_sent=self._sent)
        self._server, port = serve(WeightServer(provider), self.options.token, bind=f"{ip}:0")
        self.address = f"{ip}:{port}"

    def _sent(self, peer: str, nbytes: int) -> None:
        ip = peer.split(":")[1] if peer.startswith("ipv4:") else peer
        for address, transfer in self.transfers.items():
            if address.rsplit(":", 1)[0] == ip:
                transfer.sent += nbytes
                return

    def _load_request(self, stage: planner.Stage) -> peer_pb2.LoadStageRequest:
        manifest = [
            peer_pb2.TensorEntry(name=name, sha256=sha, part=part_to_pb(part), nbytes=self._data_bytes(name))
            for part in parts_for_stage(self.config, stage.start, stage.end)
            for name, sha in sorted(self.manifest.parts.get(part, {}).items())
        ]
        return peer_pb2.LoadStageRequest(
            model_digest=self.manifest.digest, model_name=self.model_name,
            model_config_json=json.dumps(self.config.to_dict()), layer_start=stage.start, layer_end=stage.end,
            has_embedding=False, has_head=stage.end == self.config.n_layers, manifest=manifest,
            source_address=self.address, ctx=self.ctx, host_name=self.name, host_node_id=self.node_id)

    def _data_bytes(self, name: str) -> int:
        """A tensor's data bytes as its type and shape say (what a peer may expect to receive)."""
        t = self.source.tensor(name)
        rows, row_bytes = block_rows(t.qtype, tuple(t.shape))
        return rows * row_bytes

    def apply(self, plan: planner.Plan) -> Pipeline:
        """Build the host's stage and load every peer's; returns the ready pipeline."""
        self.close_pipeline()
        if plan.layout == "tensor":
            return self._apply_tensor(plan)
        host_stage = plan.stages[0]
        stages: list[StageRunner] = [LocalStage(Stage(self.config, self._weights, 0, host_stage.end,
                                                      max_tokens=self.ctx))]
        peer_stages = plan.stages[1:]
        if peer_stages:
            self._serve_weights()
            self.transfers = {
                self.peers[s.machine.node_id].client.address: Transfer(
                    s.machine.name, sum(self.manifest.part_bytes.get(p, 0)
                                        for p in parts_for_stage(self.config, s.start, s.end)))
                for s in peer_stages
            }

            def load(s: planner.Stage) -> RemoteStage:
                entry = self.peers[s.machine.node_id]
                reply = entry.client.load_stage(self._load_request(s))
                transfer = self.transfers[entry.client.address]
                transfer.reply, transfer.done = reply, True
                return RemoteStage(entry.client, s.start, s.end, is_last=s.end == self.config.n_layers,
                                   max_elements=self.ctx * max(self.config.dim, self.config.vocab_size),
                                   vocab_size=self.config.vocab_size)

            with ThreadPoolExecutor(max_workers=len(peer_stages)) as pool:
                futures = [pool.submit(load, s) for s in peer_stages]
                errors = []
                for s, future in zip(peer_stages, futures):
                    try:
                        stages.append(future.result())
                    except PeerLost as err:
                        self.forget(err.node_id or s.machine.node_id)
                        errors.append(err)
                    except PeerRefused as err:
                        self.forget(s.machine.node_id)
                        errors.append(err)
                if errors:
                    raise errors[0]
        self.pipeline = Pipeline(self.config, stages, self.ctx)
        return self.pipeline

    def _apply_tensor(self, plan: planner.Plan) -> Pipeline:
        """A tensor-parallel group: the host is machine 0. Every peer loads its slice (from its
        shard cache, or fetched from the host), then all open the data path to each other."""
        cfg = self.config
        slices = Slices.split(cfg, [g.share for g in plan.group])
        self._serve_weights()
        ip = self.address.rsplit(":", 1)[0]
        if self._data_listener is None:
            self._data_listener = datapath.listen(ip, 0)
        entries = [self.peers[g.machine.node_id] for g in plan.group[1:]]
        addresses = [(ip, self._data_listener.getsockname()[1])] + [
            (e.client.address.rsplit(":", 1)[0], e.hello.data_port) for e in entries]
        secret = datapath.new_plan_secret()
        parts = parts_for_stage(cfg, 0, cfg.n_layers)
        assert self._provider is not None
        manifests = [self._provider.slice_manifest(slices, r, parts) for r in range(1, slices.ranks)]
        self.transfers = {e.client.address: Transfer(e.hello.name, sum(n for part in m.values() for _, n in part.values()))
                          for e, m in zip(entries, manifests)}
        tensor_plan = dict(kv_at=slices.kv_at, dim_at=slices.dim_at, ffn_at=slices.ffn_at, vocab_at=slices.vocab_at,
                           data_addresses=[f"{h}:{p}" for h, p in addresses], secret=secret)

        def load(rank: int, entry: PeerEntry) -> None:
            if not entry.hello.data_port:
                raise PeerRefused(f"{entry.hello.name} runs a fastserve without the tensor-parallel data path: "
                                  "update it, or use --layout pipeline")
            manifest = [peer_pb2.TensorEntry(name=name, sha256=sha, part=part_to_pb(part), nbytes=nbytes)
                        for part, names in sorted(manifests[rank - 1].items())
                        for name, (sha, nbytes) in sorted(names.items())]
            request = peer_pb2.LoadStageRequest(
                model_digest=self.manifest.digest, model_name=self.model_name,
                model_config_json=json.dumps(cfg.to_dict()), layer_start=0, layer_end=cfg.n_layers,
                has_head=True, manifest=manifest, source_address=self.address, ctx=self.ctx, host_name=self.name,
                host_node_id=self.node_id, tensor=peer_pb2.TensorPlan(rank=rank, **tensor_plan))
            transfer = self.transfers[entry.client.address]
            transfer.reply, transfer.done = entry.client.load_stage(request), True

        with ThreadPoolExecutor(max_workers=len(entries)) as pool:
            futures = [pool.submit(load, r, e) for r, e in enumerate(entries, start=1)]
            mine = TensorSlice(SliceWeights(self.source, slices, 0), max_tokens=self.ctx, timeout_ms=GROUP_TIMEOUT_MS)
            errors = []
            for entry, future in zip(entries, futures):
                try:
                    future.result()
                except (PeerLost, PeerRefused) as err:
                    self.forget(entry.hello.node_id)
                    errors.append(err)
            if errors:
                raise errors[0]
        try:
            links = datapath.connect(mine.kernels, 0, addresses, self._data_listener, secret,
                                     timeout_s=GROUP_CONNECT_S)
        except datapath.DataPathError as err:
            raise PeerLost(entries[0].hello.name, entries[0].hello.node_id, str(err)) from None
        stage = GroupStage(TensorGroup(mine, links.mesh), links, [(e.hello.name, e.hello.node_id) for e in entries])
        self.pipeline = Pipeline(cfg, [stage], self.ctx)
        return self.pipeline

    def forget(self, node_id: str) -> None:
        entry = self.peers.pop(node_id, None)
        if entry is not None:
            entry.client.close()

    def close_pipeline(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            for stage in self.pipeline.stages:
                if isinstance(stage, (RemoteStage, GroupStage)):
                    stage.close()
            self.pipeline = None

    def recover(self, *, on_plan: Callable[[planner.Plan], None] = lambda p: None) -> Pipeline:
        """Re-plan with the machines we still have (and any that joined), then load it.
        Raises PlanError when they cannot hold the model."""
        self.close_pipeline()
        for node_id, entry in list(self.peers.items()):
            if not self._alive(entry):
                self.forget(node_id)
        try:
            self.discover(wait_s=REPLAN_BROWSE_S)
        except discovery.DiscoveryError:
            pass
        while True:
            plan = self.make_plan()
            on_plan(plan)
            try:
                return self.apply(plan)
            except (PeerLost, PeerRefused) as err:  # one went away or refused while we loaded: plan without it
                self.notice(f"{err}; planning again")

    def close(self) -> None:
        self.close_pipeline()
        for node_id in list(self.peers):
            self.forget(node_id)
        if self._server is not None:
            self._server.stop(None)
            self._server = None
        if self._data_listener is not None:
            self._data_listener.close()
            self._data_listener = None


class GroupStage:
    """A tensor-parallel group as the token loop's one stage (engine/tensor.py TensorGroup): a
    failed exchange names the machine, and becomes PeerLost, which re-plans without it."""

    def __init__(self, group: TensorGroup, links: datapath.Links, peers: list[tuple[str, str]]):
        self.group, self.links, self.peers = group, links, peers  # peers[r - 1]: (name, node id) of rank r
        self.start, self.end = group.start, group.end

    def _lost(self, err: ExchangeError) -> PeerLost:
        name, node_id = self.peers[err.peer - 1] if 1 <= err.peer <= len(self.peers) else self.peers[0]
        return PeerLost(name, node_id, f"the tensor-parallel data path failed: {err}")

    def forward(self, session: str, x, pos: int, *, all_logits: bool = False):
        try:
            return self.group.forward(session, x, pos, all_logits=all_logits)
        except ExchangeError as err:
            raise self._lost(err) from None

    def forward_batch(self, sessions, x, positions):
        try:
            return self.group.forward_batch(sessions, x, positions)
        except ExchangeError as err:
            raise self._lost(err) from None

    def drop(self, session: str) -> None:
        try:
            self.group.drop(session)
        except ExchangeError:
            pass  # the next step will notice

    def close(self) -> None:
        self.group.close()
        self.links.close()


class ClusterPipeline:
    """A Pipeline that survives peers leaving: the answer goes on after a re-plan."""

    # Sessions that may hold KV at once: each keeps a Forward stream open on every peer, and a
    # peer serves DEFAULT_MAX_WORKERS calls at a time (room left for Health, DropSession, ...)
    max_open_sessions = DEFAULT_MAX_WORKERS - 16

    def __init__(self, coordinator: Coordinator, *, notice: Callable[[str], None] = lambda message: None,
                 on_plan: Callable[[planner.Plan], None] = lambda plan: None):
        self.coordinator = coordinator
        self.notice, self.on_plan = notice, on_plan
        self.ctx = coordinator.ctx

    def replan(self) -> planner.Plan:
        self.coordinator.recover(on_plan=self.on_plan)
        assert self.coordinator.plan is not None
        return self.coordinator.plan

    def drop(self, session: str) -> None:
        if self.coordinator.pipeline is not None:
            self.coordinator.pipeline.drop(session)

    # -- the serving loop's interface (serving/engine_loop.py): a step at a time ----------------

    @property
    def config(self):
        return self.coordinator.config

    @property
    def stages(self) -> list[StageRunner]:
        pipeline = self.coordinator.pipeline
        return pipeline.stages if pipeline is not None else []

    @property
    def meters(self) -> list:
        pipeline = self.coordinator.pipeline
        return pipeline.meters if pipeline is not None else []

    def kv_room_tokens(self) -> int:
        """KV tokens every stage of the current plan has room for (planner.kv_room_tokens)."""
        plan = self.coordinator.plan
        if plan is None:
            return self.ctx
        cfg = self.coordinator.config
        return planner.kv_room_tokens(plan, kv_bytes_per_token(cfg.n_kv_heads, cfg.head_dim), self.ctx, cfg.n_layers)

    def _current(self) -> Pipeline:
        if self.coordinator.pipeline is None:
            try:
                self.coordinator.recover(on_plan=self.on_plan)
            except PlanError as err:
                raise PlanError(f"{err}. Start `fastserve join` on a machine (or restart the one that left), "
                                "then send the request again") from None
            raise PipelineReset("the cluster was planned again")
        return self.coordinator.pipeline

    def _step(self, call):
        """Run one step on the current pipeline; a peer that left costs a re-plan, and the
        caller hears PipelineReset (every session re-prefills: nothing it produced is lost)."""
        pipeline = self._current()
        try:
            return call(pipeline)
        except SessionLost as err:
            self.notice(f"{err}: every session is sent again")
            self.coordinator.close_pipeline()
        except PeerLost as err:
            self.notice(f"{err}; re-planning with the machines left, then going on with every answer")
            self.coordinator.forget(err.node_id)
            self.coordinator.close_pipeline()
        self._current()  # re-plans, and raises PipelineReset
        raise AssertionError("unreachable")

    def next_token(self, session: str, ids: Sequence[int], pos: int, sampler: Sampler,
                   context: Sequence[int]) -> int:
        return self._step(lambda p: p.next_token(session, ids, pos, sampler, context))

    def next_tokens(self, steps: Sequence[DecodeStep]) -> list[int]:
        return self._step(lambda p: p.next_tokens(steps))

    def first_tokens(self, prefills: Sequence[Prefill]) -> list[int]:
        return self._step(lambda p: p.first_tokens(prefills))

    def fork(self, source: str, copies: Sequence[str]) -> bool:
        """Peers have no verb to copy a session's KV: copies prefill, unless every layer is here."""
        pipeline = self.coordinator.pipeline
        return pipeline is not None and pipeline.fork(source, copies)

    @property
    def holds_head(self) -> bool:
        pipeline = self.coordinator.pipeline
        return pipeline is not None and pipeline.holds_head

    def final_hidden(self, ids: Sequence[int]):
        return self._step(lambda p: p.final_hidden(ids))

    def generate(self, session: str, prompt: Sequence[int], sampler: Sampler, *, max_tokens: int,
                 stop_ids: frozenset[int] = frozenset(), stats: GenerationStats | None = None) -> Iterator[int]:
        stats = stats if stats is not None else GenerationStats()
        produced: list[int] = []
        attempt = 0
        while len(produced) < max_tokens:
            pipeline = self.coordinator.pipeline
            if pipeline is None:
                try:
                    pipeline = self.coordinator.recover(on_plan=self.on_plan)
                except PlanError as err:
                    raise PlanError(f"{err}. The conversation is kept: start `fastserve join` on a machine "
                                    "(or restart the one that left), then type /replan or send a message again") from None
            inner = GenerationStats()
            try:
                for token in pipeline.generate(session, list(prompt) + produced, sampler,
                                               max_tokens=max_tokens - len(produced), stop_ids=stop_ids, stats=inner):
                    produced.append(token)
                    _merge(stats, inner, attempt, len(produced))
                    yield token
                _merge(stats, inner, attempt, len(produced))
                return
            except SessionLost as err:
                self.notice(f"{err}: sending the conversation again")
                pipeline.drop(session)
            except PeerLost as err:
                self.notice(f"{err}; re-planning with the machines left, then going on with the answer")
                self.coordinator.forget(err.node_id)
                self.coordinator.close_pipeline()
            attempt += 1
        stats.stop_reason = "length"


def _merge(total: GenerationStats, step: GenerationStats, attempt: int, produced: int) -> None:
    """Stats of an answer that may have been resumed after a re-plan."""
    if attempt == 0:
        total.prompt_tokens, total.cached_tokens, total.ttft_s = step.prompt_tokens, step.cached_tokens, step.ttft_s
        total.decode_s = step.decode_s
    total.generated_tokens = produced
    total.stop_reason = step.stop_reason
