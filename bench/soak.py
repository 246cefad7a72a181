"""Fault soak: a host and its peers serve streaming clients for a long time while peers are
killed, stopped and unplugged; no answer may be lost and no process may grow (issue 21).

    sudo python bench/soak.py                        # 20 minutes, 3 peers, 4 clients, a fault every ~50 s
    sudo python bench/soak.py --minutes 2 --fault-every 25 --seed 7 --keep-logs

The LAN is tests/netns.py's: namespace m0 holds the host, m1..mN the peers. Peers run the real
`fastserve join --token T --max-memory CAP` (their own FASTSERVE_HOME under a temp folder,
FASTSERVE_THREADS=1); the host runs the real `fastserve serve MODEL --host 127.0.0.1 --port 0
--api-key K --token T --peers N --wait 30 --min-stages S --max-memory CAP` in m0. With the
default caps (100M at ctx 256, as tests/integration/test_cluster.py's ROOMY) any two machines hold
SmolLM2-135M and --min-stages (default: every machine) spreads it over all of them, so a lost
peer costs a re-plan, never the model. Machines are pinned round-robin to the usable cores
(`taskset -c`; --no-pin), as bench/cluster.py does.

Clients: this file in `_clients` mode, inside m0 (the server listens on m0's loopback):
--clients closed-loop sessions, each sending streaming chat completions (temperature 0,
--max-tokens) one after another until the time is up; the requests in flight then finish and
count. A request is *completed* when its stream ends with `data: [DONE]` after a
finish_reason and some text; anything else (an HTTP error, an error event, a stream that
breaks or stalls for --request-timeout s, no text) is an answer *lost*, with its error text.
Latency = request sent -> [DONE]; TTFT = sent -> first text. At temperature 0 every answer to
a question should equal that question's first answer: the ones that differ are counted too.

Faults, one at a time (so at most one peer is ever down: the host and the other peers always
hold the model), on a schedule fixed by --seed: every --fault-every s (x 0.8-1.2) a fault
whose kind comes from a shuffled bag of the three kinds:
- kill: SIGKILL, then `fastserve join` again with the same home (its layer cache warm) after ~15 s;
- stop: SIGSTOP for ~10 s, then SIGCONT;
- unplug: `ip link set eth0 down` in its namespace for ~10 s, then up (and the multicast route
  the link took with it back, so mDNS finds it again).
The victim is drawn (with the same seed) among the peers the current plan uses (the last plan
table the host printed); a fault that would not end --settle s before the end is skipped.
The host only takes a peer back at its next re-plan, so a restored peer may sit out a while.

Every --sample-every s (and at start and end) the host, every peer process and the clients
process are sampled from /proc: VmRSS, open files (/proc/PID/fd) and threads. `ip netns exec`
and `taskset` exec, so Popen.pid is the process itself; a restarted peer is a new process and
gets a row of its own. "start" is the first sample once every client has finished a request
(the server warm), "end" the sample when the time is up (clients still streaming).

Results: a Rich table and a markdown copy on stdout, the fault log, JSON in --json-out
(default bench/results/soak-<timestamp>.json, gitignored; rewritten at every sample). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/soak.py`: bench.* and tests.netns live beside it
    sys.path.insert(0, str(REPO))

from bench.cluster import (  # noqa: E402  (stdlib-only helpers of the cluster benchmark)
    FASTSERVE,
    ChatRun,
    Peer,
    _Lines,
    _stop,
    child_env,
    parse_chat,
    pinned,
    start_peer,
    stop_peer,
    unavailable,
)
from bench.serve import SERVING, percentile  # noqa: E402
from bench.vs_llamacpp import BenchError, _git, markdown, progress, smollm2_path  # noqa: E402

API_KEY = "soak-key"
FAULT_KINDS = ("kill", "stop", "unplug")
DOWN_S = {"kill": 15.0, "stop": 10.0, "unplug": 10.0}  # how long a peer stays down (x 0.9-1.1)
TICK_S = 0.25              # the driver's loop
ERROR_PAUSE_S = 1.0        # a client whose request was lost waits this long before the next one
HOST_LOG_EVENTS = ("stopped answering", "re-plan", "planning again", "sent again", "error", "Traceback",
                   "not using")
# "flat": a process that lived from start to end may grow at most this much (a soak of 20 minutes
# against a server warm at "start": allocator noise and gRPC's thread pools, not a leak).
FLAT_RSS_SHARE = 0.10
FLAT_RSS_BYTES = 16 * 2**20
FLAT_FDS = 8
FLAT_THREADS = 4
# Long answers (max_tokens usually ends them, finish_reason "length"); cycled over the requests,
# so the server's prompt cache sees repeated prompts as a chat service would.
QUESTIONS = (
    "Write a long story about a robot who learns to paint.",
    "Write a long story about a cat who sails the sea.",
    "Describe a walk through a forest in autumn.",
    "Explain how bread is made, step by step.",
    "Describe a busy harbour at dawn, in detail.",
    "Write a letter from a lighthouse keeper to her sister.",
    "Explain how a bicycle works to a ten-year-old.",
    "Tell the story of a lost key and the child who found it.",
)


# ---------------------------------------------------------------- the clients (`_clients` mode, inside m0)


async def _request(http, job: dict[str, Any], client: int, n: int) -> dict[str, Any]:
    """One streaming chat completion; times are epoch seconds (the driver shares the clock)."""
    import aiohttp

    question = (client + n * job["clients"]) % len(QUESTIONS)
    body = {"model": job["model"], "messages": [{"role": "user", "content": QUESTIONS[question]}], "stream": True,
            "temperature": 0, "max_tokens": job["max_tokens"]}
    rec: dict[str, Any] = {"client": client, "n": n, "question": question, "sent": time.time(), "first": None,
                           "done": None, "finish_reason": None, "text": "", "status": None, "error": None}
    pieces: list[str] = []
    try:
        async with http.post(f"{job['url']}/chat/completions", json=body) as resp:
            rec["status"] = resp.status
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            async for raw in resp.content:  # one SSE line at a time
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec["done"] = time.time()
                    break
                event = json.loads(data)
                if "error" in event:
                    rec["error"] = f"error event: {(event['error'] or {}).get('message')}"
                    continue
                for choice in event.get("choices") or ():
                    if text := (choice.get("delta") or {}).get("content"):
                        if rec["first"] is None:
                            rec["first"] = time.time()
                        pieces.append(text)
                    if choice.get("finish_reason"):
                        rec["finish_reason"] = choice["finish_reason"]
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeError) as err:
        rec["error"] = f"{type(err).__name__}: {err}".strip()
    rec["text"] = "".join(pieces)
    if rec["error"] is None:
        if rec["done"] is None:
            rec["error"] = "the stream ended without data: [DONE]"
        elif rec["finish_reason"] is None:
            rec["error"] = "no finish_reason before [DONE]"
        elif not rec["text"]:
            rec["error"] = f"an empty answer (finish_reason {rec['finish_reason']})"
    return rec


async def _clients(job: dict[str, Any]) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=job["timeout_s"])
    headers = {"Authorization": f"Bearer {job['key']}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers,
                                     connector=aiohttp.TCPConnector(limit=0)) as http:

        async def client(i: int) -> None:
            n = 0
            while time.time() < job["until"]:
                rec = await _request(http, job, i, n)
                print(json.dumps(rec), flush=True)
                n += 1
                if rec["error"] is not None:
                    await asyncio.sleep(ERROR_PAUSE_S)

        await asyncio.gather(*(client(i) for i in range(job["clients"])))


def clients_main(argv: list[str]) -> None:
    """`_clients JOB`: one JSON line on stdout per request, as each ends."""
    asyncio.run(_clients(json.loads(argv[0])))


# ---------------------------------------------------------------- processes


class _Stamped(_Lines):
    """_Lines that also keeps when each line arrived (epoch seconds)."""

    def __init__(self, stream):
        self.times: list[float] = []
        super().__init__(stream)

    def _pump(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.times.append(time.time())
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def since(self, t: float) -> list[tuple[float, str]]:
        with self._cond:
            return [(s, line) for s, line in zip(self.times, self.lines) if s >= t]


def proc_sample(pid: int) -> dict[str, int] | None:
    """VmRSS (bytes), open files and threads of a live process; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in values or values.get("State", "").strip().startswith("Z"):
        return None
    return {"rss": int(values["VmRSS"].split()[0]) * 1024, "fds": fds, "threads": int(values["Threads"])}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Tracked:
    """One process we sample: the host, the clients, or one life of a peer."""

    label: str
    role: str                    # "host" | "peer" | "clients"
    pid: int
    started: float               # epoch
    ended: float | None = None   # epoch: killed, or gone
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"t": s since run start, "rss", "fds", "threads"}


