"""The cluster against one machine, on a LAN of network namespaces with 1 Gbit/s links.

    sudo python bench/cluster.py                     # SmolLM2, 1 machine vs 2 and 3 stages, 3 repeats
    sudo python bench/cluster.py --setups 1,2,t2,a2   # and tensor-parallel over 2, and the planner's choice
    sudo python bench/cluster.py --repeats 5 --cold-repeats 3
    sudo python bench/cluster.py --discovery static  # `chat --peer IP:PORT` instead of mDNS

The LAN is tests/netns.py's: namespaces m0 (the host), m1, m2 on a bridge, every eth0
shaped to --link-rate with tc tbf (so each link is that fast both ways). Each "machine" is
pinned to a core of its own where there are enough (`taskset -c`; on 2 cores the host and
m2 share one: said in the caption), and every process runs FASTSERVE_THREADS=1, so one
machine and a cluster use the same compute per layer. Peers run the real `fastserve join`;
the host runs the real `fastserve chat -p ... --temperature 0`, and the figures come from
what a person sees: the stats line, the transfer lines, the plan table, and the moment the
first byte of the answer reaches stdout. Only the host has the model file.

For each setup (--setups; one machine with --local-only; 2 stages: host + m1; 3 stages: host +
m1 + m2, spread by memory caps sized for an even split, by --min-stages and --layout pipeline;
t2: tensor-parallel over host + m1, `--layout tensor`, no caps; a2: host + m1 with
`--layout auto`, no caps, the planner's own choice, which the table names):

- cold start: peers started with fresh homes (so an empty layer cache; the profile of their
  first start is copied in, so they do not measure themselves again), then a short chat:
  time from starting `fastserve chat` to the first answer byte, and the weights sent.
  Transfer rate: the host's eth0 transmit counter, read every 10 ms from outside
  (/proc/<pid in m0>/net/dev), gives how long the fetched bytes took on the wire; the
  peers' own figure (bytes fetched / LoadStage seconds, which adds checking hashes, the
  disk cache and building the stage) is shown beside it.
- warm start: peers restarted with their homes kept (layers from their disk cache), the
  same short chat.
- throughput: with the warm peers, a ~400-token prompt and 128 greedy tokens: prefill tok/s
  = prompt tokens / time to first token, decode tok/s from the stats line.

Per-hop overhead = (ms per decoded token of the cluster - of one machine) / hops, where a
token of an S-stage pipeline crosses S links: S - 1 going out and 1 back from the last peer.
Goals (issue 4): <= 1 ms per hop; weight transfer >= 80% of the link rate; warm start to first
token <= 5 s. Medians of the repeats; a run during which other processes used more than 10%
of a core is measured again (--retries) and marked * if it stays so. Needs root.

Results: a Rich table and a markdown copy on stdout, JSON in --json-out
(default bench/results/cluster-<timestamp>.json, gitignored), rewritten after every phase.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import re
import resource
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
if str(REPO) not in sys.path:  # `python bench/cluster.py`: tests.netns and bench.vs_llamacpp live beside it
    sys.path.insert(0, str(REPO))

from bench.vs_llamacpp import (  # stdlib-only helpers shared with the other benchmark
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
from fastserve_edge.cluster.profile import cpu_name  # noqa: E402  (no torch: this process stays light)

FASTSERVE = [sys.executable, "-m", "cli.main"]  # run with cwd=REPO, as bench/vs_llamacpp.py does
PORT = 7411
PROFILE_FILE = "profile.json"  # fastserve_edge.cluster.profile.CACHE_FILE, in FASTSERVE_HOME/cache


@dataclass(frozen=True)
class Setup:
    key: str       # as --setups names it
    label: str     # as the table shows it
    machines: int  # the host and machines - 1 peers
    layout: str    # chat --layout: single | pipeline | tensor | auto

    @property
    def stages(self) -> int:
        """Pipeline stages (the hops a token crosses); 0 when the layout is not a pipeline."""
        return self.machines if self.layout == "pipeline" else 0


SETUPS = {s.key: s for s in (Setup("1", "1 machine", 1, "single"), Setup("2", "2 stages", 2, "pipeline"),
                             Setup("3", "3 stages", 3, "pipeline"), Setup("t2", "tensor x2", 2, "tensor"),
                             Setup("t3", "tensor x3", 3, "tensor"), Setup("a2", "auto x2", 2, "auto"))}
# How the coordinator routes a token today: every peer answers the host, which sends the hidden
# states on to the next peer (Pipeline.next_token), so S stages cross 2 * (S - 1) links per token
# instead of the design's S (host -> peer -> peer -> ... -> host). The table reports the overhead
# per design hop (the goal) and per link actually crossed; set False once peers pass states on.
RELAYED_BY_HOST = True
OVERHEAD_GOAL_MS = 1.0        # per hop
TRANSFER_GOAL_SHARE = 0.80    # of the link rate
WARM_START_GOAL_S = 5.0       # `fastserve chat` start -> first token, peers' caches warm
TRANSFER_START_BYTES = 64 * 1024  # host tx above this (after discovery's few packets) = the weights started
SAMPLE_S = 0.010              # how often the host's eth0 counter is read during a cold start
CAP_SLACK = 0.03              # memory caps: this share above the exact need of an even split ...
CAP_SLACK_BYTES = 2 * 2**20   # ... plus this (the planner and the peer count the small parts differently)
SHORT_PROMPT = "Hello! In one sentence, who are you?"
SHORT_TOKENS = 8
INSTRUCTION = "Continue the following story. Write at least ten long paragraphs, with dialogue.\n\n"
# The long prompt: this text, cut (or cycled) to --prompt-tokens with the chat template.
PASSAGE = (
    "The lighthouse at Gull Point had been automated for eleven years when Mara Ellison arrived with two "
    "suitcases, a crate of books and a letter from the harbour board asking her to keep an eye on things. "
    "Nobody in the village could say which things. The lamp turned by itself, the foghorn sounded on its "
    "own schedule, and a technician came from the mainland every spring to replace whatever had rusted. "
    "Still, the board paid a small salary, and Mara had spent the previous winter in a city apartment "
    "listening to her neighbours argue through the wall, so she accepted before she had finished reading. "
    "The keeper's cottage smelled of salt and old paint. In the kitchen drawer she found a logbook, its last "
    "entry dated the night before the automation: wind north-east, visibility poor, one vessel sighted, "
    "did not answer the lamp. Below it, in a different hand, someone had written a single word, later, and "
    "underlined it twice. Mara read the line several times, then put the book back and made tea. During the "
    "first week she learned the rhythm of the place. At dawn the fishing boats left the harbour in a "
    "straggling line; at noon the ferry passed on its way to the islands; in the evening the gulls gathered "
    "on the rocks below the tower and quarrelled until dark. She walked the cliff path every afternoon, "
    "counting the cairns that earlier keepers had built, and in the village shop she bought bread, candles "
    "and a chart of the coast so old that half the soundings had been corrected in pencil. The shopkeeper, "
    "a tall man named Ansel who spoke mostly about the weather, watched her fold the chart and asked whether "
    "she had found the logbook yet. When she said she had, he nodded as though that settled something, and "
    "told her that the vessel in the last entry had never been identified, that the coastguard had searched "
    "for three days, and that every few years, on a night with a north-east wind, somebody in the village "
    "claimed to see its lights again, just beyond the reef, moving against the tide. "
)


# ---------------------------------------------------------------- worker (a child with the host's home)


def _worker_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """The model's shape as the planner sees it, the long prompt fitted to a token count, and
    the host's profile and manifest measured now (not inside the first timed run)."""
    from fastserve_edge.cluster.coordinator import model_shape
    from fastserve_edge.cluster.profile import load_profile
    from fastserve_edge.cluster.shard_cache import build_manifest
    from fastserve_edge.models import open_model
    from fastserve_edge.settings import Paths

    paths = Paths.from_env()
    path = Path(spec["model"])
    source = open_model(path)
    manifest = build_manifest(source, path, paths.cache)
    shape = model_shape(source, manifest, spec["ctx"])
    load_profile(paths.cache, threads=1)
    tokenizer = source.tokenizer()

    def n_tokens(text: str) -> int:
        return len(tokenizer.encode_chat([{"role": "user", "content": text}]))

    words = PASSAGE.split()
    target = spec["prompt_tokens"]
    while n_tokens(INSTRUCTION + " ".join(words)) < target:
        words = words + PASSAGE.split()
    lo, hi = 1, len(words)  # the most words whose prompt stays within target tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(INSTRUCTION + " ".join(words[:mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    long_prompt = INSTRUCTION + " ".join(words[:lo])
    return {
        "n_layers": shape.n_layers, "layer_bytes": list(shape.layer_bytes), "embed_bytes": shape.embed_bytes,
        "head_bytes": shape.head_bytes, "kv_bytes_per_layer": shape.kv_bytes_per_layer,
        "tied_embeddings": shape.tied_embeddings, "hidden_bytes": shape.hidden_bytes,
        "file_bytes": path.stat().st_size, "model_name": path.name,
        "long_prompt": long_prompt, "long_prompt_tokens": n_tokens(long_prompt),
        "short_prompt_tokens": n_tokens(SHORT_PROMPT),
    }


