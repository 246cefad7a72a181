"""The token loop behind `fastserve serve`: many requests, one model, one compute thread.

Requests live on the asyncio side; the model computes in ONE worker thread (torch). The loop
asks the scheduler (scheduler.py) which sessions take the next step, runs one token for each
of them in the worker, and hands every token to its request's queue:

    budget = min(max_sessions * ctx, KV room of the tightest stage / 2 - caches' first allocations)   # kv_room()
    batch = sched.next_batch(now, max_batch=max_sessions, kv_budget_tokens=budget)
    drop batch.evict; end batch.oversized ("length")
    worker: the ids in batch.prefill: their prefills packed in one forward; all other ids: one batched decode forward
    sched.on_step(batch, now, step_seconds, each job's seconds); deliver tokens; end finished ones
    a PipelineReset (a peer left, the cluster re-planned): every session re-prefills

Continuous batching: the decode steps of every session in a step run as ONE batched forward
(Pipeline.next_tokens: each weight is read once per step, not once per session), and
sessions join and leave between steps; the step's prefills run before it, packed into one
forward where they can be (Pipeline.first_tokens). Each request is its own pipeline session
(its own KV), dropped when it ends (or kept: the prompt cache below). A failed batched step
runs its sessions again one by one, so that only a session that fails alone ends.

Same arithmetic as `Pipeline.generate`: a fresh session prefills its whole prompt at position
0, then feeds one token at a time, so greedy answers equal `fastserve chat`'s. A session whose
KV the scheduler evicted (MLFQ under KV pressure) re-prefills prompt + answer so far; nothing
it already produced is lost.

Prompt cache (as llama.cpp's server keeps each slot's last prompt, and ollama the last
conversation): a session that ends with "stop" or "length" keeps its KV, up to `prompt_cache`
of them, least recently ended dropped first. A new request whose prompt starts with at least
PROMPT_CACHE_MIN of the same tokens takes that KV over and prefills only the rest: the next
turn of a conversation (clients send the whole history every time) prefills only the new
message, and requests behind one system prompt share it. Kept KV counts against the KV budget
and gives way to live sessions first; a re-plan drops it. The split prefill is the arithmetic
`fastserve chat` uses from its second turn on: the same model, not always the same last bits.

A KV cache never shrinks: one taken over stays allocated for the positions its caches were
grown for (`sized_for`), past what the taker holds. The budget's per-session bound (2 * held +
INITIAL_TOKENS allocated) holds for held >= sized_for - STALE_TAIL, so such a session is
charged that many tokens (`charged`) until it holds more; the budget a step gets is what is
left after those charges (`_unheld`). A kept session is taken over when its stale part is at
most STALE_TAIL tokens (no charge), or when the request may grow to its size anyway (prompt +
max_tokens >= sized_for: a charge that its own answer pays off).

n answers to one prompt (`submit_many`, the API's `n`): the first session prefills alone; the
others wait outside the scheduler until its prefill ran, then get a copy of its KV
(Pipeline.fork, in the worker right after the prefill) and join with the prompt's last token
to feed, as a kept session's taker does: one prefill for all n. Where the stages cannot copy
(a peer holds layers) they are released without KV and prefill themselves.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from fastserve_edge.engine.generate import DecodeStep, Pipeline, PipelineReset, Prefill, common_prefix
from fastserve_edge.engine.kv_cache import INITIAL_TOKENS, kv_bytes_per_token, reusable_prefix
from fastserve_edge.engine.sampling import Sampler, TokenLogprobs
from fastserve_edge.errors import FastServeError
from fastserve_edge.serving.scheduler import Batch, Job, Scheduler, make_scheduler

log = logging.getLogger(__name__)

# seconds; TTFT spans a queued wait plus a prefill, per-token a CPU decode step of a small model
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
KV_GROWTH = 2  # kv_cache.KVCache doubles its capacity as a session grows
PROMPT_CACHE_MIN = 16  # tokens a prompt must share with a kept session to take its KV over (less
                       # saves too little to be worth a kept session another prompt may share more with)
STALE_TAIL = INITIAL_TOKENS // 2  # positions past what a session holds that its caches may be grown for at
                                  # no charge: max(INITIAL, 2 * sized_for) <= 2 * held + INITIAL (see charged)
MAX_RESETS = 3  # re-plans in a row without a good step before the sessions end with an error
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum, count."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, total in zip(self.bounds, itertools.accumulate(self.counts)):
            le = "+Inf" if math.isinf(bound) else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {total}')
        lines += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


@dataclass
class EngineMetrics:
    tokens_generated: int = 0
    decode_steps: int = 0     # batched decode forwards
    decode_rows: int = 0      # session-tokens they carried (rows / steps = the mean batch)
    resets: int = 0           # steps lost to a re-plan (a peer left); their sessions re-prefilled
    prompt_tokens: int = 0    # of every request submitted
    cached_tokens: int = 0    # of those, whose KV a kept session gave (not prefilled again)
    preemptions: int = 0      # a session that ran in one step and waits in the next (MLFQ)
    evictions: int = 0        # KV dropped under the KV budget; the session re-prefills later
    waits: int = 0            # sessions left out of a step, summed over the steps (queued or preempted)
    kv_peak: int = 0          # the most KV held after any step, the prompt cache's included
    sessions_finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    per_token: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))


@dataclass(frozen=True)
class StageReport:
    index: int
    start: int                # layers [start, end)
    end: int
    machine: str
    seconds: float            # wall time spent in this stage's calls (for a peer: network included)
    tokens: int               # tokens that went through it
    calls: int
    kv_bytes: int             # KV the sessions (live and kept) hold on it, by the loop's accounting
    kv_budget_bytes: int      # what all sessions may hold on it (the loop's KV budget)
    kv_allocated_bytes: int | None  # what its caches hold allocated (this machine only)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def charged(held: int, sized_for: int) -> int:
    """KV tokens the budget counts for a session holding `held` tokens in caches grown for
    `sized_for` positions (a cache allocates at most max(INITIAL_TOKENS, 2 * sized_for) and the
    budget allows 2 * counted + INITIAL_TOKENS)."""
    return max(held, sized_for - STALE_TAIL)


@dataclass
class Kept:
    """An ended session's KV in the prompt cache."""

    tokens: list[int]         # what its KV holds, by position
    sized_for: int            # positions its caches were grown for (>= len(tokens))


