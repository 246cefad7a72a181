"""Load on `fastserve serve`: aggregate tokens/s by concurrent sessions, and fcfs against mlfq.

    python bench/serve.py                               # both phases: 1,4,8,16 sessions x 30 s; fcfs vs mlfq
    python bench/serve.py --sessions 1,8 --duration 60  # the concurrency goal only, longer windows
    python bench/serve.py --phases scheduler --rate 1.5 --requests 80 --seed 7
    sudo python bench/serve.py --cluster                # the same against `serve` on the 2-peer namespace LAN
    python bench/serve.py --report bench/results/serve-<timestamp>.json   # the tables again; measures nothing

Every run starts the real server, `fastserve serve --host 127.0.0.1 --port 0 --max-sessions N
--scheduler S` (+ --local-only on one machine: it never looks for peers),
waits for its `serving NAME on URL` line, drives it with a load generator (this
same file in `_client` mode: aiohttp, streaming `POST /v1/chat/completions` at temperature 0 with
`stream_options.include_usage`), and stops it with SIGTERM. Per request the client records when
it arrived, its first content token, its `data: [DONE]`, and the prompt and completion tokens
of the usage chunk; every figure below comes from those raw records (in the JSON too).

- concurrency: a closed loop of C sessions (--sessions, default 1,4,8,16), each sending
  back-to-back requests of one medium shape (a ~60-token prompt asking for a long story,
  max_tokens 64) for --duration seconds, after one warm-up round of C small requests; the
  server runs with --max-sessions C and fcfs. Aggregate tokens/s = completion tokens of every
  timed request / (first send -> last completion; requests in flight at the deadline finish).
  Goal (issue): 8 sessions give >= 4x the aggregate tokens/s of 1.
- scheduler: an open loop, --requests Poisson arrivals at --rate per second, drawn with --seed
  from a mix: 70% short chats (a one-line question, max_tokens 16-48) and 30% long answers (a
  passage of 40-260 words to continue, max_tokens 128-256). The same arrivals and requests
  go to a server with --scheduler fcfs and to one with mlfq, both with --max-sessions (4).
  JCT = arrival -> last token ([DONE]); TTFT = arrival -> first content token. Goals: mlfq
  cuts the mean JCT by >= 1.5x against fcfs, and its p99 JCT is at most 1.10x fcfs's.

Temperature 0 means the model may end an answer before max_tokens (its end-of-turn token):
prompts ask for long answers where the shape should be long, max_tokens caps them, and the
tables report the tokens actually generated. p99 interpolates between order statistics
(numpy's default): with 40 requests it sits close to the maximum.

--cluster needs root: it builds tests/netns.py's LAN (namespaces m0, m1, m2 on a bridge, every
eth0 shaped to 1 Gbit/s as bench/cluster.py does), runs `fastserve join --token T` in m1 and
m2, `fastserve serve MODEL --token T --peers 2 --host 127.0.0.1 ...` in m0, and the client in
m0 too (`ip netns exec`: the server listens on m0's loopback).

Noise: before each run the driver waits (--quiet-wait) until the rest of the machine uses
under 10% of a core, and counts what it used during the run (/proc/stat minus the server's,
peers' and client's CPU): a disturbed run is marked * (not repeated: runs are long).

Results: Rich tables and a markdown copy on stdout, JSON in --json-out (default
bench/results/serve-<timestamp>.json, gitignored), rewritten after every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/serve.py`: bench.* and tests.netns live beside it
    sys.path.insert(0, str(REPO))

from bench.cluster import (  # noqa: E402  (stdlib-only helpers of the cluster benchmark)
    FASTSERVE,
    PASSAGE,
    PORT,
    Peer,
    _children_cpu_s,
    _Lines,
    _proc_cpu_s,
    _self_cpu_s,
    _stop,
    child_env,
    start_peer,
    stop_peer,
    unavailable,
)
from bench.vs_llamacpp import (  # noqa: E402
    NOISE_SHARE,
    BenchError,
    _git,
    _machine_cpu_s,
    _rate,
    markdown,
    progress,
    smollm2_path,
    wait_for_quiet,
)

PHASES = ("concurrency", "scheduler")
SCHEDULERS = ("fcfs", "mlfq")
CONCURRENCY_GOAL_SESSIONS = 8
CONCURRENCY_GOAL_RATIO = 4.0   # aggregate tok/s at 8 sessions / at 1
MEAN_JCT_GOAL = 1.5            # fcfs mean JCT / mlfq mean JCT, at least
P99_JCT_GOAL = 1.10            # mlfq p99 JCT / fcfs p99 JCT, at most
LINK_RATE = "1gbit"            # --cluster: tc tbf rate of every link, as bench/cluster.py's default
CLUSTER_PEERS = 2
SERVING = re.compile(r"^serving (\S+) on (http://\S+/v1)\s*$")

# The medium shape of the concurrency phase: about 30 words + the chat template's ~30 tokens.
# Every request of a run asks for another story (topic x hero: 64 prompts), so the server's
# prompt cache finds what real traffic shares (the template's system prompt, the opening
# words), never a whole prompt it has seen before.
MEDIUM_MAX_TOKENS = 64
MEDIUM_PROMPT = ("Write a long, detailed story about {topic}, whose hero is called {hero}. Describe the places, "
                 "the people and what they say to each other, and do not stop early.")
TOPICS = ("a lighthouse keeper", "a dragon who learns to cook", "a lost robot", "two rival bakers",
          "a city under the sea", "a clockmaker's apprentice", "a night train", "a garden on the moon")
HEROES = ("Ada", "Bruno", "Chioma", "Dmitri", "Elena", "Farid", "Grace", "Hiro")
WARMUP_MAX_TOKENS = 8

# The mixed workload of the scheduler phase.
LONG_SHARE = 0.30
SHORT_MAX_TOKENS = (16, 48)
LONG_MAX_TOKENS = (128, 256)
LONG_PROMPT_WORDS = (40, 260)  # of PASSAGE (cycled): roughly 1.3 tokens a word, + the instruction and template
LONG_INSTRUCTION = "Continue the following story in detail. Write at least five long paragraphs.\n\n"
SHORT_PROMPTS = (
    "Say hi.", "What is the capital of France?", "Give me a synonym for happy.", "How many days are in a week?",
    "Name a yellow fruit.", "What colour is the sky on a clear day?", "Translate 'thank you' into Spanish.",
    "What is 12 plus 30?", "Suggest a name for a cat.", "Is a tomato a fruit or a vegetable?",
    "What do bees make?", "Recommend one book to read on a train.",
)


# ---------------------------------------------------------------- records (client and driver share them)


@dataclass(frozen=True)
class RequestSpec:
    kind: str                # "medium" | "short" | "long" | "warmup"
    prompt: str
    max_tokens: int
    at_s: float = 0.0        # open loop: arrival, s after the client's start; closed loop: unused


@dataclass
class Record:
    """One request as the client saw it; times in s since the client's timed start."""

    kind: str
    max_tokens: int
    arrival_s: float                      # open loop: the scheduled arrival; closed loop: when it was sent
    session: int | None = None            # closed loop: which session sent it
    sent_s: float | None = None
    first_token_s: float | None = None    # first chunk with non-empty content
    done_s: float | None = None           # `data: [DONE]`
    prompt_tokens: int | None = None      # from the usage chunk
    cached_tokens: int | None = None      # of those, from the server's prompt cache (usage.prompt_tokens_details)
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None

    @property
    def ttft_s(self) -> float | None:
        return self.first_token_s - self.arrival_s if self.first_token_s is not None else None

    @property
    def jct_s(self) -> float | None:
        return self.done_s - self.arrival_s if self.done_s is not None else None