def worker_main(argv: list[str]) -> None:
    """`_worker prepare JSON`: one JSON object on the last line of stdout."""
    print(json.dumps({"prepare": _worker_prepare}[argv[0]](json.loads(argv[1]))), flush=True)


# ---------------------------------------------------------------- processes and counters


def _proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a live process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _tx_bytes(pid: int, iface: str) -> int | None:
    """Bytes sent on `iface` of the network namespace `pid` is in (no process started to ask)."""
    try:
        with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == iface:
                    return int(rest.split()[8])
    except (OSError, IndexError, ValueError):
        pass
    return None


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Lines:
    """A child's text stream collected by a thread; `wait_for(pattern)` blocks until a line matches."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := pattern.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    return None
                self._cond.wait(left)

    def tail(self, n: int = 4) -> str:
        with self._cond:
            return " | ".join(line.strip() for line in self.lines[-n:] if line.strip()) or "no output"


def _stop(proc: subprocess.Popen) -> None:
    """End one child we started (its whole session), politely first."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ---------------------------------------------------------------- the cluster's machines


LISTENING = re.compile(r"fastserve join: .* listening on (\S+):(\d+)")
STATS = re.compile(r"(\d+) prompt tokens(?: \((\d+) cached\))? · (\d+) generated · first token ([\d.]+) s · "
                   r"([\d.]+) tok/s")
TRANSFER = re.compile(r"^(.*): (\d+) tensors from its cache, (\d+) fetched \(([\d.]+) MB\), ready in ([\d.]+) s\s*$")
PLAN_TITLE = re.compile(r"plan: (.+?), about ([\d.]+) ms per token")
PLAN_COLUMNS = ("machine", "address", "free memory", "GFLOP/s", "GB/s", "layers", "est ms/token", "reason")


