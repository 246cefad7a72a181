"""The token loop over a list of stages. A stage may run here or on a peer: the loop
only needs `forward(session, x, pos)` and `drop(session)`. A last stage that can sample
by itself (`forward_sample`, a peer) returns the token id instead of the logits, so only
the id travels back; unless the sampler needs the logits on the host (`Sampler.host_only`:
logprobs, banned tokens, a grammar), when the peer sends the last position's logits instead
(`_peer_samples`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import torch

from fastserve_edge.models.config import ModelConfig
from fastserve_edge.engine.kv_cache import KVCache, reusable_prefix
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import DENSE_PREFILL_ROWS, RuntimeWeights
from fastserve_edge.engine.sampling import Sampler
from fastserve_edge.models.tensors import ModelSource


PIPELINE_THREADS = 32  # sessions whose rows go through the peers at once (more wait their turn)
PACKED_PREFILL_ROWS = 1024  # at most this many prompt tokens in one packed prefill: bounds its activations


class StageRunner(Protocol):
    start: int
    end: int

    def forward(self, session: str, x: torch.Tensor, pos: int, *, all_logits: bool = False) -> torch.Tensor: ...

    def drop(self, session: str) -> None: ...


class SamplingStage(StageRunner, Protocol):
    def forward_sample(self, session: str, x: torch.Tensor, pos: int, sampler: Sampler,
                       context: Sequence[int]) -> int: ...


class LocalStage:
    """A Stage on this machine with one KV cache per session."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.start, self.end = stage.start, stage.end
        self._caches: dict[str, KVCache] = {}

    def _cache(self, session: str) -> KVCache:
        cache = self._caches.get(session)
        if cache is None:
            cache = self._caches[session] = self.stage.new_cache()
        return cache

    def forward(self, session: str, x: torch.Tensor, pos: int, *, all_logits: bool = False,
                normed: bool = False) -> torch.Tensor:
        cache = self._cache(session)
        with torch.inference_mode():
            return self.stage(x, cache, pos, all_logits=all_logits, normed=normed)

    def fork(self, source: str, copy: str) -> bool:
        """Give session `copy` a copy of `source`'s KV (n answers to one prompt). False: none held."""
        cache = self._caches.get(source)
        if cache is None:
            return False
        self._caches[copy] = cache.copy()
        return True

    def forward_batch(self, sessions: Sequence[str], x: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """One new token for each session (sessions[r] at positions[r], after the tokens whose
        KV it holds). x: ids [M] or hidden [M, D] -> hidden [M, D] or logits [M, vocab]."""
        caches = [self._cache(s) for s in sessions]
        with torch.inference_mode():
            return self.stage.forward_batch(x, caches, list(positions))

    def forward_packed(self, sessions: Sequence[str], xs: Sequence[torch.Tensor],
                       positions: Sequence[int]) -> list[torch.Tensor]:
        """Several sessions' prefills in one forward (Stage.forward_packed): xs[r] ids [S_r] or
        hidden [S_r, D] -> hidden [S_r, D] each, or the last position's logits [vocab] each."""
        caches = [self._cache(s) for s in sessions]
        with torch.inference_mode():
            return self.stage.forward_packed(list(xs), caches, list(positions))

    def drop(self, session: str) -> None:
        self._caches.pop(session, None)

    def kv_bytes(self) -> int:
        """What the KV caches of every session hold here, allocated (they grow by doubling)."""
        return sum(c.nbytes for c in list(self._caches.values()))  # read while the worker adds and drops


def local_stages(source: ModelSource, *, max_tokens: int, boundaries: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32, activations: str | None = None) -> list[LocalStage]:
    """Stages for layer ranges [b0, b1), [b1, b2), ...; default: one stage with every layer.
    activations: the kernels' precision (quant.ACTIVATIONS), default the process's (--activations)."""
    cfg = source.config
    cuts = list(boundaries) if boundaries is not None else [0, cfg.n_layers]
    assert cuts[0] == 0 and cuts[-1] == cfg.n_layers and cuts == sorted(set(cuts)), f"bad boundaries {cuts}"
    weights = RuntimeWeights(source, dtype, activations=activations)
    return [LocalStage(Stage(cfg, weights, a, b, max_tokens=max_tokens)) for a, b in zip(cuts, cuts[1:])]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0      # the whole prompt
    cached_tokens: int = 0      # of those, reused from this session's KV cache
    generated_tokens: int = 0
    ttft_s: float = 0.0         # request start -> first token sampled
    decode_s: float = 0.0       # first token -> last token
    stop_reason: str = ""       # "stop" | "length" | "cancelled"

    @property
    def prefill_tok_s(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.ttft_s if self.ttft_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s and self.generated_tokens > 1 else 0.0


@dataclass(frozen=True)
class DecodeStep:
    """One session's part of a batched decode step: feed `token` at `pos`, sample the next."""

    session: str
    token: int
    pos: int
    sampler: Sampler
    context: Sequence[int]  # what the repetition penalty looks back over


@dataclass(frozen=True)
class Prefill:
    """One session's part of a step that feeds several tokens: `ids` at pos.., sample the next."""

    session: str
    ids: Sequence[int]
    pos: int
    sampler: Sampler
    context: Sequence[int]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class StageMeter:
    """What one stage did while serving: wall time spent in its calls, tokens through it."""

    seconds: float = 0.0
    tokens: int = 0
    calls: int = 0


class PipelineReset(Exception):
    """The stages were rebuilt (a peer left and the cluster re-planned, or a peer lost a
    session): no session's KV survives; the caller re-prefills what it still needs."""


def _peer_samples(last: StageRunner, sampler: Sampler) -> bool:
    """Whether the last stage samples by itself (a peer: only the id travels back). A sampler
    that needs the logits (`host_only`: a grammar, whose matcher lives on this host; logprobs;
    banned tokens) samples here instead, from the logits the peer sends. That costs a
    vocab-wide reply per token (SmolLM2: 49152 x 4 bytes) for those sessions only."""
    return hasattr(last, "forward_sample") and not sampler.host_only


class Pipeline:
    """Runs token ids through the stages in order; remembers what each session's KV holds."""

    def __init__(self, config: ModelConfig, stages: Sequence[StageRunner], ctx: int):
        self.config = config
        self.stages = list(stages)
        self.ctx = ctx
        self.meters = [StageMeter() for _ in self.stages]
        self._pool: ThreadPoolExecutor | None = None
        self._meter_lock = threading.Lock()  # next_tokens' per-session rows through peers
        self._seen: dict[str, list[int]] = {}  # session -> tokens whose KV the stages hold

    def _timed(self, i: int, tokens: int, call, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            with self._meter_lock:  # next_tokens' threads meter the peers' stages at once
                m = self.meters[i]
                m.seconds += time.perf_counter() - t0
                m.tokens += tokens
                m.calls += 1

    def forward(self, session: str, ids: Sequence[int], pos: int, *, all_logits: bool = False) -> torch.Tensor:
        x: torch.Tensor = torch.tensor([list(ids)], dtype=torch.long)
        for i, stage in enumerate(self.stages):
            x = self._timed(i, len(ids), stage.forward, session, x, pos, all_logits=all_logits)
        return x[0]  # [vocab] or [S, vocab]

    def next_token(self, session: str, ids: Sequence[int], pos: int, sampler: Sampler,
                   context: Sequence[int]) -> int:
        """Run `ids` (at positions pos...) through every stage and sample the next token."""
        last = self.stages[-1]
        if not _peer_samples(last, sampler):
            return sampler(self.forward(session, ids, pos), context)
        x: torch.Tensor = torch.tensor([list(ids)], dtype=torch.long)
        for i, stage in enumerate(self.stages[:-1]):
            x = self._timed(i, len(ids), stage.forward, session, x, pos)
        return self._timed(len(self.stages) - 1, len(ids), last.forward_sample, session, x, pos, sampler, context)

    def next_tokens(self, steps: Sequence[DecodeStep]) -> list[int]:
        """One decode token for each of several sessions that hold their KV: the serving
        loop's batched step. Each session gets the token next_token would give it alone.

        The leading stages that take a batch (`forward_batch`: this machine's) run all
        sessions in one forward. The stages after them (peers, one stream per session) get
        every session's row at once, each on its own thread: while the last peer works on one
        session the one before it already works on the next, so the machines of a pipeline
        are busy together rather than in turn."""
        if not steps:
            return []
        sessions = [s.session for s in steps]
        positions = [s.pos for s in steps]
        x: torch.Tensor = torch.tensor([s.token for s in steps], dtype=torch.long)  # [M]
        batched = 0
        while batched < len(self.stages) and hasattr(self.stages[batched], "forward_batch"):
            x = self._timed(batched, len(steps), self.stages[batched].forward_batch, sessions, x, positions)
            batched += 1
        if batched == len(self.stages):
            return [s.sampler(x[r], s.context) for r, s in enumerate(steps)]
        rows = [x[r:r + 1].view(1, 1) if x.dim() == 1 else x[r:r + 1].unsqueeze(0) for r in range(len(steps))]
        if len(steps) == 1:
            return [self._rest(batched, steps[0], rows[0])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=PIPELINE_THREADS, thread_name_prefix="fastserve-pipeline")
        futures = [self._pool.submit(self._rest, batched, step, row) for step, row in zip(steps, rows)]
        wait(futures)  # every row has left the stages before a failure is raised (and the caller re-plans)
        for future in futures:
            if future.exception() is not None:
                raise future.exception()
        return [future.result() for future in futures]

    def first_tokens(self, prefills: Sequence[Prefill]) -> list[int]:
        """The next token of several sessions that each feed many tokens (the serving loop's
        prefills of one step). Each gets what next_token gives it alone, bit for bit.

        Prompts of at least DENSE_PREFILL_ROWS tokens go through this machine's leading
        stages together (`forward_packed`): each weight is dequantized once for all of them
        and multiplied in one GEMM, instead of once per prompt. A shorter prompt runs alone:
        its few rows take the integer kernel, as they would alone. The stages after them
        (peers) take each session in turn."""
        packs: list[list[int]] = []
        rows = 0  # in the last pack
        if hasattr(self.stages[0], "forward_packed"):
            for i, p in enumerate(prefills):  # greedy: as many as fit in PACKED_PREFILL_ROWS together
                if len(p.ids) < DENSE_PREFILL_ROWS:
                    continue
                if packs and rows + len(p.ids) <= PACKED_PREFILL_ROWS:
                    packs[-1].append(i)
                    rows += len(p.ids)
                else:
                    packs.append([i])
                    rows = len(p.ids)
        out: dict[int, int] = {}
        for pack in (pack for pack in packs if len(pack) > 1):
            out.update(zip(pack, self._packed([prefills[i] for i in pack])))
        for i, p in enumerate(prefills):
            if i not in out:
                out[i] = self.next_token(p.session, p.ids, p.pos, p.sampler, p.context)
        return [out[i] for i in range(len(prefills))]

    def _packed(self, prefills: Sequence[Prefill]) -> list[int]:
        sessions = [p.session for p in prefills]
        positions = [p.pos for p in prefills]
        xs: list[torch.Tensor] = [torch.tensor(list(p.ids), dtype=torch.long) for p in prefills]
        tokens = sum(len(p.ids) for p in prefills)
        lead = 0
        while lead < len(self.stages) and hasattr(self.stages[lead], "forward_packed"):
            xs = self._timed(lead, tokens, self.stages[lead].forward_packed, sessions, xs, positions)
            lead += 1
        if lead == len(self.stages):
            return [p.sampler(logits, p.context) for p, logits in zip(prefills, xs)]
        # the peers: one session after another
        return [self._rest(lead, p, x.unsqueeze(0), len(p.ids)) for p, x in zip(prefills, xs)]

    def _rest(self, first: int, step: DecodeStep | Prefill, x: torch.Tensor, tokens: int = 1) -> int:
        """One session's `tokens` rows x [1, tokens, D] through stages first.. (one at a time),
        then its token."""
        last = len(self.stages) - 1
        for i in range(first, last):
            x = self._timed(i, tokens, self.stages[i].forward, step.session, x, step.pos)
        stage = self.stages[last]
        if _peer_samples(stage, step.sampler):
            return self._timed(last, tokens, stage.forward_sample, step.session, x, step.pos, step.sampler,
                               step.context)
        return step.sampler(self._timed(last, tokens, stage.forward, step.session, x, step.pos).reshape(-1),
                            step.context)

    def close(self) -> None:
        """Stop next_tokens' threads (the stages themselves are their owner's to close)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def drop(self, session: str) -> None:
        self._seen.pop(session, None)
        for stage in self.stages:
            stage.drop(session)

    def fork(self, source: str, copies: Sequence[str]) -> bool:
        """Give each session of `copies` a copy of `source`'s KV on every stage, so that they
        go on from its prompt without a prefill of their own. False when a stage cannot (it
        runs on a peer, which has no such verb): the copies must prefill."""
        if not all(isinstance(stage, LocalStage) for stage in self.stages):
            return False
        for copy in copies:
            if not all(stage.fork(source, copy) for stage in self.stages):
                self.drop(copy)
                return False
        return True

    @property
    def holds_head(self) -> bool:
        """The final norm runs here (every stage is this machine's): final_hidden can work."""
        return all(isinstance(stage, LocalStage) for stage in self.stages)

    def final_hidden(self, ids: Sequence[int]) -> torch.Tensor:
        """Hidden states [S, D] of `ids` (from position 0) after the final norm, where the head
        would take them: what /v1/embeddings pools. Its KV lives only for this call."""
        assert self.holds_head, "final_hidden needs every stage on this machine"
        session = f"hidden-{uuid.uuid4().hex}"
        x: torch.Tensor = torch.tensor([list(ids)], dtype=torch.long)
        try:
            for i, stage in enumerate(self.stages):
                x = self._timed(i, len(ids), stage.forward, session, x, 0, normed=True)
        finally:
            self.drop(session)
        return x[0]

    def generate(self, session: str, prompt: Sequence[int], sampler: Sampler, *, max_tokens: int,
                 stop_ids: frozenset[int] = frozenset(), stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield sampled token ids (a stop token ends the answer and is not yielded).

        Prefill reuses the longest prefix this session already has in its KV cache.
        Stops at a stop token, at max_tokens, or when the context is full.
        """
        stats = stats if stats is not None else GenerationStats()
        if len(prompt) >= self.ctx:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit a context of {self.ctx}")
        started = time.perf_counter()
        seen = self._seen.get(session, [])
        reuse = min(common_prefix(seen, prompt), len(prompt) - 1)  # always run >= 1 token
        reuse = reusable_prefix(self.config, len(seen), reuse)
        stats.prompt_tokens, stats.cached_tokens, stats.stop_reason = len(prompt), reuse, "cancelled"
        self._seen[session] = history = list(prompt[:reuse])
        answer: list[int] = []
        context = list(prompt)  # what the repetition penalty looks back over
        token = self.next_token(session, prompt[reuse:], reuse, sampler, context)
        history.extend(prompt[reuse:])
        first_at = None
        while True:
            if first_at is None:
                first_at = time.perf_counter()
                stats.ttft_s = first_at - started
            if token in stop_ids:
                stats.stop_reason = "stop"
                break
            answer.append(token)
            context.append(token)
            stats.generated_tokens = len(answer)
            stats.decode_s = time.perf_counter() - first_at
            yield token
            if len(answer) >= max_tokens or len(history) + 1 >= self.ctx:
                stats.stop_reason = "length"
                break
            token_in = token
            token = self.next_token(session, [token_in], len(history), sampler, context)
            history.append(token_in)
        stats.decode_s = time.perf_counter() - first_at