# ---------------------------------------------------------------- the client (`_client` mode, inside m0 for --cluster)


async def send(http, url: str, model: str, spec: RequestSpec, clock, record: Record) -> Record:
    """One streaming chat completion; fills `record` from the SSE events."""
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": spec.prompt}], "stream": True,
            "temperature": 0, "max_tokens": spec.max_tokens, "stream_options": {"include_usage": True}}
    record.sent_s = clock()
    try:
        async with http.post(f"{url}/chat/completions", json=body) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return record
            async for raw in resp.content:  # one SSE line at a time
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    record.done_s = clock()
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = f"error event: {event['error'].get('message')}"
                    continue
                for choice in event.get("choices") or ():
                    if record.first_token_s is None and (choice.get("delta") or {}).get("content"):
                        record.first_token_s = clock()
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                if usage := event.get("usage"):
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    record.completion_tokens = usage.get("completion_tokens")
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as err:
        record.error = f"{type(err).__name__}: {err}"
    if record.error is None and record.done_s is None:
        record.error = "the stream ended without data: [DONE]"
    return record


async def server_counters(http, url: str) -> dict[str, float]:
    """The unlabelled samples of GET /metrics (tokens, preemptions, evictions, gauges)."""
    import aiohttp

    root = url.removesuffix("/v1")
    try:
        async with http.get(f"{root}/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):  # extra information, never a reason to fail a run
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def warm_up(http, url: str, model: str, n: int) -> None:
    """n small requests at once: the batched path warm before anything is timed."""
    specs = [RequestSpec("warmup", SHORT_PROMPTS[i % len(SHORT_PROMPTS)], WARMUP_MAX_TOKENS) for i in range(n)]
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    done = await asyncio.gather(*(send(http, url, model, s, clock, Record(s.kind, s.max_tokens, 0.0)) for s in specs))
    if failed := [r.error for r in done if r.error]:
        raise BenchError(f"the warm-up request failed: {failed[0]}")


async def closed_loop(http, url: str, model: str, *, sessions: int, duration_s: float, clock) -> list[Record]:
    """`sessions` sessions sending medium requests back to back until `duration_s`; the ones
    in flight at the deadline finish and count."""
    records: list[Record] = []

    async def session(i: int) -> None:
        n = 0
        while clock() < duration_s:
            k = i + n * sessions  # this request's number in the run: another story every time
            topic, hero = TOPICS[k % len(TOPICS)], HEROES[k // len(TOPICS) % len(HEROES)]
            spec = RequestSpec("medium", MEDIUM_PROMPT.format(topic=topic, hero=hero), MEDIUM_MAX_TOKENS)
            record = Record(spec.kind, spec.max_tokens, arrival_s=clock(), session=i)
            records.append(await send(http, url, model, spec, clock, record))
            n += 1
            if record.error:  # the server is in trouble: do not hammer it
                return

    await asyncio.gather(*(session(i) for i in range(sessions)))
    return records


async def open_loop(http, url: str, model: str, *, specs: list[RequestSpec], clock) -> list[Record]:
    """Each request sent at its arrival time, whatever the server is doing."""

    async def arrive(spec: RequestSpec) -> Record:
        await asyncio.sleep(max(0.0, spec.at_s - clock()))
        return await send(http, url, model, spec, clock, Record(spec.kind, spec.max_tokens, arrival_s=spec.at_s))

    return list(await asyncio.gather(*(arrive(s) for s in specs)))


async def client(job: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url, model = job["url"], job["model"]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=job["timeout_s"])
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        await warm_up(http, url, model, job["warmup"])
        before = await server_counters(http, url)
        t0 = time.perf_counter()
        clock = lambda: time.perf_counter() - t0  # noqa: E731
        if job["mode"] == "closed":
            records = await closed_loop(http, url, model, sessions=job["sessions"], duration_s=job["duration_s"],
                                        clock=clock)
        else:
            specs = [RequestSpec(**s) for s in job["requests"]]
            records = await open_loop(http, url, model, specs=specs, clock=clock)
        wall = clock()
        after = await server_counters(http, url)
    counters = {k: v - before.get(k, 0.0) for k, v in after.items() if k.endswith("_total")}
    return {"records": [asdict(r) for r in records], "wall_s": wall, "counters": counters,
            "gauges_after": {k: v for k, v in after.items() if not k.endswith("_total")}}


def client_main() -> None:
    """`_client`: a job as JSON on stdin; one JSON object on the last line of stdout."""
    print(json.dumps(asyncio.run(client(json.load(sys.stdin)))), flush=True)


# ---------------------------------------------------------------- workloads


def mixed_workload(n: int, rate: float, seed: int) -> list[RequestSpec]:
    """n Poisson arrivals at `rate`/s, each a short chat or (LONG_SHARE) a long answer."""
    rng = random.Random(seed)
    words = PASSAGE.split()
    t = 0.0
    specs = []
    for _ in range(n):
        t += rng.expovariate(rate)
        if rng.random() < LONG_SHARE:
            start, length = rng.randrange(len(words)), rng.randint(*LONG_PROMPT_WORDS)
            passage = " ".join(words[(start + k) % len(words)] for k in range(length))
            specs.append(RequestSpec("long", LONG_INSTRUCTION + passage, rng.randint(*LONG_MAX_TOKENS), round(t, 4)))
        else:
            specs.append(RequestSpec("short", rng.choice(SHORT_PROMPTS), rng.randint(*SHORT_MAX_TOKENS), round(t, 4)))
    return specs


# ---------------------------------------------------------------- the server and one run


@dataclass
class Target:
    """Where the runs happen: this machine, or m0 of the namespace LAN (with its peers)."""

    setting: str                          # "one machine" | "2-peer namespace LAN"
    model_arg: list[str]                  # [] (the default model) or [path]
    serve_extra: list[str]                # --token T --peers 2 ... for the cluster
    env: dict[str, str]
    spawn: Any                            # (argv, **popen kwargs) -> Popen: subprocess's, or Machine.popen
    peers: list[Peer] = field(default_factory=list)

    def peers_cpu_s(self) -> float:
        return sum(p.cpu_s() for p in self.peers)


@dataclass
class Run:
    phase: str                            # "concurrency" | "scheduler"
    label: str                            # "4 sessions" | "fcfs"
    sessions: int                         # concurrency: closed-loop sessions; scheduler: 0 (open loop)
    max_sessions: int
    scheduler: str
    argv: list[str]
    records: list[Record] = field(default_factory=list)
    model: str = ""                       # the NAME of serve's `serving NAME on URL`
    commit: str = ""                      # HEAD when the run started (others may commit during a long run)
    wall_s: float = 0.0                   # the client's timed part (after its warm-up)
    measured_s: float = 0.0               # the driver's window around the client: CPU shares below are of this
    counters: dict[str, float] = field(default_factory=dict)   # /metrics *_total, during the timed part
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    peers_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    server_log: list[str] = field(default_factory=list)        # the server's stderr
    problem: str | None = None

    @property
    def noisy(self) -> bool:
        return self.other_cpu_s > NOISE_SHARE * self.measured_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "noisy": self.noisy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        names = {f.name for f in dataclass_fields(cls)}
        run = cls(**{k: v for k, v in d.items() if k in names and k != "records"})
        record_names = {f.name for f in dataclass_fields(Record)}
        run.records = [Record(**{k: v for k, v in r.items() if k in record_names}) for r in d.get("records", [])]
        return run


@dataclass
class Server:
    proc: subprocess.Popen
    out: _Lines
    err: _Lines
    model: str = ""
    url: str = ""


def start_server(target: Target, argv: list[str], timeout: float) -> Server:
    proc = target.spawn(argv, env=target.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
    server = Server(proc, _Lines(proc.stdout), _Lines(proc.stderr))
    m = server.out.wait_for(SERVING, timeout)
    if m is None:
        _stop(proc)
        raise BenchError(f"`fastserve serve` did not print its URL within {timeout:.0f} s (exit code {proc.poll()}): "
                         f"{server.err.tail(6)}")
    server.model, server.url = m.group(1), m.group(2)
    return server


def run_client(target: Target, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """This file in `_client` mode, where the server is (m0 for --cluster); its JSON answer."""
    proc = target.spawn([sys.executable, str(Path(__file__).resolve()), "_client"], env=target.env, cwd=REPO,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(job), timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise BenchError(f"the load generator did not finish within {timeout:.0f} s") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(line.strip() for line in err.splitlines()[-4:] if line.strip())
        raise BenchError(f"the load generator failed (exit code {proc.returncode}): {tail or 'no output'}")
    return json.loads(lines[-1])


def client_timeout(job: dict[str, Any], args: argparse.Namespace) -> float:
    """Generous: the load itself, answers at >= 10 tok/s one after another, and --timeout twice."""
    if job["mode"] == "closed":
        return job["duration_s"] + 2 * args.timeout
    specs = job["requests"]
    return max(s["at_s"] for s in specs) + sum(s["max_tokens"] for s in specs) / 10 + 2 * args.timeout


def serve_argv(target: Target, args: argparse.Namespace, *, max_sessions: int, scheduler: str) -> list[str]:
    argv = [*FASTSERVE, "serve", *target.model_arg, "--host", "127.0.0.1", "--port", "0",
            "--max-sessions", str(max_sessions), "--scheduler", scheduler]
    if args.prompt_cache is not None:
        argv += ["--prompt-cache", str(args.prompt_cache)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv + target.serve_extra


def measure(target: Target, run: Run, job: dict[str, Any], args: argparse.Namespace, say) -> Run:
    """Start the server, drive it with the client, stop it; CPU of everyone during the timed part."""
    wait_for_quiet(args.quiet_wait, say)
    run.commit = _git("rev-parse", "--short", "HEAD") or "?"
    server = start_server(target, run.argv, args.timeout)
    try:
        run.model = server.model
        job = {**job, "url": server.url, "model": server.model, "timeout_s": args.timeout}
        busy0, _ = _machine_cpu_s()
        self0, children0 = _self_cpu_s(), _children_cpu_s()
        server0, peers0 = _proc_cpu_s(server.proc.pid), target.peers_cpu_s()
        t0 = time.perf_counter()
        try:
            answer = run_client(target, job, timeout=client_timeout(job, args))
        except BenchError as problem:
            run.problem = str(problem)
            return run
        run.measured_s = time.perf_counter() - t0
        run.server_cpu_s = _proc_cpu_s(server.proc.pid) - server0
        run.peers_cpu_s = target.peers_cpu_s() - peers0
        run.client_cpu_s = _children_cpu_s() - children0
        busy1, _ = _machine_cpu_s()
        ours = run.server_cpu_s + run.peers_cpu_s + run.client_cpu_s + (_self_cpu_s() - self0)
        run.other_cpu_s = max(0.0, busy1 - busy0 - ours)
        run.wall_s, run.counters = answer["wall_s"], answer["counters"]
        run.records = [Record(**r) for r in answer["records"]]
        failed = [r for r in run.records if not r.ok]
        if failed:
            run.problem = f"{len(failed)} of {len(run.records)} requests failed; first: {failed[0].error}"
        if server.proc.poll() is not None:
            run.problem = (run.problem or "") + f" the server exited (code {server.proc.returncode})"
        return run
    finally:
        _stop(server.proc)
        run.server_log = list(server.err.lines)


# ---------------------------------------------------------------- phases


def concurrency_phase(target: Target, args: argparse.Namespace, runs: list[Run], save, say) -> None:
    for c in args.session_counts:
        run = Run("concurrency", f"{c} session{'s' if c > 1 else ''}", c, c, "fcfs",
                  serve_argv(target, args, max_sessions=c, scheduler="fcfs"))
        say(f"concurrency: {run.label}, --max-sessions {c} fcfs, {args.duration:g} s closed loop")
        job = {"mode": "closed", "sessions": c, "duration_s": args.duration, "warmup": c}
        runs.append(measure(target, run, job, args, say))
        say("  " + describe(run), "red" if run.problem else "")
        save()


def scheduler_phase(target: Target, args: argparse.Namespace, specs: list[RequestSpec], runs: list[Run],
                    save, say) -> None:
    for scheduler in SCHEDULERS:
        run = Run("scheduler", scheduler, 0, args.max_sessions, scheduler,
                  serve_argv(target, args, max_sessions=args.max_sessions, scheduler=scheduler))
        say(f"scheduler: {scheduler}, --max-sessions {args.max_sessions}, {len(specs)} requests at "
            f"{args.rate:g}/s (seed {args.seed})")
        job = {"mode": "open", "requests": [asdict(s) for s in specs], "warmup": args.max_sessions}
        runs.append(measure(target, run, job, args, say))
        say("  " + describe(run), "red" if run.problem else "")
        save()


# ---------------------------------------------------------------- figures (from the raw records only)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default method)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(run: Run) -> dict[str, Any]:
    ok = [r for r in run.records if r.ok]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    window = (max(r.done_s for r in ok) - min(r.arrival_s for r in ok)) if ok else None
    jct, ttft = [r.jct_s for r in ok], [r.ttft_s for r in ok if r.ttft_s is not None]
    by_kind = {}
    for kind in sorted({r.kind for r in ok}):
        mine = [r for r in ok if r.kind == kind]
        by_kind[kind] = {"requests": len(mine), "jct_mean_s": _mean([r.jct_s for r in mine]),
                         "ttft_mean_s": _mean([r.ttft_s for r in mine if r.ttft_s is not None]),
                         "completion_tokens_mean": _mean([r.completion_tokens or 0 for r in mine])}
    return {
        "phase": run.phase, "label": run.label, "sessions": run.sessions, "max_sessions": run.max_sessions,
        "scheduler": run.scheduler, "requests": len(ok), "failed": len(run.records) - len(ok),
        "completion_tokens": tokens, "window_s": window,
        "tok_s": tokens / window if window else None,
        "per_session_tok_s": tokens / window / run.sessions if window and run.sessions else None,
        "prompt_tokens_mean": _mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        "cached_share": _ratio(sum(r.cached_tokens or 0 for r in ok), sum(r.prompt_tokens or 0 for r in ok)),
        "completion_tokens_mean": _mean([r.completion_tokens or 0 for r in ok]),
        "stopped_early": sum(1 for r in ok if r.finish_reason == "stop"),
        "jct_mean_s": _mean(jct), "jct_p50_s": percentile(jct, 50), "jct_p99_s": percentile(jct, 99),
        "ttft_mean_s": _mean(ttft), "ttft_p99_s": percentile(ttft, 99),
        "by_kind": by_kind,
        "rows_per_step": _ratio(run.counters.get("fastserve_decode_rows_total"),
                                run.counters.get("fastserve_decode_steps_total")),
        "preemptions": run.counters.get("fastserve_preemptions_total"),
        "evictions": run.counters.get("fastserve_evictions_total"),
        "server_cpu_s": run.server_cpu_s, "noisy": run.noisy, "problem": run.problem,
    }


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three goals, each with its figure (None when a run is missing)."""
    conc = {r["sessions"]: r for r in rows if r["phase"] == "concurrency"}
    sched = {r["scheduler"]: r for r in rows if r["phase"] == "scheduler"}
    one, eight = conc.get(1, {}).get("tok_s"), conc.get(CONCURRENCY_GOAL_SESSIONS, {}).get("tok_s")
    fcfs, mlfq = sched.get("fcfs", {}), sched.get("mlfq", {})
    out = []
    if conc:
        x = _ratio(eight, one)
        out.append({"goal": f"aggregate tok/s, {CONCURRENCY_GOAL_SESSIONS} sessions / 1 session",
                    "value": x, "target": f">= {CONCURRENCY_GOAL_RATIO:g}",
                    "pass": None if x is None else x >= CONCURRENCY_GOAL_RATIO})
    if sched:
        x = _ratio(fcfs.get("jct_mean_s"), mlfq.get("jct_mean_s"))
        out.append({"goal": "mean JCT, fcfs / mlfq", "value": x, "target": f">= {MEAN_JCT_GOAL:g}",
                    "pass": None if x is None else x >= MEAN_JCT_GOAL})
        x = _ratio(mlfq.get("jct_p99_s"), fcfs.get("jct_p99_s"))
        out.append({"goal": "p99 JCT, mlfq / fcfs", "value": x, "target": f"<= {P99_JCT_GOAL:.2f}",
                    "pass": None if x is None else x <= P99_JCT_GOAL})
    return out


def describe(run: Run) -> str:
    if not run.records:
        return f"{run.label}: {run.problem}"
    s = summarize(run)
    text = (f"{run.label}: {s['requests']} requests, {s['completion_tokens']} tokens in "
            f"{s['window_s'] or 0:.1f} s = {_rate(s['tok_s'])} tok/s; JCT mean {_secs(s['jct_mean_s'])}, "
            f"p99 {_secs(s['jct_p99_s'])}; TTFT mean {_secs(s['ttft_mean_s'])}")
    if run.noisy:
        text += f" (noisy: others used {run.other_cpu_s:.1f} CPU s)"
    return text + (f"; {run.problem}" if run.problem else "")


# ---------------------------------------------------------------- report


def _secs(x: float | None, noisy: bool = False) -> str:
    return "n/a" if x is None else f"{x:.2f} s" + ("*" if noisy else "")


def _num(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _goal(passed: bool | None) -> str:
    return "" if passed is None else (" pass" if passed else " FAIL")


def concurrency_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["sessions", "requests", "prompt tok", "cached", "gen tok/req", "aggregate tok/s",
              f"x 1 session (>= {CONCURRENCY_GOAL_RATIO:g} at {CONCURRENCY_GOAL_SESSIONS})", "tok/s per session",
              "TTFT mean", "TTFT p99", "JCT mean", "rows/step", "server CPU s"]
    one = next((r["tok_s"] for r in rows if r["sessions"] == 1), None)
    body = []
    for r in rows:
        x = r["tok_s"] / one if r["tok_s"] is not None and one else None
        goal = None if x is None or r["sessions"] != CONCURRENCY_GOAL_SESSIONS else x >= CONCURRENCY_GOAL_RATIO
        n = r["noisy"]
        body.append([
            str(r["sessions"]), f"{r['requests']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            _num(r["prompt_tokens_mean"]), _share(r.get("cached_share")), _num(r["completion_tokens_mean"], 1),
            _rate(r["tok_s"], n), ("n/a" if x is None else f"{x:.2f}x") + _goal(goal), _rate(r["per_session_tok_s"], n),
            _secs(r["ttft_mean_s"], n), _secs(r["ttft_p99_s"], n), _secs(r["jct_mean_s"], n),
            _num(r.get("rows_per_step"), 1), f"{r['server_cpu_s']:.0f}",
        ])
    return header, body


def scheduler_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["scheduler", "requests (short/long)", "cached", "gen tokens", "tok/s", "JCT mean", "JCT p50", "JCT p99",
              "TTFT mean", "TTFT p99", "short JCT mean", "long JCT mean", "rows/step", "preempted / evicted",
              "server CPU s"]
    body = []
    for r in rows:
        n, kinds = r["noisy"], r["by_kind"]
        short, long = kinds.get("short", {}), kinds.get("long", {})
        body.append([
            r["scheduler"],
            f"{r['requests']} ({short.get('requests', 0)}/{long.get('requests', 0)})"
            + (f", {r['failed']} failed" if r["failed"] else ""),
            _share(r.get("cached_share")), str(r["completion_tokens"]), _rate(r["tok_s"], n),
            _secs(r["jct_mean_s"], n), _secs(r["jct_p50_s"], n), _secs(r["jct_p99_s"], n),
            _secs(r["ttft_mean_s"], n), _secs(r["ttft_p99_s"], n),
            _secs(short.get("jct_mean_s"), n), _secs(long.get("jct_mean_s"), n),
            _num(r.get("rows_per_step"), 1), f"{_num(r['preemptions'])} / {_num(r['evictions'])}",
            f"{r['server_cpu_s']:.0f}",
        ])
    return header, body


def goal_lines(results: dict[str, Any]) -> list[str]:
    return [f"{g['goal']}: {'n/a' if g['value'] is None else format(g['value'], '.2f')} (goal {g['target']})"
            f"{_goal(g['pass'])}" for g in results["goals"]]


ROWS_NOTE = ("rows/step = sessions per batched decode step (/metrics decode rows / decode steps). cached = "
             "prompt tokens the server's prompt cache gave (usage.prompt_tokens_details.cached_tokens).")


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def caption(results: dict[str, Any], phase: str) -> str:
    m, s = results["machine"], results["settings"]
    fs = results["fastserve"]
    threads = s["threads"] if s["threads"] is not None else ("1 per machine" if s["cluster"] else "server default")
    commits = list(dict.fromkeys(r["commit"] for r in results["runs"] if r.get("commit"))) or [fs["commit"]]
    head = (f"{m['cpu']}, {m['cores']} cores; fastserve {', then '.join(commits)}{' (dirty)' if fs['dirty'] else ''}; "
            f"{results['model']}; {s['setting']}; threads {threads}; "
            f"--prompt-cache {'server default' if s.get('prompt_cache') is None else s['prompt_cache']}. ")
    if phase == "concurrency":
        return head + (f"Closed loop: C sessions, back-to-back requests (prompt asking for a long story, "
                       f"max_tokens {s['medium_max_tokens']}, temperature 0) for {s['duration_s']:g} s, server "
                       f"--max-sessions C, fcfs. Aggregate tok/s = completion tokens / (first send -> last "
                       f"completion). {ROWS_NOTE} * = other processes used over {NOISE_SHARE:.0%} of a core.")
    return head + (f"Open loop: {s['requests']} Poisson arrivals at {s['rate']:g}/s (seed {s['seed']}), "
                   f"{1 - LONG_SHARE:.0%} short chats (max_tokens {SHORT_MAX_TOKENS[0]}-{SHORT_MAX_TOKENS[1]}), "
                   f"{LONG_SHARE:.0%} long answers (max_tokens {LONG_MAX_TOKENS[0]}-{LONG_MAX_TOKENS[1]}); "
                   f"the same requests for both; --max-sessions {s['max_sessions']}. JCT = arrival -> last token, "
                   f"TTFT = arrival -> first token; p99 interpolated. {ROWS_NOTE} Preempted / evicted: /metrics "
                   f"counters. * = other processes used over "
                   f"{NOISE_SHARE:.0%} of a core.")


def print_report(results: dict[str, Any], json_out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log file: 80 columns would fold every cell
        console = Console(width=240)
    rows = results["rows"]
    tables = [(phase, title, make([r for r in rows if r["phase"] == phase]))
              for phase, title, make in (("concurrency", "fastserve serve: aggregate tokens/s by sessions",
                                          concurrency_table),
                                         ("scheduler", "fastserve serve: fcfs vs mlfq, mixed workload",
                                          scheduler_table))
              if any(r["phase"] == phase for r in rows)]
    for phase, title, (header, body) in tables:
        table = Table(title=title, caption=caption(results, phase), caption_justify="left")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i < 1 else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
    lines = goal_lines(results)
    if lines:
        console.print("Goals: " + "; ".join(lines), highlight=False)
    print("\nMarkdown:")
    for phase, title, (header, body) in tables:
        print(f"\n**{title}**. {caption(results, phase)}\n")
        print(markdown(header, body))
    for line in lines:
        print(f"\n- {line}")
    for problem in results["problems"]:
        print(f"\n- problem: {problem}")
    print(f"\nJSON: {json_out}")


def report_only(args: argparse.Namespace) -> int:
    results = json.loads(args.report.read_text())
    runs = [Run.from_dict(d) for d in results["runs"]]  # the figures again, from the raw records
    results["rows"] = [summarize(r) for r in runs if r.records]
    results["goals"] = goals(results["rows"])
    print_report(results, args.report)
    return 0


# ---------------------------------------------------------------- cluster


def cluster_unavailable() -> str | None:
    return unavailable("--cluster", f"{sys.executable} {Path(__file__).relative_to(REPO)} --cluster")


def cluster_serve_extra(token: str) -> list[str]:
    """As `chat` on a cluster: wait for both peers, spread over all three machines."""
    return ["--token", token, "--peers", str(CLUSTER_PEERS), "--min-stages", str(CLUSTER_PEERS + 1), "--wait", "30"]


# ---------------------------------------------------------------- main


def _ints(text: str, flag: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        parser.error(f"{flag} must be integers like 1,4,8, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag} needs integers of at least 1")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    parser.add_argument("--sessions", default="1,4,8,16", help="concurrency: closed-loop session counts")
    parser.add_argument("--duration", type=float, default=30.0, help="concurrency: seconds of load per session count")
    parser.add_argument("--rate", type=float, default=1.0, help="scheduler: Poisson arrivals per second")
    parser.add_argument("--requests", type=int, default=40, help="scheduler: requests in the mixed workload")
    parser.add_argument("--max-sessions", type=int, default=4, help="scheduler: serve --max-sessions for both runs")
    parser.add_argument("--seed", type=int, default=1, help="scheduler: seed of the arrivals and the mix")
    parser.add_argument("--threads", type=int, help="serve --threads (default: the server's; --cluster: 1)")
    parser.add_argument("--prompt-cache", type=int, help="serve --prompt-cache (default: the server's; 0 = off)")
    parser.add_argument("--model", help="serve's MODEL argument (default: its default model; --cluster: smollm2-135m)")
    parser.add_argument("--cluster", action="store_true",
                        help="against `serve --token T --peers 2` in m0 of a 3-namespace LAN with 2 `join` peers (root)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds for a server to start, and per streamed read of a request")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="seconds to wait, before each run, for other processes to leave the CPU alone")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of an earlier run's JSON; measure nothing")
    parser.add_argument("--json-out", type=Path,
                        default=REPO / "bench" / "results" / f"serve-{datetime.now():%Y-%m-%dT%H%M%S}.json")
    args = parser.parse_args(argv)
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phase_list or not set(args.phase_list) <= set(PHASES):
        parser.error(f"--phases: choose among {','.join(PHASES)}")
    args.session_counts = _ints(args.sessions, "--sessions", parser)
    if args.duration <= 0 or args.rate <= 0:
        parser.error("--duration and --rate must be above 0")
    for flag, value in (("--requests", args.requests), ("--max-sessions", args.max_sessions),
                        ("--threads", args.threads if args.threads is not None else 1)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.quiet_wait < 0 or args.timeout <= 0:
        parser.error("--quiet-wait must be 0 or more and --timeout above 0")
    return args


def local_target(args: argparse.Namespace) -> Target:
    env = {k: v for k, v in os.environ.items() if k != "FASTSERVE_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    # serve looks for peers on the LAN unless told not to: one machine means this one alone
    return Target("one machine", [args.model] if args.model else [], ["--local-only"], env, subprocess.Popen)


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape

    from fastserve_edge.cluster.profile import cpu_name  # no torch: this process stays light

    args = parse_args(argv)
    if args.report is not None:
        return report_only(args)
    err = Console(stderr=True)
    say = progress(err)

    if args.cluster and (why := cluster_unavailable()) is not None:
        err.print(f"[bold red]error:[/] {escape(why)}", highlight=False)
        return 2
    specs = mixed_workload(args.requests, args.rate, args.seed)
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": sorted(os.sched_getaffinity(0)),
                    "platform": platform.platform()},
        "fastserve": {"commit": _git("rev-parse", "--short", "HEAD") or "?", "dirty": bool(_git("status", "--porcelain"))},
        "model": args.model or "default model",
        "settings": {"phases": args.phase_list, "sessions": args.session_counts, "duration_s": args.duration,
                     "rate": args.rate, "requests": args.requests, "max_sessions": args.max_sessions,
                     "seed": args.seed, "threads": args.threads, "cluster": args.cluster,
                     "prompt_cache": args.prompt_cache,
                     "setting": "2-peer namespace LAN" if args.cluster else "one machine",
                     "medium_max_tokens": MEDIUM_MAX_TOKENS, "long_share": LONG_SHARE,
                     "short_max_tokens": SHORT_MAX_TOKENS, "long_max_tokens": LONG_MAX_TOKENS,
                     "fastserve_threads_env": os.environ.get("FASTSERVE_THREADS")},
        "goals": [], "rows": [], "runs": [], "problems": [],
        "workload": [asdict(s) for s in specs],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []

    def save() -> None:
        if not args.cluster and runs and runs[0].model:
            results["model"] = runs[0].model  # the name serve printed for its default model
        results["runs"] = [r.as_dict() for r in runs]
        results["rows"] = [summarize(r) for r in runs if r.records]
        results["goals"] = goals(results["rows"])
        results["problems"] = [f"{r.label}: {r.problem}" for r in runs if r.problem]
        args.json_out.write_text(json.dumps(results, indent=2))

    def run_phases(target: Target) -> None:
        if "concurrency" in args.phase_list:
            concurrency_phase(target, args, runs, save, say)
        if "scheduler" in args.phase_list:
            scheduler_phase(target, args, specs, runs, save, say)

    try:
        if not args.cluster:
            run_phases(local_target(args))
        else:
            run_cluster(args, results, run_phases, say)
    except BenchError as problem:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
        results["problems"].append(str(problem))
        save()
        return 1
    save()
    print_report(results, args.json_out)
    return 0


def run_cluster(args: argparse.Namespace, results: dict[str, Any], run_phases, say) -> None:
    """m1, m2 run `fastserve join`; the server and the client run in m0."""
    from tests import netns

    from fastserve_edge.cluster.auth import new_token

    model = Path(args.model) if args.model else smollm2_path()
    if not model.is_file():
        raise BenchError(f"no model file at {model}")
    results["model"] = model.name
    token = new_token()
    extra = cluster_serve_extra(token)
    root = Path(tempfile.mkdtemp(prefix="fastserve-bench-serve-"))
    threads = str(args.threads or 1)
    try:
        with netns.lan(1 + CLUSTER_PEERS) as lan:
            for machine in lan:
                netns.limit_link(machine, rate=LINK_RATE)
            peers = [Peer(lan[i], None) for i in range(1, 1 + CLUSTER_PEERS)]
            for peer in peers:  # no memory cap: --min-stages (when serve has it) spreads the layers
                start_peer(peer, token=token, cap=64 * 2**40, fresh=True, root=root, timeout=args.timeout)
            say(f"LAN of {len(lan)} namespaces ({lan.subnet}), links {LINK_RATE}; peers listening on "
                + ", ".join(f"{p.machine.name} {p.machine.ip}:{PORT}" for p in peers))
            (root / "host").mkdir()
            env = {**child_env(root / "host"), "FASTSERVE_THREADS": threads}  # the peers run 1 thread (child_env)
            target = Target("2-peer namespace LAN", [str(model)], extra, env, lan[0].popen, peers)
            try:
                run_phases(target)
            finally:
                for peer in peers:
                    stop_peer(peer)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main()
    else:
        sys.exit(main(sys.argv[1:]))