@dataclass
class Peer:
    machine: Any           # tests.netns.Machine
    cpu: str | None        # core it is pinned to (None: not pinned)
    home: Path | None = None
    proc: subprocess.Popen | None = None
    log: _Lines | None = None
    profile_copy: Path | None = None  # its profile.json from the first start, copied into fresh homes

    @property
    def address(self) -> str:
        return f"{self.machine.ip}:{PORT}"

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.proc.pid) if self.proc is not None and self.proc.poll() is None else 0.0


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSERVE_LOCAL_ONLY", "FASTSERVE_TOKEN")}
    env.update(FASTSERVE_HOME=str(home), FASTSERVE_THREADS="1", PYTHONUNBUFFERED="1",
               COLUMNS="400")  # the plan table on one line per machine, for parsing
    return env


def start_peer(peer: Peer, *, token: str, cap: int, fresh: bool, root: Path, timeout: float) -> None:
    """`fastserve join` in the peer's namespace; returns once it listens (and is announced)."""
    if fresh or peer.home is None:
        peer.home = Path(tempfile.mkdtemp(prefix=f"{peer.machine.name}-", dir=root))
        if peer.profile_copy is not None:
            (peer.home / "cache").mkdir(parents=True)
            shutil.copy(peer.profile_copy, peer.home / "cache" / PROFILE_FILE)
    argv = pinned(peer.cpu, [*FASTSERVE, "join", "--token", token, "--port", str(PORT), "--max-memory", str(cap)])
    peer.proc = peer.machine.popen(argv, env=child_env(peer.home), cwd=REPO, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
    peer.log = _Lines(peer.proc.stderr)
    if peer.log.wait_for(LISTENING, timeout) is None:
        _stop(peer.proc)
        raise BenchError(f"`fastserve join` in {peer.machine.name} did not start listening within {timeout:.0f} s "
                         f"(exit code {peer.proc.poll()}): {peer.log.tail()}")
    if peer.profile_copy is None:
        made = peer.home / "cache" / PROFILE_FILE
        if made.is_file():
            peer.profile_copy = root / f"{peer.machine.name}-profile.json"
            shutil.copy(made, peer.profile_copy)


def stop_peer(peer: Peer) -> None:
    if peer.proc is not None:
        _stop(peer.proc)
        peer.proc = None


# ---------------------------------------------------------------- one `fastserve chat`


@dataclass
class ChatRun:
    setup: str                   # a Setup's label: "1 machine", "2 stages", "tensor x2", ...
    phase: str                   # "cold" | "warm" | "long" (throughput) | "short" (one machine's start)
    argv: list[str]
    wall_s: float = 0.0
    first_output_s: float | None = None   # `fastserve chat` started -> first answer byte on stdout
    prompt_tokens: int | None = None
    generated: int | None = None
    ttft_s: float | None = None           # the stats line: request start -> first token
    decode_tok_s: float | None = None
    plan_est_ms: float | None = None
    plan_layout: str | None = None        # the plan table's title: "tensor-parallel over 2 machines, ..."
    plan: list[dict[str, str]] = field(default_factory=list)      # the plan table's rows (PLAN_COLUMNS)
    transfers: list[dict[str, Any]] = field(default_factory=list)  # per peer: cached, fetched, MB, load s
    wire: dict[str, Any] | None = None    # the host's eth0 while the weights went out
    chat_cpu_s: float = 0.0
    peers_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    answer: str = ""
    problem: str | None = None

    @property
    def noisy(self) -> bool:
        return self.other_cpu_s > NOISE_SHARE * self.wall_s

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prompt_tokens / self.ttft_s if self.prompt_tokens and self.ttft_s else None

    @property
    def bytes_fetched(self) -> int:
        return sum(t["bytes"] for t in self.transfers)

    @property
    def load_mb_s(self) -> float | None:
        """Weights fetched / the longest LoadStage (peers load at once, sharing the host's link)."""
        longest = max((t["load_s"] for t in self.transfers), default=0.0)
        return self.bytes_fetched / 1e6 / longest if self.bytes_fetched and longest else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "noisy": self.noisy, "prefill_tok_s": self.prefill_tok_s,
                "bytes_fetched": self.bytes_fetched, "load_mb_s": self.load_mb_s}


def parse_chat(run: ChatRun, stderr: str) -> None:
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if m := STATS.search(line):
            run.prompt_tokens, run.generated = int(m.group(1)), int(m.group(3))
            run.ttft_s, run.decode_tok_s = float(m.group(4)), float(m.group(5))
        elif m := TRANSFER.match(line.strip()):
            run.transfers.append({"name": m.group(1), "cached": int(m.group(2)), "fetched": int(m.group(3)),
                                  "bytes": round(float(m.group(4)) * 1e6), "load_s": float(m.group(5))})
        elif m := PLAN_TITLE.search(line):
            run.plan_layout, run.plan_est_ms, run.plan = m.group(1), float(m.group(2)), []
            for row in lines[i + 1:]:
                if not row.strip().startswith(("│", "┃", "┏", "┡", "└")):
                    if run.plan:
                        break
                    continue
                cells = [c.strip() for c in row.strip().strip("│").split("│")]
                if len(cells) == len(PLAN_COLUMNS) and row.strip().startswith("│"):
                    run.plan.append(dict(zip(PLAN_COLUMNS, cells)))