@dataclass
class Fault:
    kind: str
    at: float                    # s since run start (when it was done)
    victim: str                  # machine name
    down_s: float                # planned
    scheduled_at: float
    restored_at: float | None = None
    noticed_after_s: float | None = None   # host's first line about it (stopped answering, re-planning)
    plan_after: list[str] = field(default_factory=list)  # the first plan after it: machine per stage
    host_lines: list[str] = field(default_factory=list)
    problem: str | None = None


@dataclass
class Scheduled:
    at: float
    kind: str
    down_s: float
    draw: float                  # picks the victim among the eligible peers


def fault_schedule(seed: int, duration_s: float, every_s: float, settle_s: float) -> list[Scheduled]:
    """Deterministic: start times every `every_s` (x 0.8-1.2), kinds from a shuffled bag."""
    rng = random.Random(seed)
    out: list[Scheduled] = []
    bag: list[str] = []
    t = every_s * rng.uniform(0.8, 1.2)
    while True:
        if not bag:
            bag = list(FAULT_KINDS)
            rng.shuffle(bag)
        kind = bag.pop()
        down = DOWN_S[kind] * rng.uniform(0.9, 1.1)
        if t + down + settle_s > duration_s:
            return out
        out.append(Scheduled(round(t, 1), kind, round(down, 1), rng.random()))
        t += every_s * rng.uniform(0.8, 1.2)