class EngineClosed(Exception):
    """submit() after shutdown()."""


class QueueFull(Exception):
    """submit() while max_queue sessions already wait beyond the max_sessions that run."""


@dataclass(frozen=True)
class Token:
    id: int
    logprobs: TokenLogprobs | None = None  # when the session's sampler was asked for them


@dataclass(frozen=True)
class Finished:
    reason: str               # "stop" | "length" | "cancelled" | "error"
    message: str = ""         # for "error"


@dataclass(eq=False)
class Session:
    """One request as the loop sees it. `events` receives Token(...) then one Finished(...).
    `id` names it (scheduler, API); `kv` names its KV on the stages: its own, or the KV of an
    ended session it took over from the prompt cache."""

    id: str
    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    stop_ids: frozenset[int]
    arrival: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    answer: list[int] = field(default_factory=list)
    kv: str = ""              # the stages' session key (default: id)
    cached: int = 0           # prompt tokens its first prefill took from a kept session's KV
    last_token_at: float | None = None
    sized_for: int = 0        # positions a taken-over KV's caches were grown for (0: its own KV, grown as it holds)
    done: bool = False
    followers: list[Session] = field(default_factory=list)  # other answers to its prompt, waiting for its prefill
    forked: bool = False      # the worker copied its prompt's KV to the followers

    def __post_init__(self) -> None:
        self.kv = self.kv or self.id

    @property
    def completion_tokens(self) -> int:
        return len(self.answer)