def wire_window(samples: list[tuple[float, int]], payload: int, link_bytes_s: float) -> dict[str, Any] | None:
    """How long `payload` bytes took on the host's link: from the first sample where the counter
    rose past TRANSFER_START_BYTES to the first where it rose by `payload` since then; and how
    much of that time the link sat idle (under 10% of its rate: between parts, say)."""
    if payload <= 0 or len(samples) < 2:
        return None
    base = samples[0][1]
    start = next((k for k, (_, b) in enumerate(samples) if b - base > TRANSFER_START_BYTES), None)
    if start is None:
        return None
    t0, b0 = samples[max(0, start - 1)]
    end = next(((t, b) for t, b in samples[start:] if b - b0 >= payload), None)
    if end is None:
        return None
    seconds = end[0] - t0
    window = [(t, b) for t, b in samples if t0 <= t <= end[0]]
    idle = sum(t2 - t1 for (t1, c1), (t2, c2) in itertools.pairwise(window) if c2 - c1 < 0.1 * link_bytes_s * (t2 - t1))
    return {"start_s": t0, "seconds": seconds, "idle_s": idle, "wire_bytes": end[1] - b0, "payload_bytes": payload,
            "mb_s": payload / 1e6 / seconds if seconds > 0 else None}


def run_chat(run: ChatRun, host, *, home: Path, peers: list[Peer], timeout: float,
             watch_tx_of: int | None = None, link_bytes_s: float = 0.0) -> ChatRun:
    """Run `fastserve chat` in the host's namespace; fill `run` from what it printed and how it ran."""
    busy0, _ = _machine_cpu_s()
    self0, children0 = _self_cpu_s(), _children_cpu_s()
    peers0 = sum(p.cpu_s() for p in peers)
    samples: list[tuple[float, int]] = []
    first: list[float] = []
    out_chunks: list[bytes] = []
    t0 = time.perf_counter()
    proc = host.popen(run.argv, env=child_env(home), cwd=REPO, stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)

    def read_stdout() -> None:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            if not first and chunk.strip():
                first.append(time.perf_counter())
            out_chunks.append(chunk)

    err_chunks: list[bytes] = []
    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)]
    if watch_tx_of is not None:
        def sample() -> None:
            while proc.poll() is None:
                nbytes = _tx_bytes(watch_tx_of, host.iface)
                if nbytes is not None:
                    samples.append((time.perf_counter() - t0, nbytes))
                time.sleep(SAMPLE_S)
        readers.append(threading.Thread(target=sample, daemon=True))
    for thread in readers:
        thread.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        run.problem = f"timed out after {timeout:.0f} s"
    for thread in readers:
        thread.join(timeout=10)
    run.wall_s = time.perf_counter() - t0
    run.chat_cpu_s = _children_cpu_s() - children0
    run.peers_cpu_s = sum(p.cpu_s() for p in peers) - peers0
    busy1, _ = _machine_cpu_s()
    ours = run.chat_cpu_s + run.peers_cpu_s + (_self_cpu_s() - self0)
    run.other_cpu_s = max(0.0, busy1 - busy0 - ours)
    stderr = b"".join(err_chunks).decode(errors="replace")
    run.answer = b"".join(out_chunks).decode(errors="replace").strip()
    if first:
        run.first_output_s = first[0] - t0
    parse_chat(run, stderr)
    if run.problem is None and (proc.returncode != 0 or run.decode_tok_s is None):
        tail = " | ".join(line.strip() for line in stderr.splitlines()[-3:] if line.strip())
        run.problem = f"exit code {proc.returncode}: {tail or 'no output'}"
    if watch_tx_of is not None:
        run.wire = wire_window(samples, run.bytes_fetched, link_bytes_s)
        if run.wire is not None and samples:  # the curve, to see gaps between parts: [s since start, bytes sent]
            run.wire["curve"] = [[round(t, 3), b - samples[0][1]] for t, b in samples]
    return run


# ---------------------------------------------------------------- the benchmark


@dataclass
class Bench:
    args: argparse.Namespace
    lan: Any                  # tests.netns.Lan
    host_cpu: str | None
    peers: list[Peer]
    root: Path                # every FASTSERVE_HOME of this run
    model: Path
    shape: dict[str, Any]
    token: str
    say: Any
    runs: list[ChatRun] = field(default_factory=list)
    anchor_pid: int | None = None  # a process inside the host's namespace: its /proc/PID/net/dev is m0's

    @property
    def host(self):
        return self.lan[0]

    @property
    def host_home(self) -> Path:
        return self.root / "host"

    def caps(self, setup: Setup) -> tuple[int | None, int]:
        """(host cap, peer cap): for a pipeline, room for an even share of the layers each
        (+ embedding / head), so the model fits only when spread (when the shares are below the
        whole); other layouts (and --no-caps): no host cap, peers as much as they have."""
        if setup.layout != "pipeline" or not self.args.caps:
            return None, 64 * 2**40
        stages = setup.machines
        s = self.shape
        per_layer = max(s["layer_bytes"]) + s["kv_bytes_per_layer"]
        share = math.ceil(s["n_layers"] / stages) * per_layer
        pad = lambda n: int(n * (1 + CAP_SLACK)) + CAP_SLACK_BYTES
        return pad(s["embed_bytes"] + share), pad(s["head_bytes"] + share)

    def chat_argv(self, setup: Setup, prompt: str, max_tokens: int) -> list[str]:
        a = self.args
        argv = [*FASTSERVE, "chat", str(self.model), "-p", prompt, "--temperature", "0", "--max-tokens",
                str(max_tokens), "--ctx", str(a.ctx)]
        if setup.machines == 1:
            argv.append("--local-only")
        else:
            host_cap, _ = self.caps(setup)
            argv += ["--token", self.token, "--peers", str(setup.machines - 1), "--layout", setup.layout,
                     "--wait", str(a.wait)]
            if setup.layout == "pipeline":
                argv += ["--min-stages", str(setup.machines)]
            if host_cap is not None:
                argv += ["--max-memory", str(host_cap)]
            if a.discovery == "static":
                for peer in self.peers[:setup.machines - 1]:
                    argv += ["--peer", peer.address]
        return pinned(self.host_cpu, argv)

    def measured(self, setup: Setup, phase: str, prompt: str, max_tokens: int, *,
                 before=None, watch: bool = False) -> ChatRun:
        """One chat run when the machine is quiet; again (at most --retries times) if it was not."""
        best: ChatRun | None = None
        for attempt in range(1 + self.args.retries):
            if before is not None:
                before()
            wait_for_quiet(self.args.quiet_wait, self.say)
            run = run_chat(ChatRun(setup.label, phase, self.chat_argv(setup, prompt, max_tokens)), self.host,
                           home=self.host_home, peers=[p for p in self.peers if p.proc is not None],
                           timeout=self.args.timeout, watch_tx_of=self.anchor_pid if watch else None,
                           link_bytes_s=self.args.link_bytes_s)
            if best is None or (run.problem is None and (best.problem is not None or
                                                         run.other_cpu_s / run.wall_s < best.other_cpu_s / best.wall_s)):
                best = run
            if run.problem is not None or not run.noisy or attempt == self.args.retries:
                break
            self.say(f"  other processes used {run.other_cpu_s:.1f} CPU s during that {run.wall_s:.1f} s run; "
                     "measuring again", "yellow")
        assert best is not None
        self.runs.append(best)
        self.say("  " + describe_run(best), "red" if best.problem else "")
        return best

    def start_peers(self, setup: Setup, *, fresh: bool) -> None:
        _, cap = self.caps(setup)
        for peer in self.peers[:setup.machines - 1]:
            stop_peer(peer)
            start_peer(peer, token=self.token, cap=cap, fresh=fresh, root=self.root, timeout=self.args.timeout)

    def stop_peers(self) -> None:
        for peer in self.peers:
            stop_peer(peer)