# ---------------------------------------------------------------- the soak


@dataclass
class Soak:
    args: argparse.Namespace
    lan: Any
    peers: list[Peer]
    token: str
    root: Path
    say: Any
    t0: float = 0.0                                   # epoch of the clients' start
    host_proc: subprocess.Popen | None = None
    host_log: _Stamped | None = None
    url: str = ""
    model_id: str = ""
    clients_proc: subprocess.Popen | None = None
    clients_err: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    tracked: list[Tracked] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    lives: dict[str, int] = field(default_factory=dict)  # machine -> how many times its peer started
    peer_logs: dict[str, list[str]] = field(default_factory=dict)  # label -> its stderr
    problems: list[str] = field(default_factory=list)
    start_index: int | None = None                    # index of the "start" sample round
    plans: dict[str, list[str]] = field(default_factory=dict)  # "start" / "end" -> machines in stage order
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.time() - self.t0

    # -- processes
    def track(self, label: str, role: str, pid: int) -> Tracked:
        cmd = _cmdline(pid)
        if role != "clients" and "cli.main" not in cmd:
            self.problems.append(f"{label}: pid {pid} runs {cmd!r}, not fastserve (its figures are of that)")
        t = Tracked(label, role, pid, started=time.time())
        self.tracked.append(t)
        return t

    def start_peer(self, peer: Peer, *, fresh: bool) -> None:
        start_peer(peer, token=self.token, cap=self.args.cap_bytes, fresh=fresh, root=self.root,
                   timeout=self.args.timeout)
        name = peer.machine.name
        self.lives[name] = self.lives.get(name, 0) + 1
        label = f"peer {name}" + (f" #{self.lives[name]}" if self.lives[name] > 1 else "")
        assert peer.proc is not None and peer.log is not None
        self.peer_logs[label] = peer.log.lines
        self.track(label, "peer", peer.proc.pid)

    def start_host(self, model: Path, host_cpu: str | None) -> None:
        a = self.args
        argv = [*FASTSERVE, "serve", str(model), "--host", "127.0.0.1", "--port", "0", "--api-key", API_KEY,
                "--token", self.token, "--peers", str(a.peers), "--wait", str(a.wait), "--min-stages",
                str(a.min_stages), "--max-memory", a.max_memory, "--ctx", str(a.ctx), "--max-sessions",
                str(a.clients)]
        home = self.root / "host"
        home.mkdir(exist_ok=True)
        self.host_proc = self.lan[0].popen(pinned(host_cpu, argv), env=child_env(home), cwd=REPO,
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, bufsize=1)
        out = _Lines(self.host_proc.stdout)
        self.host_log = _Stamped(self.host_proc.stderr)
        m = out.wait_for(SERVING, a.timeout)
        if m is None:
            raise BenchError(f"`fastserve serve` did not print its URL within {a.timeout:.0f} s (exit code "
                             f"{self.host_proc.poll()}): {self.host_log.tail(6)}")
        self.model_id, self.url = m.group(1), m.group(2)
        self.track("host m0", "host", self.host_proc.pid)

    def start_clients(self, host_cpu: str | None) -> None:
        a = self.args
        self.t0 = time.time()
        job = {"url": self.url, "key": API_KEY, "model": self.model_id, "clients": a.clients,
               "max_tokens": a.max_tokens, "until": self.t0 + a.minutes * 60, "timeout_s": a.request_timeout}
        argv = [sys.executable, str(Path(__file__).resolve()), "_clients", json.dumps(job)]
        self.clients_proc = self.lan[0].popen(pinned(host_cpu, argv), env=child_env(self.root / "host"), cwd=REPO,
                                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, bufsize=1)
        proc = self.clients_proc

        def read_out() -> None:
            for line in proc.stdout:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                with self._lock:
                    self.records.append(rec)
                if rec["error"] is not None:
                    self.say(f"  lost: client {rec['client']} request {rec['n']}: {rec['error']}", "red")

        threading.Thread(target=read_out, daemon=True).start()
        threading.Thread(target=lambda: self.clients_err.extend(proc.stderr), daemon=True).start()
        self.track("clients m0", "clients", proc.pid)

    def sample(self, when: str = "") -> None:
        t = round(self.now(), 1)
        for tr in self.tracked:
            if tr.ended is not None:
                continue
            s = proc_sample(tr.pid)
            if s is None:
                tr.ended = time.time()
                continue
            tr.samples.append({"t": t, **s, **({"when": when} if when else {})})
        if when:
            self.plans[when] = self.plan_machines()

    # -- the plan, from what the host printed
    def plan_rows(self, until: float | None = None) -> list[dict[str, str]]:
        assert self.host_log is not None
        with self.host_log._cond:
            lines = [line for s, line in zip(self.host_log.times, self.host_log.lines) if until is None or s <= until]
        run = ChatRun("soak", "serve", [])
        parse_chat(run, "\n".join(lines))
        return run.plan

    def machine_of(self, address: str) -> str:
        ip = address.rsplit(":", 1)[0]
        if address.startswith("(this"):
            return "m0"
        return next((p.machine.name for p in self.peers if p.machine.ip == ip), address)

    def plan_machines(self, until: float | None = None) -> list[str]:
        return [self.machine_of(r["address"]) for r in self.plan_rows(until) if r.get("layers", "-") != "-"]

    # -- faults
    def inject(self, item: Scheduled) -> Fault:
        in_plan = set(self.plan_machines())
        up = [p for p in self.peers if p.proc is not None and p.proc.poll() is None]
        eligible = [p for p in up if p.machine.name in in_plan] or up
        victim = eligible[min(int(item.draw * len(eligible)), len(eligible) - 1)]
        fault = Fault(item.kind, round(self.now(), 1), victim.machine.name, item.down_s, item.at)
        assert victim.proc is not None
        pid = victim.proc.pid
        if item.kind == "kill":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            victim.proc.wait(timeout=30)
            if (tr := next((t for t in self.tracked if t.pid == pid and t.ended is None), None)) is not None:
                tr.ended = time.time()
        elif item.kind == "stop":
            os.killpg(pid, signal.SIGSTOP)
        else:
            self._link(victim, "down")
        self.say(f"fault at {fault.at:.0f} s: {item.kind} {victim.machine.name} for {item.down_s:.0f} s "
                 f"(plan: {', '.join(sorted(in_plan)) or '?'})", "yellow")
        self.faults.append(fault)
        return fault

    def _link(self, peer: Peer, state: str) -> None:
        m = peer.machine
        subprocess.run(["ip", "-n", m.ns, "link", "set", m.iface, state], check=True, capture_output=True, timeout=30)
        if state == "up":  # the link took its multicast route down with it: mDNS needs it back
            subprocess.run(["ip", "-n", m.ns, "route", "replace", "224.0.0.0/4", "dev", m.iface], check=True,
                           capture_output=True, timeout=30)

    def restore(self, fault: Fault) -> None:
        victim = next(p for p in self.peers if p.machine.name == fault.victim)
        try:
            if fault.kind == "kill":
                self.start_peer(victim, fresh=False)  # same home: its layer cache is warm
            elif fault.kind == "stop":
                assert victim.proc is not None
                os.killpg(victim.proc.pid, signal.SIGCONT)
            else:
                self._link(victim, "up")
        except (BenchError, OSError, subprocess.SubprocessError) as err:
            fault.problem = f"restoring {fault.victim} failed: {err}"
            self.problems.append(fault.problem)
            self.say(fault.problem, "red")
        fault.restored_at = round(self.now(), 1)
        self.say(f"  {fault.victim} back at {fault.restored_at:.0f} s", "dim")

    def follow_up(self) -> None:
        """What the host said after each fault: when it noticed, and the plan it made."""
        assert self.host_log is not None
        for i, fault in enumerate(self.faults):
            start = self.t0 + fault.at
            end = self.t0 + self.faults[i + 1].at if i + 1 < len(self.faults) else float("inf")
            lines = [(s, line) for s, line in self.host_log.since(start) if s < end]
            fault.host_lines = [f"+{s - start:.1f} s {line.strip()}" for s, line in lines
                                if any(word in line for word in HOST_LOG_EVENTS) or "plan:" in line][:12]
            noticed = next((s for s, line in lines if "stopped answering" in line or "re-plan" in line
                            or "sent again" in line), None)
            if noticed is not None:
                fault.noticed_after_s = round(noticed - start, 1)
            planned = next((s for s, line in lines if "plan:" in line), None)
            if planned is not None:
                later = next((s for s, line in lines if s > planned and line.strip().startswith("└")), planned + 1)
                fault.plan_after = self.plan_machines(until=later + 0.001)

    # -- the whole run
    def run(self, schedule: list[Scheduled], save) -> None:
        a = self.args
        duration = a.minutes * 60
        queue = list(schedule)
        active: Fault | None = None
        next_sample = 0.0
        while True:
            now = self.now()
            if self.start_index is None:
                with self._lock:
                    warm = {r["client"] for r in self.records}
                if len(warm) == a.clients or now >= min(60.0, duration):
                    self.sample("start")
                    self.start_index = 1
                    next_sample = now + a.sample_every
                    save()
            if now >= next_sample and self.start_index is not None:
                self.sample()
                next_sample = now + a.sample_every
                with self._lock:
                    done = sum(1 for r in self.records if r["error"] is None)
                    lost = len(self.records) - done
                plan = self.plan_machines()
                self.say(f"{now:.0f} s: {done} completed, {lost} lost; plan {', '.join(plan) or '?'}")
                save()
            if active is not None and now >= active.at + active.down_s:
                self.restore(active)
                active = None
            elif active is None and queue and now >= queue[0].at:
                item = queue.pop(0)
                if now + item.down_s + a.settle > duration:
                    self.skipped.append({**asdict(item), "why": f"due at {item.at:.0f} s, could start only at "
                                                                f"{now:.0f} s: too close to the end"})
                else:
                    active = self.inject(item)
            if now >= duration and active is None:
                break
            if self.host_proc is not None and self.host_proc.poll() is not None:
                raise BenchError(f"`fastserve serve` exited (code {self.host_proc.returncode}) at {now:.0f} s: "
                                 f"{self.host_log.tail(6) if self.host_log else ''}")
            time.sleep(TICK_S)
        self.sample("end")
        save()
        self.say(f"time is up at {self.now():.0f} s; waiting for the requests in flight", "dim")
        assert self.clients_proc is not None
        try:
            self.clients_proc.wait(timeout=a.request_timeout * 2 + 60)
        except subprocess.TimeoutExpired:
            self.problems.append("the clients did not finish their last requests in time; stopped")
            _stop(self.clients_proc)
        time.sleep(0.5)  # the reader thread takes the last lines
        if self.clients_proc.returncode not in (0, None) and self.clients_proc.returncode != -signal.SIGTERM:
            tail = " | ".join(line.strip() for line in self.clients_err[-4:] if line.strip())
            self.problems.append(f"the clients exited with code {self.clients_proc.returncode}: {tail or 'no output'}")
        self.follow_up()


