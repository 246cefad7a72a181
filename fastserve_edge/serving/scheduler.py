"""Which sessions take the next step of the continuous-batching token loop: a pure module.

No torch, no asyncio, no I/O, no clock of its own: the caller passes `now` (seconds, real or
simulated) and the measured duration of every step, so a test drives it with a fake clock.

The loop the serving layer runs:

    sched.add(Job(id, arrival=now, prompt_tokens=n, max_tokens=m), now)   # on each request
    batch = sched.next_batch(now, max_batch=B, kv_budget_tokens=T)
    # drop the KV of batch.evict on every stage; (re)prefill batch.prefill; one batched
    # forward for batch.run; end batch.oversized with finish_reason "length"
    finished = sched.on_step(batch, now, step_seconds)   # now: the step's end; -> reached max_tokens
    sched.remove(job_id)                                 # stop token, or the client went away
    sched.lost_kv(job_ids)                               # the pipeline was rebuilt: they re-prefill

KV accounting, in tokens (the same count on every stage, each stage holding its own layers).
The step that produces a job's token g+1 feeds its context, `prompt_tokens + generated`
tokens, so that is the KV it holds once the step ran (`Job.context`): the first step is the
prefill, each later one adds one token, and a job whose KV was evicted feeds its whole
context again (a re-prefill; the tokens it produced are never lost, they are fed back in).
`kv_budget_tokens` bounds the KV held by all jobs together after every step; a job is never
started or continued when that would go over, it waits instead.

Two policies share that accounting:

- `FCFS`: first come first served. The earliest `max_batch` jobs run until they finish; a
  job that does not fit in KV memory waits, and so does every job behind it (no job passes
  an earlier one). The only displacement is forced by memory: when the running jobs' KV
  grows past the budget, the latest of them is evicted and re-prefills later.
- `MLFQ`: FastServe's skip-join multi-level feedback queue (Wu et al. 2023, "Fast
  Distributed Inference Serving for Large Language Models"). K queues, quantum
  q_i = base_quantum_s * 2**i. A new job joins the highest queue whose quantum covers its
  estimated prefill time ((prompt_tokens - kv_tokens) * prefill_s_per_token: a job may arrive
  with KV, the serving loop's prompt cache), so a long prompt does not
  spend its first quanta only to be demoted. The time of its own part of each step counts
  against its queue's quantum (its prefill, or the batched decode forward every decoding
  member shares); using it up demotes the job one queue. Every step picks the highest-priority jobs afresh
  (preemption at token granularity); within a queue, earliest arrival first. A job that
  has waited longer than `starvation_s` since it last ran goes back to the top queue.
  Preempted jobs keep their KV while the budget allows; a job that needs room takes it
  from the lowest-priority jobs that are not running (`Batch.evict`), never from a job
  ahead of it. A job that cannot get room this way waits, and lower-priority jobs that
  still fit run in its place.

Progress: the highest-priority job can always evict everyone behind it, so unless it is
oversized (its context alone exceeds the budget) every step produces at least one token;
with no new arrivals every job finishes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fastserve_edge.errors import ConfigError

SCHEDULERS = ("fcfs", "mlfq")
PREFILL_EMA = 0.25  # weight of a new measurement in observe_prefill: steady, yet follows a slower cluster within a few prompts


@dataclass(eq=False)
class Job:
    """One request. The scheduler owns it after `add` and updates the fields below the line."""

    id: str
    arrival: float              # s, same clock as `now`; orders jobs within a queue
    prompt_tokens: int          # tokens of the (templated) prompt
    max_tokens: int             # generation stops here at the latest
    generated: int = 0          # tokens produced so far; never lost (a re-prefill feeds them back)
    kv_tokens: int = 0          # tokens whose KV the stages hold; 0 = none yet, or evicted
    # -- scheduler state ----------------------------------------------------------------------
    level: int = 0              # MLFQ queue, 0 = highest priority (FCFS leaves it at 0)
    level_service: float = 0.0  # s of step time used against the current queue's quantum
    service: float = 0.0        # s of step time in total
    waiting_since: float = 0.0  # clock when it joined or last ran: the starvation timer
    seq: int = field(default=0, repr=False)  # add order: breaks ties between equal arrivals

    @property
    def context(self) -> int:
        """Tokens the next step feeds through the model, i.e. the KV held after it."""
        return self.prompt_tokens + self.generated

    @property
    def needs_prefill(self) -> bool:
        """The next step is a (re)prefill: no KV held for anything but the newest token."""
        return self.kv_tokens == 0 or self.context - self.kv_tokens > 1


@dataclass(frozen=True)
class Batch:
    """One step's decisions. Ids, highest priority first within each field."""

    run: tuple[str, ...] = ()        # take one step now (<= max_batch, each id once)
    prefill: tuple[str, ...] = ()    # the part of `run` that feeds its whole context (new or evicted)
    preempt: tuple[str, ...] = ()    # ran in the previous step, wait now; keep their KV unless evicted
    evict: tuple[str, ...] = ()      # drop their KV on every stage now (their kv_tokens is already 0)
    oversized: tuple[str, ...] = ()  # their context alone is over the budget: end them ("length")
    kv_tokens: int = 0               # KV held by all jobs once this step ran (<= kv_budget_tokens)