def describe_run(run: ChatRun) -> str:
    if run.problem:
        return f"{run.setup} {run.phase}: {run.problem}"
    bits = [f"{run.setup} {run.phase}:"]
    if run.first_output_s is not None:
        bits.append(f"start->first token {run.first_output_s:.2f} s,")
    bits.append(f"{run.prompt_tokens} prompt tokens, first token {run.ttft_s:.2f} s, {run.generated} generated "
                f"at {run.decode_tok_s:.1f} tok/s")
    if run.bytes_fetched:
        bits.append(f"· {run.bytes_fetched / 1e6:.1f} MB fetched")
        if run.wire and run.wire.get("mb_s"):
            bits.append(f"in {run.wire['seconds']:.2f} s on the wire ({run.wire['mb_s']:.0f} MB/s; link idle "
                        f"{run.wire['idle_s']:.2f} s of it)")
        if run.load_mb_s:
            bits.append(f"· load {run.load_mb_s:.0f} MB/s")
    if run.plan:
        bits.append("· layers " + ", ".join(p["layers"] for p in run.plan))
    if run.noisy:
        bits.append(f"(noisy: others used {run.other_cpu_s:.1f} CPU s)")
    return " ".join(bits)


def measure_setup(b: Bench, setup: Setup) -> None:
    a = b.args
    long_prompt = b.shape["long_prompt"]
    if setup.machines == 1:
        b.say(f"{setup.label}: start to first token ({a.repeats}x), then throughput ({a.repeats}x)")
        for _ in range(a.repeats):
            b.measured(setup, "short", SHORT_PROMPT, SHORT_TOKENS)
        for _ in range(a.repeats):
            b.measured(setup, "long", long_prompt, a.gen_tokens)
        return
    b.say(f"{setup.label}: cold starts ({a.cold_repeats}x, peers with empty caches)")
    for _ in range(a.cold_repeats):
        b.measured(setup, "cold", SHORT_PROMPT, SHORT_TOKENS, watch=True,
                   before=lambda: b.start_peers(setup, fresh=True))
    b.say(f"{setup.label}: warm starts ({a.repeats}x, peers restarted with their caches)")
    for _ in range(a.repeats):
        b.measured(setup, "warm", SHORT_PROMPT, SHORT_TOKENS, before=lambda: b.start_peers(setup, fresh=False))
    b.say(f"{setup.label}: throughput ({a.repeats}x)")
    for _ in range(a.repeats):
        b.measured(setup, "long", long_prompt, a.gen_tokens)
    b.stop_peers()