# ---------------------------------------------------------------- summary and report


def _overlaps(rec: dict[str, Any], faults: list[Fault], t0: float) -> bool:
    end = rec["done"] or rec["sent"]
    return any(t0 + f.at <= end and rec["sent"] <= t0 + (f.restored_at if f.restored_at is not None else f.at)
               for f in faults)


def summarize(s: Soak) -> dict[str, Any]:
    with s._lock:
        records = list(s.records)
    ok = [r for r in records if r["error"] is None]
    lost = [r for r in records if r["error"] is not None]
    lat = [r["done"] - r["sent"] for r in ok]
    ttft = [r["first"] - r["sent"] for r in ok if r["first"] is not None]
    faulty = [r["done"] - r["sent"] for r in ok if _overlaps(r, s.faults, s.t0)]
    first_answer: dict[int, str] = {}
    differing = 0
    for r in sorted(ok, key=lambda r: r["done"]):
        ref = first_answer.setdefault(r["question"], r["text"])
        differing += r["text"] != ref
    by_kind = {k: sum(1 for f in s.faults if f.kind == k) for k in FAULT_KINDS}
    last = max((r["done"] or r["sent"] for r in records), default=s.t0)
    return {
        "duration_s": round(last - s.t0, 1), "requests": len(records), "completed": len(ok), "lost": len(lost),
        "lost_errors": [{"t": round(r["sent"] - s.t0, 1), "client": r["client"], "error": r["error"]} for r in lost],
        "differing_answers": differing,
        "finish_reasons": {k: sum(1 for r in ok if r["finish_reason"] == k) for k in sorted({r["finish_reason"] for r in ok})},
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99), "latency_max_s": max(lat, default=None),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "during_fault": {"completed": len(faulty), "latency_p99_s": percentile(faulty, 99),
                         "latency_max_s": max(faulty, default=None)},
        "plan_start": s.plans.get("start"), "plan_end": s.plans.get("end"),
        "faults_by_kind": by_kind, "faults_skipped": len(s.skipped),
        "faults_noticed": sum(1 for f in s.faults if f.noticed_after_s is not None),
        "processes": [process_row(t) for t in s.tracked],
    }