class Scheduler(Protocol):
    def add(self, job: Job, now: float) -> None: ...
    def remove(self, job_id: str) -> None: ...
    def next_batch(self, now: float, *, max_batch: int, kv_budget_tokens: int,
                   max_held: int | None = None) -> Batch: ...
    def on_step(self, batch: Batch, now: float, step_seconds: float,
                job_seconds: Mapping[str, float] | None = None) -> tuple[str, ...]: ...
    def job(self, job_id: str) -> Job: ...
    def lost_kv(self, job_ids: Iterable[str]) -> None: ...
    def __len__(self) -> int: ...


class _Base:
    """Book-keeping both policies share; a policy supplies the priority order."""

    strict = False  # True: a job that does not fit blocks every job behind it (no passing)

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._seq = 0
        self._ran: tuple[str, ...] = ()  # run ids of the last step accounted by on_step

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def job(self, job_id: str) -> Job:
        return self._jobs[job_id]

    def jobs(self) -> list[Job]:
        """All jobs, highest priority first."""
        return self._order()

    def add(self, job: Job, now: float) -> None:
        if job.id in self._jobs:
            raise ValueError(f"scheduler: job {job.id!r} added twice")
        if job.prompt_tokens < 1 or not 0 <= job.generated < job.max_tokens or not 0 <= job.kv_tokens < job.context:
            raise ValueError(f"scheduler: job {job.id!r} needs prompt_tokens >= 1, 0 <= generated < max_tokens "
                             "and 0 <= kv_tokens < prompt_tokens + generated")
        job.seq, self._seq = self._seq, self._seq + 1
        job.waiting_since = now
        job.level, job.level_service = self._join_level(job), 0.0
        self._jobs[job.id] = job

    def lost_kv(self, job_ids: Iterable[str]) -> None:
        """The stages no longer hold these jobs' KV (the pipeline was rebuilt): their next
        step is a re-prefill of everything they produced so far."""
        for job_id in job_ids:
            self._jobs[job_id].kv_tokens = 0

    def remove(self, job_id: str) -> None:
        """Forget a job (finished, or its client went away). Unknown ids are ignored: a
        disconnect can race with the step that finished the job."""
        self._jobs.pop(job_id, None)

    def next_batch(self, now: float, *, max_batch: int, kv_budget_tokens: int,
                   max_held: int | None = None) -> Batch:
        """max_held: at most this many jobs hold KV after the step (a cluster keeps one peer
        stream open per such job); a new job takes the place of the lowest-priority one."""
        if max_batch < 1 or kv_budget_tokens < 0 or (max_held is not None and max_held < max_batch):
            raise ValueError(f"scheduler: max_batch {max_batch} must be >= 1, kv_budget_tokens {kv_budget_tokens} "
                             f">= 0 and max_held {max_held} >= max_batch")
        self._before_pick(now)
        order = self._order()
        held = sum(j.kv_tokens for j in order)
        evicted: list[Job] = []

        def evict(victims: Iterable[Job]) -> int:
            freed = 0
            for v in victims:
                freed += v.kv_tokens
                v.kv_tokens = 0
                evicted.append(v)
            return freed

        # a job whose context alone is over the budget can never run: its KV goes first
        oversized = [j for j in order if j.context > kv_budget_tokens]
        held -= evict(j for j in oversized if j.kv_tokens)
        skip = {j.id for j in oversized}
        # the budget may have shrunk since the last step: shed the lowest-priority KV first
        for j in reversed(order):
            if held <= kv_budget_tokens:
                break
            if j.kv_tokens:
                held -= evict([j])

        run: list[Job] = []
        for i, j in enumerate(order):
            if len(run) == max_batch:
                break
            if j.id in skip:
                continue
            if j.kv_tokens == 0 and j in evicted:  # evicting and re-prefilling in one step would only churn
                if self.strict:
                    break
                continue
            if max_held is not None and j.kv_tokens == 0 and sum(1 for o in order if o.kv_tokens) >= max_held:
                victim = next((v for v in reversed(order[i + 1:]) if v.kv_tokens), None)
                if victim is None:
                    if self.strict:
                        break
                    continue
                held -= evict([victim])
            extra = j.context - j.kv_tokens
            if held + extra > kv_budget_tokens:
                # room comes from behind: the lowest-priority jobs not running that hold KV
                victims, short = [], held + extra - kv_budget_tokens
                for v in reversed(order[i + 1:]):
                    if short <= 0:
                        break
                    if v.kv_tokens:
                        victims.append(v)
                        short -= v.kv_tokens
                if short > 0:
                    if self.strict:
                        break
                    continue
                held -= evict(victims)
            held += extra
            run.append(j)

        run_ids = tuple(j.id for j in run)
        assert held <= kv_budget_tokens and len(set(run_ids)) == len(run_ids) <= max_batch
        return Batch(
            run=run_ids,
            prefill=tuple(j.id for j in run if j.needs_prefill),
            preempt=tuple(i for i in self._ran if i in self._jobs and i not in run_ids),
            evict=tuple(j.id for j in evicted),
            oversized=tuple(j.id for j in oversized),
            kv_tokens=held,
        )

    def on_step(self, batch: Batch, now: float, step_seconds: float,
                job_seconds: Mapping[str, float] | None = None) -> tuple[str, ...]:
        """Account the step `batch` describes, which ended at `now` and took `step_seconds`.
        Each job in it produced one token and is charged its own part of the step,
        `job_seconds[id]` (its prefill, or the batched decode forward it shared), or the whole
        step where that is not given: a short chat that decodes beside another's long prefill
        is not charged that prefill. Returns the jobs that reached max_tokens; they are
        removed. Jobs removed since next_batch are skipped."""
        if step_seconds < 0 or (job_seconds is not None and any(v < 0 for v in job_seconds.values())):
            raise ValueError(f"scheduler: step_seconds {step_seconds} (and every job's seconds) must be >= 0")
        finished = []
        for job_id in batch.run:
            j = self._jobs.get(job_id)
            if j is None:
                continue
            charged = job_seconds.get(job_id, step_seconds) if job_seconds is not None else step_seconds
            j.kv_tokens = j.context
            j.generated += 1
            j.service += charged
            j.level_service += charged
            j.waiting_since = now
            self._after_step(j)
            if j.generated >= j.max_tokens:
                finished.append(job_id)
                del self._jobs[job_id]
        self._ran = batch.run
        return tuple(finished)

    # -- the policy ---------------------------------------------------------------------------

    def _order(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: (j.level, j.arrival, j.seq))

    def _join_level(self, job: Job) -> int:
        return 0

    def _before_pick(self, now: float) -> None:
        pass

    def _after_step(self, job: Job) -> None:
        pass