# ---------------------------------------------------------------- summary and report


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[ChatRun], args: argparse.Namespace) -> list[dict[str, Any]]:
    link_mb_s = args.link_bytes_s / 1e6
    rows = []
    single_ms = single_prefill = None
    for setup in SETUPS.values():
        stages = setup.stages
        mine = [r for r in runs if r.setup == setup.label and r.problem is None]
        if not any(r.setup == setup.label for r in runs):
            continue
        long = [r for r in mine if r.phase == "long"]
        cold = [r for r in mine if r.phase == "cold"]
        warm = [r for r in mine if r.phase in ("warm", "short")]
        decode = _median([r.decode_tok_s for r in long])
        ms = 1000 / decode if decode else None
        prefill = _median([r.prefill_tok_s for r in long])
        if setup.machines == 1:
            single_ms, single_prefill = ms, prefill
        hops = stages  # the design's: S - 1 going out, 1 back from the last peer (0: not a pipeline)
        crossings = 2 * (stages - 1) if RELAYED_BY_HOST and stages else hops
        extra = ms - single_ms if ms is not None and single_ms is not None else None
        overhead = extra / hops if hops and extra is not None else None
        wire = _median([r.wire["mb_s"] for r in cold if r.wire and r.wire.get("mb_s")])
        plan = next((r.plan for r in reversed(long) if r.plan), [])
        rows.append({
            "setup": setup.label, "machines": setup.machines, "layout": setup.layout, "stages": stages,
            "chosen": next((r.plan_layout for r in reversed(long) if r.plan_layout), None),
            "hops_per_token": hops, "links_crossed_per_token": crossings,
            "overhead_ms_per_link_crossed": extra / crossings if crossings and extra is not None else None,
            "layers": [p["layers"] for p in plan] or ([f"0-{args.n_layers - 1}"] if setup.machines == 1 else []),
            "prefill_tok_s": prefill,
            "decode_x_one": single_ms / ms if single_ms and ms else None,
            "prefill_x_one": prefill / single_prefill if prefill and single_prefill else None,
            "prompt_tokens": _median([r.prompt_tokens for r in long]),
            "decode_tok_s": decode, "generated": _median([r.generated for r in long]), "ms_per_token": ms,
            "overhead_ms_per_hop": overhead,
            "overhead_pass": None if overhead is None else overhead <= OVERHEAD_GOAL_MS,
            "cold_start_s": _median([r.first_output_s for r in cold]),
            "warm_start_s": _median([r.first_output_s for r in warm]),
            "warm_start_pass": None if setup.machines == 1 or not warm else
            _median([r.first_output_s for r in warm]) <= WARM_START_GOAL_S,
            "bytes_fetched_cold": _median([r.bytes_fetched for r in cold]),
            "bytes_fetched_warm": _median([r.bytes_fetched for r in mine if r.phase == "warm"]),
            "transfer_mb_s": wire, "transfer_link_share": wire / link_mb_s if wire else None,
            "transfer_pass": None if wire is None else wire / link_mb_s >= TRANSFER_GOAL_SHARE,
            "load_mb_s": _median([r.load_mb_s for r in cold]),
            "noisy": {phase: any(r.noisy for r in mine if r.phase == phase) for phase in ("long", "cold", "warm", "short")},
            "runs": {phase: len([r for r in mine if r.phase == phase]) for phase in ("long", "cold", "warm", "short")},
            "failed_runs": len([r for r in runs if r.setup == setup.label and r.problem]),
        })
    return rows


def _secs(x: float | None, noisy: bool = False) -> str:
    return "n/a" if x is None else f"{x:.2f} s" + ("*" if noisy else "")


def _crossed(r: dict[str, Any]) -> str:
    if r["links_crossed_per_token"] == r["hops_per_token"] or r["overhead_ms_per_link_crossed"] is None:
        return ""
    return f"; {r['overhead_ms_per_link_crossed']:+.2f} x {r['links_crossed_per_token']} links as routed"


def _goal(passed: bool | None) -> str:
    return "" if passed is None else (" pass" if passed else " FAIL")


def table_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    header = ["setup", "layers", f"prefill tok/s (pp{args.prompt_tokens})", f"decode tok/s (tg{args.gen_tokens})",
              "x one machine (prefill / decode)", "ms/token", f"overhead ms/hop (<= {OVERHEAD_GOAL_MS:g})", "start->1st tok cold",
              f"start->1st tok warm (<= {WARM_START_GOAL_S:g} s)", "weights sent cold (warm)",
              f"transfer MB/s, % of link (>= {TRANSFER_GOAL_SHARE:.0%})", "peer load MB/s"]
    body = []
    for r in rows:
        noisy = r["noisy"]
        overhead = r["overhead_ms_per_hop"]
        wire, share = r["transfer_mb_s"], r["transfer_link_share"]
        sent = "n/a" if r["bytes_fetched_cold"] is None else f"{r['bytes_fetched_cold'] / 1e6:.1f} MB"
        if r["bytes_fetched_warm"] is not None:
            sent += f" ({r['bytes_fetched_warm'] / 1e6:.1f} MB)"
        one = r.get("machines", r["stages"]) == 1  # reports from before --setups: stages 1 = one machine
        ratios = "-" if one or r.get("decode_x_one") is None else \
            f"{r['prefill_x_one']:.2f}x / {r['decode_x_one']:.2f}x" if r.get("prefill_x_one") else \
            f"n/a / {r['decode_x_one']:.2f}x"
        setup = r["setup"] + (f" (chose: {r['chosen']})" if r.get("layout") == "auto" and r.get("chosen") else "")
        body.append([
            setup, ", ".join(r["layers"]) or "n/a",
            _rate(r["prefill_tok_s"], noisy["long"]), _rate(r["decode_tok_s"], noisy["long"]), ratios,
            "n/a" if r["ms_per_token"] is None else f"{r['ms_per_token']:.2f}",
            "-" if not r["hops_per_token"] else ("n/a" if overhead is None else
                                           f"{overhead:+.2f} ({r['hops_per_token']} hops){_goal(r['overhead_pass'])}"
                                           + _crossed(r)),
            "-" if one else _secs(r["cold_start_s"], noisy["cold"]),
            _secs(r["warm_start_s"], noisy["warm"] or noisy["short"]) + _goal(r["warm_start_pass"]),
            "-" if one else sent,
            "-" if one else ("n/a" if wire is None else
                                          f"{_rate(wire, noisy['cold'])} ({share:.0%}){_goal(r['transfer_pass'])}"),
            "-" if one else _rate(r["load_mb_s"], noisy["cold"]),
        ])
    return header, body