def process_row(t: Tracked) -> dict[str, Any]:
    start = next((x for x in t.samples if x.get("when") == "start"), t.samples[0] if t.samples else None)
    end = t.samples[-1] if t.samples else None
    whole = start is not None and start.get("when") == "start" and end is not None and end.get("when") == "end"
    row: dict[str, Any] = {"label": t.label, "role": t.role, "pid": t.pid, "start": start, "end": end,
                           "whole_run": whole, "samples": len(t.samples)}
    if start is not None and end is not None:
        d = {k: end[k] - start[k] for k in ("rss", "fds", "threads")}
        row["change"] = d
        if whole:
            row["flat"] = (d["rss"] <= max(FLAT_RSS_BYTES, FLAT_RSS_SHARE * start["rss"]) and d["fds"] <= FLAT_FDS
                           and d["threads"] <= FLAT_THREADS)
    return row


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def summary_table(sm: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    lost = sm["lost"]
    kinds = sm["faults_by_kind"]
    rows = [
        ["duration", f"{sm['duration_s'] / 60:.1f} min ({sm['duration_s']:.0f} s)"],
        ["requests completed", str(sm["completed"])],
        ["answers lost (goal 0)", f"{lost} " + ("pass" if lost == 0 else "FAIL")],
        ["answers differing from that question's first", str(sm["differing_answers"])],
        ["latency p50 / p99 / max", f"{_s(sm['latency_p50_s'])} / {_s(sm['latency_p99_s'])} / {_s(sm['latency_max_s'])}"],
        ["latency p99 / max, requests during a fault",
         f"{_s(sm['during_fault']['latency_p99_s'])} / {_s(sm['during_fault']['latency_max_s'])} "
         f"({sm['during_fault']['completed']} requests)"],
        ["TTFT p50 / p99", f"{_s(sm['ttft_p50_s'])} / {_s(sm['ttft_p99_s'])}"],
        ["faults injected", f"{sum(kinds.values())}: " + ", ".join(f"{k} {v}" for k, v in kinds.items())
         + (f"; {sm['faults_skipped']} skipped" if sm["faults_skipped"] else "")
         + f"; the host noticed {sm['faults_noticed']}"],
        ["plan at start / end (stage order)", f"{', '.join(sm['plan_start'] or ['?'])} / "
                                              f"{', '.join(sm['plan_end'] or ['?'])}"],
    ]
    return ["figure", "value"], rows


def process_table(sm: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["process", "pid", "RSS MiB start", "end", "change", "open files start", "end", "change",
              "threads start", "end", "change", "flat"]
    body = []
    for p in sm["processes"]:
        a, b = p["start"], p["end"]
        if a is None or b is None:
            body.append([p["label"], str(p["pid"]), *["n/a"] * 9, "-"])
            continue
        d = p["change"]
        flat = ("yes" if p["flat"] else "GREW") if "flat" in p else "- (" + ("ended" if a.get("when") == "start"
                                                                             else "started later") + ")"
        body.append([p["label"], str(p["pid"]), _mib(a["rss"]), _mib(b["rss"]), f"{d['rss'] / 2**20:+.1f}",
                     str(a["fds"]), str(b["fds"]), f"{d['fds']:+d}", str(a["threads"]), str(b["threads"]),
                     f"{d['threads']:+d}", flat])
    return header, body


def fault_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for f in results["faults"]:
        noticed = (f"host noticed after {f['noticed_after_s']:.1f} s" if f["noticed_after_s"] is not None
                   else "the host did not notice")
        plan = f"; next plan {', '.join(f['plan_after'])}" if f["plan_after"] else ""
        back = f"back at {f['restored_at']:.0f} s" if f["restored_at"] is not None else "not restored"
        out.append(f"- {f['at']:.0f} s: {f['kind']} {f['victim']} ({back}); {noticed}{plan}"
                   + (f"; {f['problem']}" if f["problem"] else ""))
    for f in results["skipped"]:
        out.append(f"- skipped: {f['kind']}, {f['why']}")
    return out


def caption(results: dict[str, Any]) -> str:
    s = results["settings"]
    return (f"{results['machine']['cpu']}, {results['machine']['cores']} cores; fastserve "
            f"{results['fastserve']['commit']}{' (dirty)' if results['fastserve']['dirty'] else ''}; "
            f"{results['model']['name']}. Host m0 + {s['peers']} peers on a namespace LAN, --max-memory "
            f"{s['max_memory']} each, --min-stages {s['min_stages']}, --ctx {s['ctx']}; {s['pinning']}. "
            f"{s['clients']} closed-loop streaming clients, temperature 0, max_tokens {s['max_tokens']}. A fault every "
            f"~{s['fault_every_s']:g} s (seed {s['seed']}), one at a time. Latency = sent -> [DONE], TTFT = sent -> "
            f"first text, completed requests only (p99 interpolated). Processes: start = once every client had "
            f"an answer, end = when the time was up; flat = RSS +<= max({FLAT_RSS_BYTES // 2**20} MiB, "
            f"{FLAT_RSS_SHARE:.0%}), open files +<= {FLAT_FDS}, threads +<= {FLAT_THREADS}; a machine's RSS follows its share "
            f"of the layers, so compare when the plan at start and end is the same.")


def print_report(results: dict[str, Any], json_out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    sm = results["summary"]
    tables = [("fastserve fault soak", summary_table(sm)), ("processes", process_table(sm))]
    for title, (header, body) in tables:
        table = Table(title=title, caption=caption(results) if title == "processes" else None,
                      caption_justify="left")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i < 1 else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
    print("\nMarkdown:\n")
    print(caption(results) + "\n")
    for _, (header, body) in tables:
        print(markdown(header, body) + "\n")
    print("Faults:\n")
    print("\n".join(fault_lines(results)) or "- none")
    if sm["lost_errors"]:
        print("\nLost answers:\n")
        print("\n".join(f"- {e['t']:.0f} s, client {e['client']}: {e['error']}" for e in sm["lost_errors"][:20]))
    for problem in results["problems"]:
        print(f"\n- problem: {problem}")
    print(f"\nJSON: {json_out}")


# ---------------------------------------------------------------- main


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 100M")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the clients stream")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop streaming clients")
    parser.add_argument("--peers", type=int, default=3, help="machines running `fastserve join` (at least 2)")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of every request")
    parser.add_argument("--seed", type=int, default=21, help="the fault schedule (times, kinds, victims)")
    parser.add_argument("--fault-every", type=float, default=50.0,
                        help="seconds between fault starts (x 0.8-1.2); a fault waits for the last to end")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="no fault that would end later than this many seconds before the end")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds between /proc samples")
    parser.add_argument("--model", type=Path, help="GGUF file (default: smollm2-135m from the model cache)")
    parser.add_argument("--max-memory", default="100M",
                        help="--max-memory of the host and every peer (default: any two machines hold SmolLM2)")
    parser.add_argument("--min-stages", type=int, help="serve --min-stages (default: every machine)")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--wait", type=float, default=30.0, help="serve --wait: seconds to find the peers")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="a stream silent this long is an answer lost")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the server or a peer to start")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the machines to cores")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the machines' homes and every process's log (the folder is printed)")
    parser.add_argument("--json-out", type=Path,
                        default=REPO / "bench" / "results" / f"soak-{datetime.now():%Y-%m-%dT%H%M%S}.json")
    args = parser.parse_args(argv)
    if args.peers < 2:
        parser.error("--peers must be at least 2: a fault takes one down, and the host alone cannot hold the model")
    if args.clients < 1 or args.max_tokens < 1 or args.minutes <= 0 or args.fault_every <= 0:
        parser.error("--clients, --max-tokens, --minutes and --fault-every must be positive")
    args.min_stages = args.min_stages or args.peers + 1
    try:
        args.cap_bytes = parse_size(args.max_memory)
    except argparse.ArgumentTypeError as err:
        parser.error(f"--max-memory: {err}")
    return args