class EngineLoop:
    """Owns the pipeline while serving: nothing else may call it. Start with `start()` inside a
    running event loop, stop with `await close()` (the aiohttp cleanup_ctx does both)."""

    def __init__(self, pipeline: Pipeline, *, max_sessions: int = 4, scheduler: str = "fcfs",
                 threads: int | None = None, kv_room: Callable[[], int] | None = None,
                 prompt_cache: int | None = None, max_queue: int | None = None):
        """kv_room: KV tokens the stages have memory for (asked before every step: a re-plan
        may change it); the budget is the smaller of that and max_sessions full contexts.
        prompt_cache: ended sessions whose KV is kept for later prompts (default max_sessions; 0: none).
        max_queue: sessions that may wait beyond the max_sessions that run (None: no limit);
        submit() raises QueueFull past it."""
        self.pipeline = pipeline
        self.max_sessions = max_sessions
        self.max_queue = max_queue
        self.prompt_cache = max_sessions if prompt_cache is None else prompt_cache
        self._kept: OrderedDict[str, Kept] = OrderedDict()  # ended session's KV key -> what it holds
        self.scheduler_name = scheduler
        self.sched: Scheduler = make_scheduler(scheduler)
        self._kv_room = kv_room
        # a cluster holds a peer stream per session with KV: it bounds how many may hold some
        limit = getattr(pipeline, "max_open_sessions", None)
        self._max_held = None if limit is None else max(limit, max_sessions)
        self.kv_budget_tokens = self._budget()
        self._resets_in_a_row = 0
        self.metrics = EngineMetrics()
        self._threads = threads
        self._sessions: dict[str, Session] = {}
        self._running: tuple[str, ...] = ()  # the last step's batch
        self._wake = asyncio.Event()
        self._closing = False
        self._stepping = False             # a step runs in the worker: KV drops wait for its end
        self._drop_after_step: list[str] = []
        self._task: asyncio.Task | None = None
        self._worker: ThreadPoolExecutor | None = None

    def _budget(self) -> int:
        full = self.max_sessions * self.pipeline.ctx  # what max_sessions full contexts hold
        if self._kv_room is None:
            return full
        # a cache grows by doubling: what it allocates may be twice what it holds, and at least
        # its first allocation (INITIAL_TOKENS) however little it holds: 2 * held + INITIAL_TOKENS
        # per session bounds it. Counted for the sessions with KV now and as many as a step may add.
        holders = len(self._kept) + sum(1 for j in self.sched.jobs() if j.kv_tokens) + self.max_sessions
        first = INITIAL_TOKENS * holders
        return max(self.pipeline.ctx, min(full, (self._kv_room() - first) // KV_GROWTH))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        init, args = (torch.set_num_threads, (self._threads,)) if self._threads else (None, ())
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastserve-engine",
                                          initializer=init, initargs=args)
        self._task = asyncio.create_task(self._run(), name="fastserve-engine-loop")

    def shutdown(self) -> None:
        """End every session now ("error": the server is stopping) and take no new ones, so
        that open streams close instead of holding the shutdown until they finish."""
        self._closing = True
        for s in list(self._sessions.values()):
            self._finish(s, Finished("error", "the server is shutting down"))

    async def close(self) -> None:
        self.shutdown()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # a step in flight finishes; nothing new starts

    # -- what requests call ------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], sampler: Sampler, *, max_tokens: int,
               stop_ids: frozenset[int]) -> Session:
        """Queue one generation. The caller checked that the prompt fits the context."""
        assert 0 < len(prompt) < self.pipeline.ctx and max_tokens >= 1
        if self._closing:
            raise EngineClosed("the server is shutting down")
        if self.queue_full:
            raise QueueFull(f"{self.max_queue} requests already wait for the {self.max_sessions} that run")
        now = time.monotonic()
        max_tokens = min(max_tokens, self.pipeline.ctx - len(prompt))
        kept, reuse = self._take_kept(prompt, max_tokens)
        s = Session(uuid.uuid4().hex, list(prompt), sampler, max_tokens, stop_ids, now,
                    kv=kept[0] if kept else "", sized_for=kept[1].sized_for if kept else 0)
        self._sessions[s.id] = s
        self.metrics.prompt_tokens += len(prompt)
        self.sched.add(Job(s.id, arrival=now, prompt_tokens=len(prompt), max_tokens=s.max_tokens,
                           kv_tokens=reuse), now)
        self._wake.set()
        return s

    def submit_many(self, prompt: Sequence[int], samplers: Sequence[Sampler], *, max_tokens: int,
                    stop_ids: frozenset[int]) -> list[Session]:
        """One session per sampler, all answering `prompt` from one prefill (see the module
        docstring). The first is the leader; the others enter the scheduler after its prefill."""
        assert samplers
        if self.max_queue is not None and len(self._sessions) + len(samplers) > self.max_sessions + self.max_queue:
            raise QueueFull(f"{len(samplers)} answers do not fit the queue of {self.max_queue} besides the "
                            f"{self.max_sessions} that run")
        leader = self.submit(prompt, samplers[0], max_tokens=max_tokens, stop_ids=stop_ids)
        for sampler in samplers[1:]:
            s = Session(uuid.uuid4().hex, list(prompt), sampler, leader.max_tokens, stop_ids, leader.arrival)
            self._sessions[s.id] = s
            self.metrics.prompt_tokens += len(prompt)
            leader.followers.append(s)
        return [leader, *leader.followers]

    def _release(self, leader: Session, now: float) -> None:
        """The leader's prefill ran (or never will): its followers enter the scheduler, with the
        copy of its prompt's KV less the last token, which they feed themselves to draw their
        first token (or with no KV when the stages could not copy)."""
        followers, leader.followers = leader.followers, []
        for s in followers:
            if s.done:
                continue
            reuse = reusable_prefix(self.pipeline.config, len(s.prompt), len(s.prompt) - 1) if leader.forked else 0
            s.sized_for = leader.sized_for if leader.forked else 0  # a copy is as large as the leader's caches
            self.sched.add(Job(s.id, arrival=s.arrival, prompt_tokens=len(s.prompt), max_tokens=s.max_tokens,
                               kv_tokens=reuse), now)
        self._wake.set()

    async def final_hidden(self, ids: Sequence[int]) -> torch.Tensor:
        """The final norm's output [S, D] for `ids` (/v1/embeddings), computed in the worker
        between two steps. The caller checked `pipeline.holds_head` and that ids fit the context."""
        if self._closing:
            raise EngineClosed("the server is shutting down")
        assert self._worker is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.pipeline.final_hidden, list(ids))

    def _take_kept(self, prompt: Sequence[int], max_tokens: int) -> tuple[tuple[str, Kept] | None, int]:
        """The kept session that shares the longest start with `prompt` (at least
        PROMPT_CACHE_MIN tokens; of equal ones the smallest), taken out of the cache: (its KV
        key, itself) and the tokens to reuse. Its caches never shrink, so only one the budget
        can charge for (module docstring): whose KV is at most STALE_TAIL tokens more than the
        shared start, or no larger than this request may grow (prompt + max_tokens). A long
        conversation that shares only a system prompt with a short request stays in the cache
        for its own next turn. Safe during a step: kept sessions take no part in one."""
        best, rank = None, (0, 0)
        for key, kept in self._kept.items():
            n = common_prefix(kept.tokens, prompt)
            free = kept.sized_for - min(n, len(prompt) - 1) <= STALE_TAIL
            if (n, -kept.sized_for) > rank and (free or kept.sized_for <= len(prompt) + max_tokens):
                best, rank = key, (n, -kept.sized_for)
        if best is None:
            return None, 0
        kept = self._kept[best]
        reuse = min(rank[0], len(prompt) - 1)  # the last prompt token always runs: it gives the logits
        reuse = reusable_prefix(self.pipeline.config, len(kept.tokens), reuse)  # sliding-window layers: no rewind
        if reuse < PROMPT_CACHE_MIN:
            return None, 0
        del self._kept[best]
        return (best, kept), reuse

    def cancel(self, session: Session, *, reason: str = "cancelled") -> None:
        """The client went away ("cancelled") or a stop string matched ("stop"): stop
        generating, free the KV. Safe to call at any time, also after the session finished."""
        if not session.done:
            self._finish(session, Finished(reason))

    # -- what /metrics reads -----------------------------------------------------------------

    @property
    def active_sessions(self) -> int:
        """Sessions whose KV the pipeline holds (running or preempted)."""
        return sum(1 for i in self._sessions if i in self.sched and self.sched.job(i).kv_tokens > 0)

    @property
    def queue_full(self) -> bool:
        """submit() would raise QueueFull. Counted over every session held, not the last step's
        batch: a request arriving between two steps must not find a shorter queue."""
        return self.max_queue is not None and len(self._sessions) >= self.max_sessions + self.max_queue

    @property
    def queue_length(self) -> int:
        """Sessions waiting for a step: not in the last step's batch."""
        return sum(1 for i in self._sessions if i not in self._running)

    @property
    def kv_tokens(self) -> int:
        """KV held by the live sessions (running, preempted); kept_tokens is the prompt cache's."""
        return sum(self.sched.job(i).kv_tokens for i in self._sessions if i in self.sched)

    @property
    def kept_sessions(self) -> int:
        return len(self._kept)

    @property
    def kept_tokens(self) -> int:
        return sum(len(k.tokens) for k in list(self._kept.values()))  # a snapshot: submit() may take one meanwhile

    def _kept_charged(self) -> int:
        """What the budget counts for the prompt cache (charged: its caches' size included)."""
        return sum(charged(len(k.tokens), k.sized_for) for k in self._kept.values())

    def _overcharged(self) -> list[tuple[Session, int]]:
        """Live sessions with KV whose taken-over caches are charged beyond it: (session, charge)."""
        out = []
        for s in self._sessions.values():
            if s.sized_for and s.id in self.sched and (held := self.sched.job(s.id).kv_tokens):
                if (extra := charged(held, s.sized_for) - held) > 0:
                    out.append((s, extra))
        return out

    def _unheld(self) -> int:
        """What the budget counts for live sessions beyond the KV they hold: the stale part of
        taken-over caches (charged), until the sessions hold that much."""
        return sum(extra for _, extra in self._overcharged())

    def stage_report(self) -> list[StageReport]:
        """Per stage of the pipeline: where it runs, the time spent in it, and its KV."""
        cfg = self.pipeline.config
        per_token_layer = kv_bytes_per_token(cfg.n_kv_heads, cfg.head_dim)
        held, budget = self.kv_tokens + self.kept_tokens, self.kv_budget_tokens
        out = []
        for i, (stage, meter) in enumerate(zip(self.pipeline.stages, self.pipeline.meters)):
            layers = stage.end - stage.start
            client = getattr(stage, "client", None)
            allocated = stage.kv_bytes() if hasattr(stage, "kv_bytes") else None
            out.append(StageReport(index=i, start=stage.start, end=stage.end,
                                   machine=client.name if client is not None else "this machine",
                                   seconds=meter.seconds, tokens=meter.tokens, calls=meter.calls,
                                   kv_bytes=held * per_token_layer * layers,
                                   kv_budget_bytes=budget * per_token_layer * layers,
                                   kv_allocated_bytes=allocated))
        return out

    def session_report(self, now: float | None = None) -> list[dict]:
        """The sessions the loop holds, highest priority first: for `fastserve status`."""
        now = time.monotonic() if now is None else now
        out = []
        for job in self.sched.jobs():
            s = self._sessions.get(job.id)
            if s is None:
                continue
            state = "running" if job.id in self._running else ("preempted" if job.kv_tokens else "queued")
            out.append({"id": job.id[:12], "state": state, "prompt_tokens": job.prompt_tokens,
                        "generated": len(s.answer), "max_tokens": s.max_tokens, "kv_tokens": job.kv_tokens,
                        "level": job.level, "age_s": round(now - s.arrival, 3)})
        return out

    # -- the loop ----------------------------------------------------------------------------

    def _finish(self, s: Session, event: Finished, *, kv_tokens: int = 0) -> None:
        """kv_tokens: what its KV holds, when it ended at a step's end ("stop", "length"): the
        prompt cache may keep it. Any other end drops the KV."""
        s.done = True
        if s.followers and not self._closing:  # it ended before its prefill: they prefill alone
            s.forked = False
            self._release(s, time.monotonic())
        self.sched.remove(s.id)
        self._sessions.pop(s.id, None)
        # the worker is idle whenever this runs on the loop outside a step, and a session that
        # ends during a step is dropped by the loop after it (see _run): never a race on KV
        if self._stepping:
            self._drop_after_step.append(s.kv)
        elif self.prompt_cache > 0 and kv_tokens >= PROMPT_CACHE_MIN and not self._closing:
            self._kept[s.kv] = Kept((s.prompt + s.answer)[:kv_tokens], max(s.sized_for, kv_tokens))
            self._drop_kept(len(self._kept) - self.prompt_cache)  # the least recently ended first
        else:
            self.pipeline.drop(s.kv)
        self.metrics.sessions_finished[event.reason] = self.metrics.sessions_finished.get(event.reason, 0) + 1
        s.events.put_nowait(event)

    async def _run(self) -> None:
        while True:
            if not self._sessions:
                self._running = ()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._one_step()
            except Exception:  # a bug in the loop ends the sessions it holds, never the server
                log.exception("engine loop step failed; ending %d session(s)", len(self._sessions))
                self._stepping = False
                for s in list(self._sessions.values()):
                    self._finish(s, Finished("error", "the engine failed; the server log has the details"))
                for key in self._drop_after_step:
                    self.pipeline.drop(key)
                self._drop_after_step.clear()
                self._drop_kept(len(self._kept))

    def _drop_kept(self, n: int) -> None:
        """Drop the KV of the n least recently ended kept sessions (outside a step only)."""
        for _ in range(min(n, len(self._kept))):
            key, _tokens = self._kept.popitem(last=False)
            self.pipeline.drop(key)

    def _shed_unheld(self) -> int:
        """Drop the KV of every session charged beyond what it holds (outside a step only):
        they re-prefill into caches of their own, as evicted ones do. -> 0, their charge now."""
        shed = [s for s, _ in self._overcharged()]
        for s in shed:
            self.pipeline.drop(s.kv)
            s.sized_for = 0
        self.sched.lost_kv([s.id for s in shed])
        return 0

    def _trim_kept(self) -> int:
        """Before a step: kept KV gives way to live sessions. It may use what the budget leaves
        once every live session holds its whole context, and a cluster's streams (one per
        session with KV on every peer) go to live sessions first. -> the budget left for what
        the live sessions hold (less what taken-over caches are charged beyond it)."""
        unheld = self._unheld()
        contexts = [j.context for j in self.sched.jobs()]
        if unheld and max(contexts, default=0) > self.kv_budget_tokens - unheld:
            unheld = self._shed_unheld()  # the charge must never make a session too large to run
        live = sum(contexts) + unheld
        while self._kept and self._kept_charged() + live > self.kv_budget_tokens:
            self._drop_kept(1)
        if self._max_held is not None:
            self._drop_kept(len(self._kept) + len(self.sched) - self._max_held)
        return self.kv_budget_tokens - self._kept_charged() - unheld

    async def _one_step(self) -> None:
        loop = asyncio.get_running_loop()
        self.kv_budget_tokens = self._budget()
        budget = self._trim_kept()
        max_held = None if self._max_held is None else max(self.max_sessions, self._max_held - len(self._kept))
        batch = self.sched.next_batch(time.monotonic(), max_batch=self.max_sessions,
                                      kv_budget_tokens=budget, max_held=max_held)
        self.metrics.preemptions += len(batch.preempt)
        self.metrics.evictions += len(batch.evict)
        for sid in batch.evict:
            self.pipeline.drop(self._sessions[sid].kv)
            self._sessions[sid].sized_for = 0  # it re-prefills into caches of its own
        for sid in batch.oversized:
            if sid in self._sessions:
                self._finish(self._sessions[sid], Finished("length"))
        self._running = batch.run
        self.metrics.waits += sum(1 for i in self._sessions if i not in batch.run)
        self.metrics.kv_peak = max(self.metrics.kv_peak, batch.kv_tokens + self.kept_tokens)
        if not batch.run:
            # nothing fits (cannot happen with a budget of max_sessions full contexts)
            await asyncio.sleep(0.01)
            return
        # a prefill reuses the KV the stages hold for it (a kept session's), or rebuilds from 0
        work = [(self._sessions[sid], self.sched.job(sid).kv_tokens if sid in batch.prefill else None)
                for sid in batch.run]
        first_reuse = {sid: self.sched.job(sid).kv_tokens for sid in batch.run
                       if self._sessions[sid].last_token_at is None}  # KV a kept session gave (or 0)
        started = time.monotonic()
        self._stepping = True
        # shielded: on shutdown the step in flight finishes in the worker (close() waits for it)
        results = await asyncio.shield(loop.run_in_executor(self._worker, self._step, work))
        self._stepping = False
        for key in self._drop_after_step:
            self.pipeline.drop(key)
        self._drop_after_step.clear()
        now = time.monotonic()
        if results is None:
            self._reset()
            return
        self._resets_in_a_row = 0
        for (s, _), (token, _, _) in zip(work, results):  # what the prompt cache saved a first step
            if first_reuse.get(s.id) and not isinstance(token, Exception):
                s.cached = first_reuse[s.id]
                self.metrics.cached_tokens += s.cached
        self._account(batch, results, now, now - started)

    def _reset(self) -> None:
        """The pipeline was rebuilt mid-step: no stage holds any session's KV now. The step's
        tokens were never sent, so they are simply not delivered; every session re-prefills
        its prompt and the answer so far on the new pipeline. A cluster that keeps failing
        (MAX_RESETS re-plans without one good step) ends its sessions with the reason."""
        self.metrics.resets += 1
        self._resets_in_a_row += 1
        self._drop_kept(len(self._kept))
        if self._resets_in_a_row >= MAX_RESETS:
            for s in list(self._sessions.values()):
                self._finish(s, Finished("error", f"the cluster was re-planned {MAX_RESETS} times in a row without "
                                                  "a step going through; see the server log and the peers' logs"))
            self._resets_in_a_row = 0
            return
        for s in self._sessions.values():
            s.sized_for = 0
        self.sched.lost_kv([sid for sid in self._sessions if sid in self.sched])

    def _step(self, work: list[tuple[Session, int | None]]) -> list[tuple[int | Exception, float, int]] | None:
        """Worker thread: one token for each session. work: (session, None to decode, or the
        tokens of KV a prefill reuses). -> (token or error, seconds, tokens fed), or None when
        the pipeline was rebuilt during the step (PipelineReset).

        The step's prefills run first (Pipeline.first_tokens: prompts long enough to take the
        GEMM path share one packed forward), then the decode steps of all other sessions as
        one batched forward (Pipeline.next_tokens)."""
        out: dict[str, tuple[int | Exception, float, int]] = {}
        decode = [s for s, reuse in work if reuse is None]
        prefills: list[Prefill] = []
        prefilled: list[Session] = []
        for s, reuse in work:
            if reuse is None:
                continue
            prefilled.append(s)
            if reuse == 0:
                self.pipeline.drop(s.kv)  # new, or evicted: rebuild from position 0
            context = s.prompt + s.answer  # what the repetition penalty looks back over
            prefills.append(Prefill(s.kv, context[reuse:], reuse, s.sampler, context))
        if prefills:
            t0 = time.perf_counter()
            try:
                firsts: list[int | Exception] = list(self.pipeline.first_tokens(prefills))
            except PipelineReset:
                return None
            except FastServeError as err:  # the cluster itself cannot go on (no machines left): no retry
                firsts = [err] * len(prefills)
            except Exception:
                alone = self._each_alone("packed prefill", prefills)
                if alone is None:
                    return None
                firsts = alone
            self._fork(prefilled, firsts)
            seconds = time.perf_counter() - t0
            fed = sum(len(p.ids) for p in prefills)
            for p, token in zip(prefills, firsts):  # each is charged its share of the prefill time
                out[p.session] = (token, seconds * len(p.ids) / fed, len(p.ids))
        if decode:
            t0 = time.perf_counter()
            # the newest token: the answer's, or the prompt's last when a kept session held all the rest
            steps = [DecodeStep(s.kv, context[-1], len(context) - 1, s.sampler, context)
                     for s in decode for context in [s.prompt + s.answer]]
            try:
                tokens: list[int | Exception] = list(self.pipeline.next_tokens(steps))
            except PipelineReset:
                return None
            except FastServeError as err:
                tokens = [err] * len(decode)
            except Exception:
                alone = self._each_alone("batched decode step",
                                         [Prefill(d.session, [d.token], d.pos, d.sampler, d.context) for d in steps])
                if alone is None:
                    return None
                tokens = alone
            self._fork(decode, tokens)  # a leader whose kept KV held all but its prompt's last token
            seconds = time.perf_counter() - t0
            self.metrics.decode_steps += 1
            self.metrics.decode_rows += len(decode)
            for s, token in zip(decode, tokens):
                out[s.kv] = (token, seconds, 1)
        return [out[s.kv] for s, _ in work]

    def _fork(self, sessions: list[Session], tokens: list[int | Exception]) -> None:
        """Worker: n answers; copy each leader's prompt KV to its followers right after its first step."""
        for s, token in zip(sessions, tokens):
            if s.followers and not isinstance(token, Exception):
                s.forked = self.pipeline.fork(s.kv, [f.kv for f in s.followers if not f.done])

    def _each_alone(self, what: str, feeds: list[Prefill]) -> list[int | Exception] | None:
        """A batched call just failed (called in its except clause): run each session alone,
        so that only one that fails again ends (a bug, an exhausted resource; the log says
        which). None: the pipeline was rebuilt meanwhile (PipelineReset)."""
        log.exception("%s of %d session(s) failed; running them one by one", what, len(feeds))
        out: list[int | Exception] = []
        for p in feeds:
            try:
                out.append(self.pipeline.next_token(p.session, p.ids, p.pos, p.sampler, p.context))
            except PipelineReset:
                return None
            except Exception as err:
                log.exception("%s failed for session %s", what, p.session)
                out.append(err)
        return out

    def _account(self, batch: Batch, results: list, now: float, step_s: float) -> None:
        observe_prefill = getattr(self.sched, "observe_prefill", None)
        jobs = {sid: self.sched.job(sid) for sid in batch.run if sid in self.sched}  # on_step drops finished ones
        ended: list[tuple[Session, Finished]] = []
        for sid, (token, seconds, fed) in zip(batch.run, results):
            s = self._sessions.get(sid)
            if s is None or s.done:  # cancelled while the step ran
                continue
            if isinstance(token, Exception):
                ended.append((s, Finished("error", f"generation failed: {type(token).__name__}: {token}")))
                continue
            if fed > 1 and observe_prefill is not None:
                observe_prefill(fed, seconds)
            if s.last_token_at is None:
                self.metrics.ttft.observe(now - s.arrival)
            else:
                self.metrics.per_token.observe(now - s.last_token_at)
            s.last_token_at = now
            if token in s.stop_ids:
                ended.append((s, Finished("stop")))
                continue
            s.answer.append(token)
            s.sampler.accept(token)  # a grammar advances only past delivered tokens
            self.metrics.tokens_generated += 1
            s.events.put_nowait(Token(token, s.sampler.last))
            s.sampler.last = None
        charged = {sid: seconds for sid, (_, seconds, _) in zip(batch.run, results)}  # its prefill, or the shared decode
        reached = set(self.sched.on_step(batch, now, step_s, charged))
        for sid in batch.run:
            s = self._sessions.get(sid)
            if s is not None and s.followers:
                self._release(s, now)
        for s, event in ended:  # on_step counted what the step fed: the KV a stop leaves
            held = jobs[s.id].kv_tokens if event.reason == "stop" and s.id in jobs else 0
            self._finish(s, event, kv_tokens=held)
        for sid in reached:
            s = self._sessions.get(sid)
            if s is not None and not s.done:
                self._finish(s, Finished("length"), kv_tokens=jobs[sid].kv_tokens)


def kv_room(pipeline: Pipeline, *, local: bool, cap: int | None, free_now: int) -> Callable[[], int]:
    """What bounds the KV of all sessions, in tokens: on this machine alone, the memory free
    once the weights are in (or --kv-memory); over a cluster, the tightest stage of the plan
    (asked again after a re-plan), and --kv-memory on every machine."""
    cfg = pipeline.config
    per_layer = kv_bytes_per_token(cfg.n_kv_heads, cfg.head_dim)

    def cap_tokens() -> int | None:
        widest = max((s.end - s.start for s in pipeline.stages), default=0) or 1
        return None if cap is None else cap // (per_layer * widest)

    if local:
        room = (cap if cap is not None else free_now) // (per_layer * cfg.n_layers)
        return lambda: room

    def room() -> int:
        tokens = pipeline.kv_room_tokens()
        limit = cap_tokens()
        return tokens if limit is None else min(tokens, limit)

    return room