def caption(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    pins = s["pinning"]
    return (
        f"{m['cpu']}, {m['cores']} cores; fastserve {results['fastserve']['commit']}"
        f"{' (dirty)' if results['fastserve']['dirty'] else ''}; {results['model']['name']}. "
        f"Namespace LAN, every link {s['link_rate']} (tc tbf); discovery {s['discovery']}; FASTSERVE_THREADS=1 "
        f"everywhere; {pins}. Medians of {s['repeats']} runs ({s['cold_repeats']} cold). Prefill = "
        f"{s.get('prompt_tokens_actual', s['prompt_tokens'])}-token prompt (chat template included) to first token; decode = up to "
        f"{s['gen_tokens']} greedy tokens after it. Overhead per hop = (ms/token - one machine's) / hops, a token "
        f"crossing S links in S stages by design{_routing_note(s)}. start->1st tok = `fastserve chat` started to the first answer byte, "
        f"{s.get('short_prompt_tokens', '?')}-token prompt (one machine: its own start). Transfer = bytes the peers fetched "
        f"/ time they took on the host's link (its eth0 counter); peer load = bytes / LoadStage seconds (adds "
        f"hashing, disk cache, building the stage). * = other processes used over {NOISE_SHARE:.0%} of a core.")


def _routing_note(s: dict[str, Any]) -> str:
    if not s.get("relayed_by_host"):
        return ""
    return ("; today the host relays the hidden states between peers, so a token crosses 2(S-1) links: "
            "'as routed' divides by those")


def print_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = table_rows(results["rows"], args)
    table = Table(title="fastserve cluster vs one machine", caption=caption(results), caption_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: 80 columns would fold every cell
        console = Console(width=240)
    console.print(table)
    print("\nMarkdown:\n")
    print(caption(results) + "\n")
    print(markdown(header, body))
    for problem in results["problems"]:
        print(f"\n- {problem}")
    print(f"\nJSON: {args.json_out}")


def report_only(args: argparse.Namespace) -> int:
    results = json.loads(args.report.read_text())
    s = results["settings"]
    args.prompt_tokens, args.gen_tokens, args.json_out = s["prompt_tokens"], s["gen_tokens"], args.report
    print_report(results, args)
    return 0


# ---------------------------------------------------------------- main


def parse_rate(text: str) -> float:
    """tc's rate syntax ('1gbit', '100mbit', '500kbit') -> bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", text.strip().lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate like 1gbit or 100mbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file for the host (default: smollm2-135m from the model cache)")
    parser.add_argument("--setups", "--stages", dest="setups", default="1,2,3,t2,a2",
                        help="setups to measure: 1 = one machine, 2 and 3 = pipeline stages, t2 / t3 = "
                             "tensor-parallel over 2 / 3 machines, a2 = 2 machines, the planner's choice")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (warm starts, throughput); median")
    parser.add_argument("--cold-repeats", type=int, help="cold starts per setup (default: --repeats)")
    parser.add_argument("--prompt-tokens", type=int, default=400, help="long prompt, chat template included")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=1024, help="--ctx of every chat (the long prompt + answer fit)")
    parser.add_argument("--link-rate", default="1gbit", help="tc tbf rate of every link")
    parser.add_argument("--discovery", choices=("mdns", "static"), default="mdns",
                        help="mdns: the host finds the peers; static: `chat --peer IP:PORT`")
    parser.add_argument("--wait", type=float, default=10.0, help="chat --wait: seconds to look for the peers")
    parser.add_argument("--no-caps", dest="caps", action="store_false",
                        help="no --max-memory caps (--min-stages alone forces the spread; the split is the planner's)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the machines to cores")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per chat run or peer start")
    parser.add_argument("--retries", type=int, default=1,
                        help="measure a run again when other processes used the CPU meanwhile (at most this often)")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="seconds to wait, before each run, for other processes to leave the CPU alone")
    parser.add_argument("--keep", action="store_true", help="keep the machines' FASTSERVE_HOME folders (printed)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the table of an earlier run's JSON; measure nothing")
    parser.add_argument("--json-out", type=Path,
                        default=REPO / "bench" / "results" / f"cluster-{datetime.now():%Y-%m-%dT%H%M%S}.json")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    if not keys or not set(keys) <= set(SETUPS):
        parser.error(f"--setups {args.setups!r}: choose among {','.join(SETUPS)}")
    args.setup_list = [SETUPS[k] for k in SETUPS if k in keys]
    args.cold_repeats = args.repeats if args.cold_repeats is None else args.cold_repeats
    for flag, value in (("--repeats", args.repeats), ("--cold-repeats", args.cold_repeats),
                        ("--prompt-tokens", args.prompt_tokens), ("--gen-tokens", args.gen_tokens)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.retries < 0 or args.quiet_wait < 0:
        parser.error("--retries and --quiet-wait must be 0 or more")
    if args.prompt_tokens + args.gen_tokens + 8 > args.ctx:
        parser.error(f"--ctx {args.ctx} cannot hold a {args.prompt_tokens}-token prompt and {args.gen_tokens} tokens")
    try:
        args.link_bytes_s = parse_rate(args.link_rate)
    except argparse.ArgumentTypeError as err:
        parser.error(f"--link-rate: {err}")
    return args


def unavailable(what: str = "this benchmark", command: str = "") -> str | None:
    """Why the namespace LAN cannot be built here (None: it can). `command`: how to run again."""
    if os.geteuid() != 0:
        command = command or f"{sys.executable} {Path(__file__).relative_to(REPO)}"
        return (f"{what} builds a LAN of network namespaces (ip netns, veth, a bridge, tc): it needs root. "
                f"Run it as root, e.g. `sudo {command}`")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} (iproute2) not found: install iproute2"
    try:
        import pytest  # noqa: F401  (tests/netns.py is written for the test suite and imports it)
    except ImportError:
        return f"tests/netns.py needs pytest in this Python ({sys.executable}); use the project's dev environment"
    return None


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape

    args = parse_args(argv)
    if args.report is not None:
        return report_only(args)
    err = Console(stderr=True)
    if (why := unavailable()) is not None:
        err.print(f"[bold red]error:[/] {escape(why)}", highlight=False)
        return 2
    from tests import netns

    say = progress(err)

    try:
        model = args.model if args.model is not None else smollm2_path()
    except BenchError as problem:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
        return 1
    if not model.is_file():
        err.print(f"[bold red]error:[/] no model file at {escape(str(model))}", highlight=False)
        return 1

    cores = sorted(os.sched_getaffinity(0))
    n_machines = max(s.machines for s in args.setup_list)
    if not args.pin or shutil.which("taskset") is None:
        cpus, pinning = [None] * n_machines, "not pinned (" + ("--no-pin" if not args.pin else "no taskset") + ")"
    else:
        cpus = [str(cores[i % len(cores)]) for i in range(n_machines)]
        shared = [f"m{i}" for i in range(n_machines) if cpus.count(cpus[i]) > 1]
        where = ", ".join(f"m{i} on cpu {c}" for i, c in enumerate(cpus))
        pinning = (f"each machine on its own core ({where})" if not shared else
                   f"{len(cores)} usable cores, so {' and '.join(shared)} share one ({where})")
    root = Path(tempfile.mkdtemp(prefix="fastserve-bench-cluster-"))
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": cores, "platform": platform.platform()},
        "fastserve": {"commit": _git("rev-parse", "--short", "HEAD") or "?", "dirty": bool(_git("status", "--porcelain"))},
        "settings": {"setups": [s.key for s in args.setup_list], "repeats": args.repeats, "cold_repeats": args.cold_repeats,
                     "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "ctx": args.ctx,
                     "link_rate": args.link_rate, "link_bytes_s": args.link_bytes_s, "discovery": args.discovery,
                     "caps": args.caps, "wait_s": args.wait, "threads": 1, "pinning": pinning,
                     "relayed_by_host": RELAYED_BY_HOST,
                     "cpus": {f"m{i}": c for i, c in enumerate(cpus)}, "short_prompt": SHORT_PROMPT,
                     "short_tokens": SHORT_TOKENS},
        "goals": {"overhead_ms_per_hop": OVERHEAD_GOAL_MS, "transfer_link_share": TRANSFER_GOAL_SHARE,
                  "warm_start_s": WARM_START_GOAL_S},
        "model": {"path": str(model), "name": model.name},
        "rows": [], "runs": [], "problems": [],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)

    setup_problems: list[str] = []  # a setup that could not be measured at all (peers did not start, ...)

    def save(b: Bench | None) -> None:
        if b is not None:
            results["runs"] = [r.as_dict() for r in b.runs]
            results["rows"] = summarize(b.runs, args)
        runs = b.runs if b is not None else []
        results["problems"] = setup_problems + [f"{r.setup} {r.phase}: {r.problem}" for r in runs if r.problem]
        args.json_out.write_text(json.dumps(results, indent=2))

    bench: Bench | None = None
    try:
        say(f"model {model}; preparing the host (model shape, prompt, profile, manifest)")
        host_home = root / "host"
        host_home.mkdir()
        spec = {"model": str(model), "ctx": args.ctx, "prompt_tokens": args.prompt_tokens}
        done = subprocess.run(pinned(cpus[0], [sys.executable, str(Path(__file__).resolve()), "_worker", "prepare",
                                              json.dumps(spec)]),
                              capture_output=True, text=True, env=child_env(host_home), cwd=REPO,
                              timeout=args.timeout, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            tail = " | ".join(line.strip() for line in done.stderr.splitlines()[-3:] if line.strip())
            raise BenchError(f"preparing the model failed (exit code {done.returncode}): {tail or 'no output'}")
        shape = json.loads(lines[-1])
        args.n_layers = shape["n_layers"]
        results["model"].update({k: shape[k] for k in ("n_layers", "file_bytes", "embed_bytes", "head_bytes",
                                                       "kv_bytes_per_layer", "tied_embeddings", "hidden_bytes")})
        results["model"]["layer_bytes"] = shape["layer_bytes"]
        results["settings"]["prompt_tokens_actual"] = shape["long_prompt_tokens"]
        results["settings"]["short_prompt_tokens"] = shape["short_prompt_tokens"]
        results["settings"]["long_prompt"] = shape["long_prompt"]

        with netns.lan(n_machines) as lan:
            for machine in lan:
                netns.limit_link(machine, rate=args.link_rate)
            anchor = lan[0].popen(["sleep", "1d"], stdin=subprocess.DEVNULL)  # its /proc/PID/net/dev is m0's
            from fastserve_edge.cluster.auth import new_token

            bench = Bench(args=args, lan=lan, host_cpu=cpus[0],
                          peers=[Peer(lan[i], cpus[i]) for i in range(1, n_machines)], root=root, model=model,
                          shape=shape, token=new_token(), say=say)
            bench.anchor_pid = anchor.pid
            results["settings"]["caps"] = {s.key: dict(zip(("host", "peer"), bench.caps(s)))
                                           for s in args.setup_list if s.stages > 1} if args.caps else False
            say(f"LAN of {n_machines} namespaces ({lan.subnet}), links {args.link_rate}; {pinning}")
            for setup in args.setup_list:
                try:
                    measure_setup(bench, setup)
                except BenchError as problem:
                    setup_problems.append(f"{setup.label}: {problem}")
                    say(str(problem), "red")
                    bench.stop_peers()
                save(bench)
            bench.stop_peers()
    except BenchError as problem:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
        setup_problems.append(str(problem))
        save(bench)
        return 1
    finally:
        if args.keep:
            say(f"homes kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    save(bench)
    print_report(results, args)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