def write_logs(s: Soak, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if s.host_log is not None:
        (folder / "host.log").write_text("\n".join(s.host_log.lines) + "\n")
    for label, lines in s.peer_logs.items():
        (folder / (label.replace(" ", "-").replace("#", "") + ".log")).write_text("\n".join(lines) + "\n")
    (folder / "clients.log").write_text("".join(s.clients_err))


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape

    args = parse_args(argv)
    err = Console(stderr=True)
    if not err.is_terminal:  # a log file: progress lines unfolded
        err = Console(stderr=True, width=200)
    if (why := unavailable("the soak", f"{sys.executable} bench/soak.py")) is not None:
        err.print(f"[bold red]error:[/] {escape(why)}", highlight=False)
        return 2
    from tests import netns

    from fastserve_edge.cluster.auth import new_token
    from fastserve_edge.cluster.profile import cpu_name

    say = progress(err)
    try:
        model = args.model if args.model is not None else smollm2_path()
    except BenchError as problem:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
        return 1
    if not model.is_file():
        err.print(f"[bold red]error:[/] no model file at {escape(str(model))}", highlight=False)
        return 1
    n = 1 + args.peers
    cores = sorted(os.sched_getaffinity(0))
    if args.pin and shutil.which("taskset") is not None:
        cpus: list[str | None] = [str(cores[i % len(cores)]) for i in range(n)]
        pinning = "pinned: " + ", ".join(f"m{i} cpu {c}" for i, c in enumerate(cpus)) + " (clients with m0)"
    else:
        cpus, pinning = [None] * n, "not pinned"
    root = Path(tempfile.mkdtemp(prefix="fastserve-bench-soak-"))
    schedule = fault_schedule(args.seed, args.minutes * 60, args.fault_every, args.settle)
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": cores, "platform": platform.platform()},
        "fastserve": {"commit": _git("rev-parse", "--short", "HEAD") or "?", "dirty": bool(_git("status", "--porcelain"))},
        "settings": {"minutes": args.minutes, "clients": args.clients, "peers": args.peers,
                     "max_tokens": args.max_tokens, "seed": args.seed, "fault_every_s": args.fault_every,
                     "settle_s": args.settle, "sample_every_s": args.sample_every, "max_memory": args.max_memory,
                     "min_stages": args.min_stages, "ctx": args.ctx, "wait_s": args.wait,
                     "request_timeout_s": args.request_timeout, "pinning": pinning, "down_s": DOWN_S,
                     "questions": list(QUESTIONS)},
        "model": {"path": str(model), "name": model.name},
        "schedule": [asdict(x) for x in schedule], "faults": [], "skipped": [], "summary": None,
        "records": [], "problems": [],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    soak: Soak | None = None

    def save() -> None:
        if soak is not None:
            results["faults"] = [asdict(f) for f in soak.faults]
            results["skipped"] = soak.skipped
            if soak.t0:
                results["summary"] = summarize(soak)
                results["processes"] = [asdict(t) for t in soak.tracked]
            with soak._lock:
                results["records"] = [{**r, "sent": round(r["sent"] - soak.t0, 3),
                                       "first": r["first"] and round(r["first"] - soak.t0, 3),
                                       "done": r["done"] and round(r["done"] - soak.t0, 3)} for r in soak.records]
            results["problems"] = list(soak.problems)
        args.json_out.write_text(json.dumps(results, indent=2))

    failed = False
    try:
        with netns.lan(n) as lan:
            soak = Soak(args=args, lan=lan, peers=[Peer(lan[i], cpus[i]) for i in range(1, n)], token=new_token(),
                        root=root, say=say)
            say(f"LAN of {n} namespaces ({lan.subnet}); {pinning}; starting {args.peers} peers")
            for peer in soak.peers:
                soak.start_peer(peer, fresh=True)
            say(f"peers listening; starting `fastserve serve {model.name}` in m0 (--min-stages {args.min_stages}, "
                f"--max-memory {args.max_memory})")
            soak.start_host(model, cpus[0])
            say(f"serving on {soak.url}; plan {', '.join(soak.plan_machines()) or '?'}; {args.clients} clients for "
                f"{args.minutes:g} min, {len(schedule)} faults scheduled")
            soak.start_clients(cpus[0])
            try:
                soak.run(schedule, save)
            finally:
                if args.keep_logs:
                    write_logs(soak, root / "logs")
                if soak.host_proc is not None:
                    _stop(soak.host_proc)
                for peer in soak.peers:
                    stop_peer(peer)
    except BenchError as problem:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
        if soak is not None:
            soak.problems.append(str(problem))
        else:
            results["problems"].append(str(problem))
        failed = True
    finally:
        save()
        if args.keep_logs:
            say(f"homes and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if failed or results["summary"] is None:
        return 1
    print_report(results, args.json_out)
    return 0 if results["summary"]["lost"] == 0 else 1

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        clients_main(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