class FCFS(_Base):
    """First come first served, up to max_batch at a time; a later job never passes an
    earlier one. The baseline the issue measures MLFQ against."""

    strict = True


class MLFQ(_Base):
    """FastServe's skip-join multi-level feedback queue (see the module docstring).

    `prefill_s_per_token` is the estimate skip-join uses; the caller sets it, or feeds it
    measurements through `observe_prefill`.
    """

    def __init__(
        self,
        *,
        # Defaults from a simulated sweep (bench/serve.py's mix: 70% short chats, 30% long answers
        # with long prompts; a SmolLM2-sized step cost, batches of 1-4): skip-join then puts long
        # prompts into the last queue and short chats three queues above it, which is where the
        # gain comes from; a 0.25 s base or 8+ queues let demoted short chats sink to the long
        # answers' queues, and a 10 s starvation limit brought old long answers back on top.
        levels: int = 6,                   # quanta base .. base * 16, then the last queue
        base_quantum_s: float = 0.05,      # about three decode steps of a small model on a CPU
        starvation_s: float = 30.0,        # no one waits longer than this for a token (plus one step)
        prefill_s_per_token: float = 2e-3, # a first guess for a small model on a CPU; measure it
    ) -> None:
        if levels < 1 or not base_quantum_s > 0 or not starvation_s > 0 or not prefill_s_per_token >= 0:
            raise ConfigError(
                f"mlfq scheduler: levels ({levels}) must be >= 1, base_quantum_s ({base_quantum_s}) and "
                f"starvation_s ({starvation_s}) > 0, prefill_s_per_token ({prefill_s_per_token}) >= 0; "
                "fix the [serve] settings or flags"
            )
        super().__init__()
        self.levels = levels
        self.base_quantum_s = base_quantum_s
        self.starvation_s = starvation_s
        self.prefill_s_per_token = prefill_s_per_token

    def quantum(self, level: int) -> float:
        """Step time a job may use in queue `level`; the last queue keeps its jobs."""
        return math.inf if level >= self.levels - 1 else self.base_quantum_s * 2**level

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Fold a measured prefill (tokens fed, wall time) into the per-token estimate."""
        if tokens > 0 and seconds >= 0:
            self.prefill_s_per_token += PREFILL_EMA * (seconds / tokens - self.prefill_s_per_token)

    def _join_level(self, job: Job) -> int:
        estimate = (job.context - job.kv_tokens) * self.prefill_s_per_token  # a prompt-cache hit prefills less
        for level in range(self.levels - 1):
            if estimate <= self.base_quantum_s * 2**level:
                return level
        return self.levels - 1

    def _before_pick(self, now: float) -> None:
        for j in self._jobs.values():
            if j.level > 0 and now - j.waiting_since > self.starvation_s:
                j.level, j.level_service = 0, 0.0

    def _after_step(self, job: Job) -> None:
        if job.level_service >= self.quantum(job.level):
            job.level, job.level_service = job.level + 1, 0.0


def make_scheduler(name: str, **options) -> Scheduler:
    """`--scheduler fcfs|mlfq` -> a scheduler; MLFQ takes its keyword settings, FCFS none."""
    key = name.strip().lower()
    if key not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)} (--scheduler)")
    if key == "fcfs":
        if options:
            raise ConfigError(f"the fcfs scheduler takes no settings, got: {', '.join(sorted(options))}; "
                              "drop them or use --scheduler mlfq")
        return FCFS()
    allowed = {"levels", "base_quantum_s", "starvation_s", "prefill_s_per_token"}
    if unknown := sorted(set(options) - allowed):
        raise ConfigError(f"unknown mlfq scheduler setting(s): {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(allowed))}")
    return MLFQ(**options)
