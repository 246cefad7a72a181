"""Load on `fastserve serve` beside llama.cpp's own `llama-server`; structured output; fcfs against mlfq.

    python bench/serve.py                               # every phase, both models, 1,4,8,16 sessions x 30 s
    python bench/serve.py --models smollm2 --sessions 1,8 --duration 60
    python bench/serve.py --phases scheduler --rate 1.5 --requests 80 --seeds 7,8,9
    python bench/serve.py --skip-llama-server           # serve alone (never builds llama.cpp)
    sudo python bench/serve.py --cluster                # serve alone, on the 2-peer namespace LAN
    python bench/serve.py --report bench/results/serve-<timestamp>.json   # the tables again; measures nothing

Every serve run starts the real server, `fastserve serve GGUF --host 127.0.0.1 --port 0
--max-sessions N --scheduler S --threads T --ctx X` (+ --local-only on one machine: it never
looks for peers), waits for its `serving NAME on URL` line, drives it with a load generator
(this same file in `_client` mode: aiohttp, streaming `POST /v1/chat/completions` at temperature
0 with `stream_options.include_usage`), and stops it with SIGTERM. A llama-server run starts
`llama-server -m GGUF -t T -np C --cont-batching -c C*X --host 127.0.0.1 --port P`, waits
for its /health, and is driven by the same client with the same requests. Per request the
client records when it arrived, its first content token, its `data: [DONE]`, and the prompt
and completion tokens of the usage chunk; every figure below comes from those raw records (in
the JSON too).

- concurrency: for each model (--models: SmolLM2-135M Q4_1 from the project's model cache, the
  1B-shaped Q4_0 that bench/vs_llamacpp.py makes) and each C (--sessions, default 1,4,8,16),
  llama-server and then serve, each under a closed loop of C sessions sending back-to-back
  requests of one medium shape (a ~60-token prompt asking for a long story, --max-tokens with
  `ignore_eos`, so both engines generate the same number of tokens) for --duration seconds,
  after one warm-up round of C small requests; serve runs with --max-sessions C and fcfs,
  llama-server with C slots. Aggregate tokens/s = completion tokens of every timed request /
  (first send -> last completion; requests in flight at the deadline finish). Goals (issue 24):
  at every C, serve's aggregate tok/s >= 1.0x llama-server's, and serve's p99 TTFT <= its.
- structured: serve at --structured-sessions (8) sessions, the same closed loop with a prompt
  asking for the story as JSON, once free and once with `response_format` json_schema (strict;
  the story string has a minLength longer than --max-tokens, so the grammar never ends an
  answer early). Goal: the grammar costs <= 10% of the aggregate tok/s.
- scheduler: an open loop on the first model, --requests Poisson arrivals at --rate per second,
  drawn per seed (--seeds, five by default) from a mix: 70% short chats (a one-line question,
  max_tokens 16-48) and 30% long answers (a passage of 40-260 words to continue, max_tokens
  128-256). The same arrivals and requests go to a server with --scheduler fcfs and to one
  with mlfq, both with --max-sessions (4). JCT = arrival -> last token ([DONE]); TTFT = arrival
  -> first content token. Goals, on the median over the seeds: mlfq cuts the mean JCT by
  >= 1.5x against fcfs, and its p99 JCT is at most 1.10x fcfs's.

llama-server is built once from the llama-cpp-python sdist bench/vs_llamacpp.py uses (its
vendor/llama.cpp carries tools/server): `pip download --no-binary :all: --no-deps`, extracted,
`cmake` with vs_llamacpp's native CPU flags plus the server's, target llama-server, into
${XDG_CACHE_HOME:-~/.cache}/fastserve-bench/llama-server-src/ (never the repository), with a
stamp file of the source and cmake arguments. A finished build there is reused; one made by
hand with the same flags is adopted when its CMakeCache.txt agrees.

Temperature 0 means the model may end an answer before max_tokens in the scheduler phase
(no ignore_eos there): prompts ask for long answers where the shape should be long, max_tokens
caps them, and the tables report the tokens actually generated. p99 interpolates between order
statistics (numpy's default): with 40 requests it sits close to the maximum.

--cluster needs root: it builds tests/netns.py's LAN (namespaces m0, m1, m2 on a bridge, every
eth0 shaped to 1 Gbit/s as bench/cluster.py does), runs `fastserve join --token T` in m1 and
m2, `fastserve serve MODEL --token T --peers 2 --host 127.0.0.1 ...` in m0, and the client in
m0 too (`ip netns exec`: the server listens on m0's loopback). No llama-server there.

Noise: before each run the driver waits (--quiet-wait) until the rest of the machine uses
under 10% of a core, and counts what it used during the run (/proc/stat minus the server's,
peers' and client's CPU): a disturbed run is marked * (not repeated: runs are long).

Results: Rich tables and a markdown copy on stdout, JSON in --json-out (default
bench/results/serve-<timestamp>.json, gitignored), rewritten after every run.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
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
    BUILD_JOBS,
    BUILD_TIMEOUT_S,
    LLAMA_CPP_SOURCE,
    NATIVE_WITHOUT_AMX,
    NOISE_SHARE,
    BenchError,
    PreparedModel,
    _cpu_flags,
    _describe,
    _gcc_major,
    _git,
    _machine_cpu_s,
    _rate,
    bench_cache,
    cmake_args,
    markdown,
    prepare_1b,
    progress,
    smollm2_path,
    wait_for_quiet,
)
from bench.vs_llamacpp import MODELS as BENCH_MODELS  # noqa: E402

PHASES = ("concurrency", "structured", "scheduler")
ENGINES = ("llama-server", "serve")   # the order of a concurrency pair: theirs first, then ours
MODELS = ("smollm2", "1b-q4_0")        # keys of bench/vs_llamacpp.py's MODELS
SCHEDULERS = ("fcfs", "mlfq")
SEEDS = (1, 2, 3, 4, 5)
CONCURRENCY_GOAL_SESSIONS = 8
CONCURRENCY_GOAL_RATIO = 4.0   # serve's aggregate tok/s at 8 sessions / at 1 (an earlier issue's goal)
VS_GOAL_RATIO = 1.0            # serve's aggregate tok/s / llama-server's, at least, at every C
STRUCTURED_SESSIONS = 8
STRUCTURED_GOAL = 0.10         # aggregate tok/s lost to json_schema, at most
MEAN_JCT_GOAL = 1.5            # fcfs mean JCT / mlfq mean JCT (median over seeds), at least
P99_JCT_GOAL = 1.10            # mlfq p99 JCT / fcfs p99 JCT (median over seeds), at most
SESSION_CTX = 1024             # per-session context of both engines: a medium request needs ~160, a long one ~700
LINK_RATE = "1gbit"            # --cluster: tc tbf rate of every link, as bench/cluster.py's default
CLUSTER_PEERS = 2
SERVING = re.compile(r"^serving (\S+) on (http://\S+/v1)\s*$")

# The medium shape of the concurrency phase: about 30 words + the chat template's ~30 tokens.
# Every request of a run asks for another story (topic x hero: 64 prompts), so the server's
# prompt cache finds what real traffic shares (the template's system prompt, the opening
# words), never a whole prompt it has seen before.
MEDIUM_MAX_TOKENS = 96        # as issue 24's table (--max-tokens)
MEDIUM_PROMPT = ("Write a long, detailed story about {topic}, whose hero is called {hero}. Describe the places, "
                 "the people and what they say to each other, and do not stop early.")
TOPICS = ("a lighthouse keeper", "a dragon who learns to cook", "a lost robot", "two rival bakers",
          "a city under the sea", "a clockmaker's apprentice", "a night train", "a garden on the moon")
HEROES = ("Ada", "Bruno", "Chioma", "Dmitri", "Elena", "Farid", "Grace", "Hiro")
WARMUP_MAX_TOKENS = 8

# The structured phase: the same stories asked for as JSON, with and without the schema
# enforced. The story's minLength (characters) is above what --max-tokens tokens can write, so
# with the schema every answer runs to max_tokens as the free one does with ignore_eos.
JSON_PROMPT = ("Write a long, detailed story about {topic}, whose hero is called {hero}, as a JSON object with a "
               "\"title\" and a \"story\". Describe the places, the people and what they say to each other.")
STORY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "story"],
                "properties": {"title": {"type": "string", "maxLength": 80},
                               "story": {"type": "string", "minLength": 4000}}}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "strict": True, "schema": STORY_SCHEMA}}

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


async def send(http, url: str, model: str, spec: RequestSpec, clock, record: Record,
               extra: dict[str, Any] | None = None) -> Record:
    """One streaming chat completion; fills `record` from the SSE events. `extra`: more body
    fields (ignore_eos, response_format), the same for every request of a run."""
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": spec.prompt}], "stream": True,
            "temperature": 0, "max_tokens": spec.max_tokens, "stream_options": {"include_usage": True},
            **(extra or {})}
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
            if resp.status != 200:  # llama-server without --metrics
                return {}
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


async def warm_up(http, url: str, model: str, n: int, extra: dict[str, Any]) -> None:
    """n small requests at once: the batched path (and the grammar's, with extra) warm before anything is timed."""
    specs = [RequestSpec("warmup", SHORT_PROMPTS[i % len(SHORT_PROMPTS)], WARMUP_MAX_TOKENS) for i in range(n)]
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    done = await asyncio.gather(*(send(http, url, model, s, clock, Record(s.kind, s.max_tokens, 0.0), extra)
                                  for s in specs))
    if failed := [r.error for r in done if r.error]:
        raise BenchError(f"the warm-up request failed: {failed[0]}")


async def closed_loop(http, url: str, model: str, *, sessions: int, duration_s: float, clock, prompt: str = MEDIUM_PROMPT,
                      max_tokens: int = MEDIUM_MAX_TOKENS, extra: dict[str, Any] | None = None) -> list[Record]:
    """`sessions` sessions sending medium requests back to back until `duration_s`; the ones
    in flight at the deadline finish and count."""
    records: list[Record] = []

    async def session(i: int) -> None:
        n = 0
        while clock() < duration_s:
            k = i + n * sessions  # this request's number in the run: another story every time
            topic, hero = TOPICS[k % len(TOPICS)], HEROES[k // len(TOPICS) % len(HEROES)]
            spec = RequestSpec("medium", prompt.format(topic=topic, hero=hero), max_tokens)
            record = Record(spec.kind, spec.max_tokens, arrival_s=clock(), session=i)
            records.append(await send(http, url, model, spec, clock, record, extra))
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
    # A connection per request, for both engines: llama-server (cpp-httplib) may close a kept-alive
    # connection after a stream while aiohttp reuses it ("Can not write request body"); on loopback a
    # new connection costs well under a millisecond.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        extra = job.get("extra") or {}
        await warm_up(http, url, model, job["warmup"], extra)
        before = await server_counters(http, url)
        t0 = time.perf_counter()
        clock = lambda: time.perf_counter() - t0  # noqa: E731
        if job["mode"] == "closed":
            records = await closed_loop(http, url, model, sessions=job["sessions"], duration_s=job["duration_s"],
                                        clock=clock, prompt=job.get("prompt", MEDIUM_PROMPT),
                                        max_tokens=job.get("max_tokens", MEDIUM_MAX_TOKENS), extra=extra)
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


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class BenchModel:
    key: str        # "smollm2" | "1b-q4_0" | --model's argument
    label: str      # "SmolLM2-135M Q4_1": the table's name for it
    path: Path | None  # None: serve's default model (only `--cluster` without --model)


def prepare_models(args: argparse.Namespace, say) -> list[BenchModel]:
    """--model as it is, else each of --models as bench/vs_llamacpp.py finds or makes it (never quantized
    with llama.cpp here: the 1B Q4_0 is its gguf-py pure file unless llama.cpp's is already cached)."""
    if args.model:
        path = Path(args.model)
        return [BenchModel(args.model, path.name if path.is_file() else args.model,
                           path if path.is_file() else resolve_model(args.model))]
    smollm2 = smollm2_path()
    out = []
    for key in args.model_list:
        spec = BENCH_MODELS[key]
        if key == "smollm2":
            prepared = _describe(PreparedModel(spec, smollm2))
        else:
            prepared = prepare_1b(spec, cache=bench_cache(), tokenizer_from=smollm2, llama=None, say=say)
        if prepared.path is None:
            raise BenchError(f"{key}: {prepared.problem}")
        out.append(BenchModel(key, f"{spec.label} {prepared.quant}", prepared.path))
    return out


def resolve_model(ref: str) -> Path:
    """serve's MODEL argument (an alias, hf:..., ollama:...) -> the local file both engines open."""
    from fastserve_edge.errors import FastServeError
    from fastserve_edge.models.registry import resolve
    from fastserve_edge.settings import load_settings

    try:
        return resolve(ref, load_settings(), pull_missing=True).path
    except FastServeError as err:
        raise BenchError(f"cannot get {ref}: {err}") from None


# ---------------------------------------------------------------- llama-server: built once from the sdist

# Beside the CPU flags of bench/vs_llamacpp.py's build: no GPU, no network, the server and nothing else.
SERVER_CMAKE_FLAGS = (
    "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF", "-DGGML_BLAS=OFF", "-DGGML_RPC=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
)
SERVER_TARGET = "llama-server"
SERVER_STAMP = "fastserve-bench.json"
DOWNLOAD_TIMEOUT_S = 900


def server_cmake_args(cpu_flags: set[str], gcc_major: int | None) -> list[str]:
    """-march=native, or (GCC 12 on an AMX CPU: see vs_llamacpp.cmake_args) every extension but AMX."""
    _, without_amx = cmake_args(cpu_flags, gcc_major)
    native = list(NATIVE_WITHOUT_AMX) if without_amx else ["-DGGML_NATIVE=ON"]
    return ["-DCMAKE_BUILD_TYPE=Release", *native, *SERVER_CMAKE_FLAGS]


def sdist_stem(source: str) -> str:
    """llama-cpp-python==0.3.36 -> llama_cpp_python-0.3.36 (the sdist's file and top folder)."""
    if source.endswith(".tar.gz"):
        return Path(source).name.removesuffix(".tar.gz")
    name, sep, version = source.partition("==")
    if not sep or not version:
        raise BenchError(f"--llama-cpp-source must pin a version (NAME==VERSION) or be an sdist path, got {source!r}")
    return f"{name.strip().replace('-', '_').lower()}-{version.strip()}"


def cmake_cache_agrees(cache_text: str, args: list[str], source_dir: Path) -> bool:
    """Every -DNAME=VALUE of args as CMakeCache.txt records it, and the same source folder."""
    entries = dict(re.findall(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", cache_text, flags=re.MULTILINE))
    if entries.get("CMAKE_HOME_DIRECTORY") != str(source_dir):
        return False
    return all(entries.get(name) == value
               for name, _, value in (a.removeprefix("-D").partition("=") for a in args))


@dataclass(frozen=True)
class LlamaServer:
    binary: Path
    version: str
    source: str
    cmake_args: list[str]
    build_s: float | None   # seconds compiling in this run; None: a finished build was reused
    note: str = ""


def _server_version(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        raise BenchError(f"{binary} does not run: {err}") from None
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise BenchError(f"`{binary} --version` failed (exit code {done.returncode}): {' | '.join(lines[-3:])}")
    return "; ".join(line for line in lines if line.startswith(("version", "built with"))) or lines[0]


def find_llama_server(root: Path, source: str, args: list[str]) -> LlamaServer | None:
    """The finished build in root: stamped by this bench with the same source and flags, or
    (no stamp) configured by hand with them, which is then stamped."""
    binary = root / "build" / "bin" / SERVER_TARGET
    if not os.access(binary, os.X_OK):
        return None
    stamp = root / SERVER_STAMP
    try:
        built = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        built = None
    if built is not None:
        if built.get("source") != source or built.get("cmake_args") != args:
            return None
        return LlamaServer(binary, _server_version(binary), source, args, None, built.get("note", ""))
    try:
        cache_text = (root / "build" / "CMakeCache.txt").read_text()
    except OSError:
        return None
    if not cmake_cache_agrees(cache_text, args, root / sdist_stem(source) / "vendor" / "llama.cpp"):
        return None
    version = _server_version(binary)
    note = "adopted: built outside this bench with the same flags (its CMakeCache.txt)"
    stamp.write_text(json.dumps({"source": source, "cmake_args": args, "binary": str(binary), "build_s": None,
                                 "version": version, "note": note,
                                 "stamped_at": datetime.now().isoformat(timespec="seconds")}, indent=2))
    return LlamaServer(binary, version, source, args, None, note)


def _logged(cmd: list[str], log: Path, timeout: float, what: str) -> None:
    with log.open("w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} took longer than {timeout:.0f} s; see {log}") from None
    if done.returncode != 0:
        raise BenchError(f"{what} failed (exit code {done.returncode}); the last lines of {log} say why")


def build_llama_server(root: Path, source: str, args: list[str], *, jobs: int, say) -> LlamaServer:
    """pip download the sdist, extract it, cmake its vendor/llama.cpp, build target llama-server, stamp."""
    if shutil.which("cmake") is None:
        raise BenchError("building llama-server needs cmake (apt-get install cmake), or pass --skip-llama-server")
    stem = sdist_stem(source)
    sdist = Path(source) if source.endswith(".tar.gz") else root / f"{stem}.tar.gz"
    if not sdist.is_file():
        say(f"downloading the {source} sdist into {root}")
        _logged([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "download",
                 "--no-binary", ":all:", "--no-deps", "-d", str(root), source],
                root / "download.log", DOWNLOAD_TIMEOUT_S, "`pip download`")
        if not sdist.is_file():
            raise BenchError(f"`pip download {source}` wrote no {sdist.name}; see {root / 'download.log'}")
    src = root / stem / "vendor" / "llama.cpp"
    if not (src / "tools" / "server").is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
        if not (src / "tools" / "server").is_dir():
            raise BenchError(f"{sdist.name} has no vendor/llama.cpp/tools/server")
    build = root / "build"
    say(f"building {SERVER_TARGET} with {jobs} jobs ({' '.join(args)}); logs: {root}/cmake.log, build.log")
    t0 = time.perf_counter()
    _logged(["cmake", "-S", str(src), "-B", str(build), *args], root / "cmake.log", 600, "cmake (configure)")
    _logged(["cmake", "--build", str(build), "--target", SERVER_TARGET, "-j", str(jobs)], root / "build.log",
            BUILD_TIMEOUT_S, f"building {SERVER_TARGET}")
    build_s = time.perf_counter() - t0
    binary = build / "bin" / SERVER_TARGET
    version = _server_version(binary)
    (root / SERVER_STAMP).write_text(json.dumps({
        "source": source, "cmake_args": args, "binary": str(binary), "build_s": build_s, "version": version,
        "built_at": datetime.now().isoformat(timespec="seconds")}, indent=2))
    say(f"built {SERVER_TARGET} in {build_s:.0f} s: {version}")
    return LlamaServer(binary, version, source, args, build_s)


def llama_server(cache: Path, source: str, *, binary: Path | None, say) -> LlamaServer:
    """--llama-server as given, else the cached build, else build it (one build at a time: a lock)."""
    if binary is not None:
        return LlamaServer(binary, _server_version(binary), "given (--llama-server)", [], None)
    args = server_cmake_args(_cpu_flags(), _gcc_major())
    root = cache / "llama-server-src"
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another bench run building: wait for it, then use its build
        found = find_llama_server(root, source, args)
        return found if found is not None else build_llama_server(root, source, args, jobs=BUILD_JOBS, say=say)


# ---------------------------------------------------------------- the server and one run


@dataclass
class Target:
    """Where the runs happen: this machine, or m0 of the namespace LAN (with its peers), on one model."""

    setting: str                          # "one machine" | "2-peer namespace LAN"
    model: BenchModel
    serve_extra: list[str]                # --local-only; --token T --peers 2 ... for the cluster
    env: dict[str, str]
    spawn: Any                            # (argv, **popen kwargs) -> Popen: subprocess's, or Machine.popen
    peers: list[Peer] = field(default_factory=list)

    @property
    def model_arg(self) -> list[str]:
        return [str(self.model.path)] if self.model.path is not None else []

    def peers_cpu_s(self) -> float:
        return sum(p.cpu_s() for p in self.peers)


@dataclass
class Run:
    phase: str                            # "concurrency" | "structured" | "scheduler"
    label: str                            # "SmolLM2-135M Q4_1, llama-server, 4 sessions" | "fcfs, seed 3"
    sessions: int                         # closed loop: sessions; scheduler: 0 (open loop)
    max_sessions: int
    scheduler: str
    argv: list[str]
    records: list[Record] = field(default_factory=list)
    engine: str = "serve"                 # "serve" | "llama-server"
    model_key: str = ""                   # BenchModel.key ("" in JSON from before there were several)
    model_label: str = ""
    variant: str = ""                     # structured: "free" | "json_schema"
    seed: int | None = None               # scheduler: the workload's seed
    model: str = ""                       # the NAME of serve's `serving NAME on URL`; llama-server: the file's
    commit: str = ""                      # HEAD when the run started (others may commit during a long run)
    wall_s: float = 0.0                   # the client's timed part (after its warm-up)
    measured_s: float = 0.0               # the driver's window around the client: CPU shares below are of this
    counters: dict[str, float] = field(default_factory=dict)   # /metrics *_total, during the timed part
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    peers_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    server_log: list[str] = field(default_factory=list)        # the server's stderr (llama-server: its last lines)
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


def _spawn(target: Target, argv: list[str]) -> subprocess.Popen:
    return target.spawn(argv, env=target.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)


def start_server(target: Target, argv: list[str], timeout: float) -> Server:
    proc = _spawn(target, argv)
    server = Server(proc, _Lines(proc.stdout), _Lines(proc.stderr))
    m = server.out.wait_for(SERVING, timeout)
    if m is None:
        _stop(proc)
        raise BenchError(f"`fastserve serve` did not print its URL within {timeout:.0f} s (exit code {proc.poll()}): "
                         f"{server.err.tail(6)}")
    server.model, server.url = m.group(1), m.group(2)
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(root_url: str) -> bool:
    """GET /health answers 200 (503 while the model loads)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never an http_proxy
    try:
        with opener.open(f"{root_url}/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_llama_server(target: Target, argv: list[str], timeout: float) -> Server:
    port = argv[argv.index("--port") + 1]
    proc = _spawn(target, argv)
    server = Server(proc, _Lines(proc.stdout), _Lines(proc.stderr), model=target.model.path.name,
                    url=f"http://127.0.0.1:{port}/v1")
    deadline = time.monotonic() + timeout
    while not _healthy(server.url.removesuffix("/v1")):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise BenchError(f"llama-server did not answer /health within {timeout:.0f} s (exit code {proc.poll()}): "
                             f"{server.err.tail(6)}")
        time.sleep(0.25)
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
            "--max-sessions", str(max_sessions), "--scheduler", scheduler, "--ctx", str(args.ctx)]
    if args.prompt_cache is not None:
        argv += ["--prompt-cache", str(args.prompt_cache)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv + target.serve_extra


def llama_server_argv(binary: Path, target: Target, args: argparse.Namespace, *, slots: int) -> list[str]:
    """C slots with continuous batching, each with serve's per-session context."""
    assert target.model.path is not None and args.threads is not None
    return [str(binary), "-m", str(target.model.path), "-t", str(args.threads), "-np", str(slots), "--cont-batching",
            "-c", str(slots * args.ctx), "--host", "127.0.0.1", "--port", str(free_port())]


def measure(target: Target, run: Run, job: dict[str, Any], args: argparse.Namespace, say) -> Run:
    """Start the server, drive it with the client, stop it; CPU of everyone during the timed part."""
    wait_for_quiet(args.quiet_wait, say)
    run.commit = _git("rev-parse", "--short", "HEAD") or "?"
    start = start_llama_server if run.engine == "llama-server" else start_server
    server = start(target, run.argv, args.timeout)
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
        # llama-server logs every request: its last lines are enough to see why a run went wrong
        run.server_log = list(server.err.lines)[-200:] if run.engine == "llama-server" else list(server.err.lines)


# ---------------------------------------------------------------- phases


def _closed_job(c: int, args: argparse.Namespace, prompt: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"mode": "closed", "sessions": c, "duration_s": args.duration, "warmup": c, "max_tokens": args.max_tokens,
            "prompt": prompt, "extra": {"ignore_eos": True, **extra}}


def concurrency_phase(targets: list[Target], llama: LlamaServer | None, args: argparse.Namespace, runs: list[Run],
                      save, say) -> None:
    """Per model and C: llama-server (when there is one), then serve, the same closed loop."""
    for target in targets:
        for c in args.session_counts:
            for engine in ENGINES:
                if engine == "llama-server" and llama is None:
                    continue
                argv = (llama_server_argv(llama.binary, target, args, slots=c) if engine == "llama-server"
                        else serve_argv(target, args, max_sessions=c, scheduler="fcfs"))
                run = Run("concurrency", f"{target.model.label}, {engine}, {c} session{'s' if c > 1 else ''}",
                          c, c, "fcfs", argv, engine=engine, model_key=target.model.key,
                          model_label=target.model.label)
                say(f"concurrency: {run.label}, {args.duration:g} s closed loop")
                runs.append(measure(target, run, _closed_job(c, args, MEDIUM_PROMPT, {}), args, say))
                say("  " + describe(run), "red" if run.problem else "")
                save()


def structured_phase(targets: list[Target], args: argparse.Namespace, runs: list[Run], save, say) -> None:
    """serve at --structured-sessions: the JSON prompt free, then with response_format json_schema."""
    c = args.structured_sessions
    for target in targets:
        for variant, extra in (("free", {}), ("json_schema", {"response_format": RESPONSE_FORMAT})):
            run = Run("structured", f"{target.model.label}, {variant}, {c} sessions", c, c, "fcfs",
                      serve_argv(target, args, max_sessions=c, scheduler="fcfs"), model_key=target.model.key,
                      model_label=target.model.label, variant=variant)
            say(f"structured: {run.label}, {args.duration:g} s closed loop")
            runs.append(measure(target, run, _closed_job(c, args, JSON_PROMPT, extra), args, say))
            say("  " + describe(run), "red" if run.problem else "")
            save()


def scheduler_phase(target: Target, args: argparse.Namespace, runs: list[Run], save, say) -> None:
    """Per seed: its workload to fcfs, then to mlfq."""
    for seed in args.seed_list:
        specs = mixed_workload(args.requests, args.rate, seed)
        for scheduler in SCHEDULERS:
            run = Run("scheduler", f"{scheduler}, seed {seed}", 0, args.max_sessions, scheduler,
                      serve_argv(target, args, max_sessions=args.max_sessions, scheduler=scheduler),
                      model_key=target.model.key, model_label=target.model.label, seed=seed)
            say(f"scheduler: {scheduler}, --max-sessions {args.max_sessions}, {len(specs)} requests at "
                f"{args.rate:g}/s (seed {seed})")
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
        "phase": run.phase, "label": run.label, "engine": run.engine, "model_key": run.model_key,
        "model_label": run.model_label or run.model, "variant": run.variant, "seed": run.seed,
        "sessions": run.sessions, "max_sessions": run.max_sessions,
        "scheduler": run.scheduler, "requests": len(ok), "failed": len(run.records) - len(ok),
        "completion_tokens": tokens, "window_s": window,
        "tok_s": tokens / window if window else None,
        "per_session_tok_s": tokens / window / run.sessions if window and run.sessions else None,
        "prompt_tokens_mean": _mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        "cached_share": _ratio(sum(r.cached_tokens or 0 for r in ok), sum(r.prompt_tokens or 0 for r in ok)),
        "completion_tokens_mean": _mean([r.completion_tokens or 0 for r in ok]),
        "stopped_early": sum(1 for r in ok if r.finish_reason == "stop"),
        "jct_mean_s": _mean(jct), "jct_p50_s": percentile(jct, 50), "jct_p99_s": percentile(jct, 99),
        "ttft_mean_s": _mean(ttft), "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "by_kind": by_kind,
        "rows_per_step": _ratio(run.counters.get("fastserve_decode_rows_total"),
                                run.counters.get("fastserve_decode_steps_total")),
        "preemptions": run.counters.get("fastserve_preemptions_total"),
        "evictions": run.counters.get("fastserve_evictions_total"),
        "server_cpu_s": run.server_cpu_s, "noisy": run.noisy, "problem": run.problem,
    }


def _by_model(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.get("model_key", ""), []).append(r)
    return out


def vs_pairs(rows: list[dict[str, Any]]) -> list[tuple[str, int, dict | None, dict | None]]:
    """(model label, C, llama-server's row, serve's row) of the concurrency phase, in run order."""
    pairs: dict[tuple[str, int], list] = {}
    for r in rows:
        if r["phase"] != "concurrency":
            continue
        pair = pairs.setdefault((r.get("model_key", ""), r["sessions"]), [r.get("model_label", ""), r["sessions"], None, None])
        pair[2 if r.get("engine") == "llama-server" else 3] = r
    return [tuple(p) for p in pairs.values()]


def scheduler_seeds(rows: list[dict[str, Any]]) -> list[tuple[int | None, float | None, float | None]]:
    """Per seed: (seed, fcfs mean JCT / mlfq's, mlfq p99 JCT / fcfs's)."""
    by_seed: dict[int | None, dict[str, dict]] = {}
    for r in rows:
        if r["phase"] == "scheduler":
            by_seed.setdefault(r.get("seed"), {})[r["scheduler"]] = r
    return [(seed, _ratio(s.get("fcfs", {}).get("jct_mean_s"), s.get("mlfq", {}).get("jct_mean_s")),
             _ratio(s.get("mlfq", {}).get("jct_p99_s"), s.get("fcfs", {}).get("jct_p99_s")))
            for seed, s in by_seed.items()]


def _median(values: list[float | None]) -> float | None:
    xs = [x for x in values if x is not None]
    return statistics.median(xs) if xs else None


def _goal_entry(goal: str, value: float | None, target: str, passed: bool | None) -> dict[str, Any]:
    return {"goal": goal, "value": value, "target": target, "pass": None if value is None else passed}


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 24's goals, each with its figure (None when a run is missing)."""
    out = []
    pairs = vs_pairs(rows)
    for key, mine in _by_model([r for r in rows if r["phase"] == "concurrency"]).items():
        label = mine[0].get("model_label") or key or "the model"
        ratios, ttfts = [], []
        for _, c, theirs, ours in (p for p in pairs if p[0] == label):
            if theirs is not None and ours is not None:
                ratios.append(_ratio(ours["tok_s"], theirs["tok_s"]))
                ttfts.append(_ratio(ours["ttft_p99_s"], theirs["ttft_p99_s"]))
        if ratios:  # every C must pass: the figure is the worst one
            worst = None if None in ratios else min(ratios)
            out.append(_goal_entry(f"{label}: aggregate tok/s serve / llama-server, lowest over C", worst,
                                   f">= {VS_GOAL_RATIO:g}", worst is not None and worst >= VS_GOAL_RATIO))
            worst = None if None in ttfts else max(ttfts)
            out.append(_goal_entry(f"{label}: p99 TTFT serve / llama-server, highest over C", worst, "<= 1",
                                   worst is not None and worst <= 1.0))
        serve = {r["sessions"]: r["tok_s"] for r in mine if r.get("engine", "serve") == "serve"}
        if 1 in serve and CONCURRENCY_GOAL_SESSIONS in serve:
            x = _ratio(serve[CONCURRENCY_GOAL_SESSIONS], serve[1])
            out.append(_goal_entry(f"{label}: serve aggregate tok/s, {CONCURRENCY_GOAL_SESSIONS} sessions / 1", x,
                                   f">= {CONCURRENCY_GOAL_RATIO:g}", x is not None and x >= CONCURRENCY_GOAL_RATIO))
    for key, mine in _by_model([r for r in rows if r["phase"] == "structured"]).items():
        v = {r["variant"]: r for r in mine}
        x = _ratio(v.get("json_schema", {}).get("tok_s"), v.get("free", {}).get("tok_s"))
        out.append(_goal_entry(f"{mine[0].get('model_label') or key}: tok/s with json_schema / without, "
                               f"{mine[0]['sessions']} sessions", x, f">= {1 - STRUCTURED_GOAL:.2f}",
                               x is not None and x >= 1 - STRUCTURED_GOAL))
    seeds = scheduler_seeds(rows)
    if seeds:
        x = _median([s[1] for s in seeds])
        out.append(_goal_entry(f"mean JCT, fcfs / mlfq (median of {len(seeds)} seeds)", x, f">= {MEAN_JCT_GOAL:g}",
                               x is not None and x >= MEAN_JCT_GOAL))
        x = _median([s[2] for s in seeds])
        out.append(_goal_entry(f"p99 JCT, mlfq / fcfs (median of {len(seeds)} seeds)", x, f"<= {P99_JCT_GOAL:.2f}",
                               x is not None and x <= P99_JCT_GOAL))
    return out


def describe(run: Run) -> str:
    if not run.records:
        return f"{run.label}: {run.problem}"
    s = summarize(run)
    text = (f"{run.label}: {s['requests']} requests, {s['completion_tokens']} tokens in "
            f"{s['window_s'] or 0:.1f} s = {_rate(s['tok_s'])} tok/s; JCT mean {_secs(s['jct_mean_s'])}, "
            f"p99 {_secs(s['jct_p99_s'])}; TTFT p50 {_secs(s['ttft_p50_s'])}, p99 {_secs(s['ttft_p99_s'])}")
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


def _get(row: dict | None, key: str) -> Any:
    return None if row is None else row.get(key)


def _pair(theirs: dict | None, ours: dict | None, key: str, scale: float = 1.0, digits: int = 0) -> str:
    """`theirs / ours` of one figure; * after a side whose run was disturbed."""
    def one(r: dict | None) -> str:
        x = _get(r, key)
        return "n/a" if x is None else f"{x * scale:.{digits}f}" + ("*" if r["noisy"] else "")
    return f"{one(theirs)} / {one(ours)}"


def vs_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "sessions", "llama-server tok/s", "serve tok/s", f"serve / llama-server (>= {VS_GOAL_RATIO:g})",
              "TTFT p50 ms (llama-server / serve)", "TTFT p99 ms (serve <= llama-server)", "JCT p50 s", "JCT p99 s",
              "gen tok/req", "requests"]
    body = []
    for label, c, theirs, ours in vs_pairs(rows):
        x = _ratio(_get(ours, "tok_s"), _get(theirs, "tok_s"))
        t99, o99 = _get(theirs, "ttft_p99_s"), _get(ours, "ttft_p99_s")
        body.append([
            label, str(c),
            "n/a" if theirs is None else _rate(theirs["tok_s"], theirs["noisy"]),
            "n/a" if ours is None else _rate(ours["tok_s"], ours["noisy"]),
            ("n/a" if x is None else f"{x:.2f}x") + _goal(None if x is None else x >= VS_GOAL_RATIO),
            _pair(theirs, ours, "ttft_p50_s", 1e3),
            _pair(theirs, ours, "ttft_p99_s", 1e3) + _goal(None if t99 is None or o99 is None else o99 <= t99),
            _pair(theirs, ours, "jct_p50_s", digits=2), _pair(theirs, ours, "jct_p99_s", digits=2),
            _pair(theirs, ours, "completion_tokens_mean", digits=1),
            f"{_get(theirs, 'requests') or 0} / {_get(ours, 'requests') or 0}"
            + (" (failed: {} / {})".format(_get(theirs, "failed") or 0, _get(ours, "failed") or 0)
               if (_get(theirs, "failed") or _get(ours, "failed")) else ""),
        ])
    return header, body


def concurrency_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "engine", "sessions", "requests", "prompt tok", "cached", "gen tok/req", "aggregate tok/s",
              f"x 1 session (>= {CONCURRENCY_GOAL_RATIO:g} at {CONCURRENCY_GOAL_SESSIONS})", "tok/s per session",
              "TTFT mean", "TTFT p99", "JCT mean", "rows/step", "server CPU s"]
    body = []
    for r in rows:
        engine = r.get("engine", "serve")
        one = next((o["tok_s"] for o in rows if o["sessions"] == 1 and o.get("engine", "serve") == engine
                    and o.get("model_key") == r.get("model_key")), None)
        x = r["tok_s"] / one if r["tok_s"] is not None and one else None
        goal = (None if x is None or r["sessions"] != CONCURRENCY_GOAL_SESSIONS or engine != "serve"
                else x >= CONCURRENCY_GOAL_RATIO)
        n = r["noisy"]
        body.append([
            r.get("model_label", ""), engine, str(r["sessions"]),
            f"{r['requests']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            _num(r["prompt_tokens_mean"]), _share(r.get("cached_share")), _num(r["completion_tokens_mean"], 1),
            _rate(r["tok_s"], n), ("n/a" if x is None else f"{x:.2f}x") + _goal(goal), _rate(r["per_session_tok_s"], n),
            _secs(r["ttft_mean_s"], n), _secs(r["ttft_p99_s"], n), _secs(r["jct_mean_s"], n),
            _num(r.get("rows_per_step"), 1), f"{r['server_cpu_s']:.0f}",
        ])
    return header, body


def structured_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "sessions", "tok/s free", "tok/s json_schema", f"json_schema / free (>= {1 - STRUCTURED_GOAL:.2f})",
              "TTFT p50 ms (free / json_schema)", "TTFT p99 ms", "JCT p50 s", "gen tok/req", "requests",
              "rows/step"]
    body = []
    for key, mine in _by_model(rows).items():
        v = {r["variant"]: r for r in mine}
        free, schema = v.get("free"), v.get("json_schema")
        x = _ratio(_get(schema, "tok_s"), _get(free, "tok_s"))
        body.append([
            mine[0].get("model_label") or key, str(mine[0]["sessions"]),
            "n/a" if free is None else _rate(free["tok_s"], free["noisy"]),
            "n/a" if schema is None else _rate(schema["tok_s"], schema["noisy"]),
            ("n/a" if x is None else f"{x:.2f}x") + _goal(None if x is None else x >= 1 - STRUCTURED_GOAL),
            _pair(free, schema, "ttft_p50_s", 1e3), _pair(free, schema, "ttft_p99_s", 1e3),
            _pair(free, schema, "jct_p50_s", digits=2), _pair(free, schema, "completion_tokens_mean", digits=1),
            f"{_get(free, 'requests') or 0} / {_get(schema, 'requests') or 0}",
            _pair(free, schema, "rows_per_step", digits=1),
        ])
    return header, body


def scheduler_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["seed", "scheduler", "requests (short/long)", "cached", "gen tokens", "tok/s", "JCT mean", "JCT p50",
              "JCT p99", "TTFT mean", "TTFT p99", "short JCT mean", "long JCT mean", "rows/step", "preempted / evicted",
              "server CPU s"]
    body = []
    for r in rows:
        n, kinds = r["noisy"], r["by_kind"]
        short, long = kinds.get("short", {}), kinds.get("long", {})
        body.append([
            _num(r.get("seed")), r["scheduler"],
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


def scheduler_median_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["seed", f"mean JCT fcfs / mlfq (>= {MEAN_JCT_GOAL:g})", f"p99 JCT mlfq / fcfs (<= {P99_JCT_GOAL:.2f})"]
    seeds = scheduler_seeds(rows)

    def cell(x: float | None, passed: bool | None) -> str:
        return ("n/a" if x is None else f"{x:.2f}x") + _goal(None if x is None else passed)

    body = [[_num(seed), cell(mean, None), cell(p99, None)] for seed, mean, p99 in seeds]
    mean, p99 = _median([s[1] for s in seeds]), _median([s[2] for s in seeds])
    body.append([f"median of {len(seeds)}", cell(mean, mean is not None and mean >= MEAN_JCT_GOAL),
                 cell(p99, p99 is not None and p99 <= P99_JCT_GOAL)])
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
            f"--prompt-cache {'server default' if s.get('prompt_cache') is None else s['prompt_cache']}"
            + (f"; per-session context {s['ctx']}" if s.get("ctx") else "") + ". ")
    max_tokens = s.get("max_tokens", s.get("medium_max_tokens"))
    closed = (f"Closed loop: C sessions, back-to-back requests (prompt asking for a long story, max_tokens "
              f"{max_tokens}, temperature 0{', ignore_eos' if s.get('max_tokens') else ''}) for {s['duration_s']:g} s")
    noise = f"* = other processes used over {NOISE_SHARE:.0%} of a core."
    if phase == "vs":
        llama = results.get("llama_server") or {}
        built = (f"llama-server {llama.get('version', '?')}, from {llama.get('source', '?')} "
                 f"({' '.join(llama.get('cmake_args') or []) or 'flags unknown'}), `-np C --cont-batching "
                 f"-c C*{s.get('ctx')}`; " if llama else "no llama-server in this run; ")
        return head + built + (f"serve --max-sessions C, fcfs. {closed}, the same requests to both, one engine after "
                               f"the other. Aggregate tok/s = completion tokens / (first send -> last completion); "
                               f"TTFT = send -> first content token, JCT = send -> [DONE]; p99 interpolated. {noise}")
    if phase == "concurrency":
        return head + (f"{closed}. Aggregate tok/s = completion tokens / (first send -> last completion). "
                       f"{ROWS_NOTE} {noise}")
    if phase == "structured":
        return head + (f"serve alone, --max-sessions C. {closed.replace('a long story', 'a long story as JSON')}; "
                       f"json_schema = response_format json_schema (strict; a story string of minLength "
                       f"{STORY_SCHEMA['properties']['story']['minLength']}: no answer ends before max_tokens). "
                       f"{ROWS_NOTE} {noise}")
    seeds = s.get("seeds") or [s.get("seed")]
    return head + (f"Open loop: {s['requests']} Poisson arrivals at {s['rate']:g}/s per seed "
                   f"({', '.join(str(x) for x in seeds)}), "
                   f"{1 - LONG_SHARE:.0%} short chats (max_tokens {SHORT_MAX_TOKENS[0]}-{SHORT_MAX_TOKENS[1]}), "
                   f"{LONG_SHARE:.0%} long answers (max_tokens {LONG_MAX_TOKENS[0]}-{LONG_MAX_TOKENS[1]}); "
                   f"the same requests for both; --max-sessions {s['max_sessions']}. JCT = arrival -> last token, "
                   f"TTFT = arrival -> first token; p99 interpolated. {ROWS_NOTE} Preempted / evicted: /metrics "
                   f"counters. {noise}")


def report_tables(rows: list[dict[str, Any]]) -> list[tuple[str, str, tuple[list[str], list[list[str]]]]]:
    """(caption phase, title, (header, body)) of every table that has rows."""
    conc = [r for r in rows if r["phase"] == "concurrency"]
    sched = [r for r in rows if r["phase"] == "scheduler"]
    struct = [r for r in rows if r["phase"] == "structured"]
    tables = []
    if any(r.get("engine") == "llama-server" for r in conc):
        tables.append(("vs", "fastserve serve against llama-server: the same GGUF, threads and load", vs_table(conc)))
    if conc:
        tables.append(("concurrency", "each run of the concurrency phase", concurrency_table(conc)))
    if struct:
        tables.append(("structured", "fastserve serve: what response_format json_schema costs", structured_table(struct)))
    if sched:
        tables.append(("scheduler", "fastserve serve: fcfs vs mlfq, mixed workload", scheduler_table(sched)))
        tables.append(("scheduler", "fcfs vs mlfq by seed, and the median", scheduler_median_table(sched)))
    return tables


def print_report(results: dict[str, Any], json_out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log file: 80 columns would fold every cell
        console = Console(width=240)
    tables = report_tables(results["rows"])
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
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"subset of {','.join(BENCH_MODELS)} (bench/vs_llamacpp.py's keys); default {','.join(MODELS)}")
    parser.add_argument("--model", help="one model instead of --models: a GGUF path or serve's MODEL argument "
                                        "(--cluster default: smollm2-135m)")
    parser.add_argument("--sessions", default="1,4,8,16", help="concurrency: closed-loop session counts")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="concurrency, structured: seconds of load per run")
    parser.add_argument("--max-tokens", type=int, default=MEDIUM_MAX_TOKENS,
                        help="concurrency, structured: max_tokens of every request (with ignore_eos)")
    parser.add_argument("--ctx", type=int, default=SESSION_CTX,
                        help="per-session context: serve --ctx, llama-server -c C*ctx")
    parser.add_argument("--structured-sessions", type=int, default=STRUCTURED_SESSIONS,
                        help="structured: closed-loop sessions")
    parser.add_argument("--rate", type=float, default=1.0, help="scheduler: Poisson arrivals per second")
    parser.add_argument("--requests", type=int, default=40, help="scheduler: requests in the mixed workload")
    parser.add_argument("--max-sessions", type=int, default=4, help="scheduler: serve --max-sessions for both runs")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="scheduler: seeds of the arrivals and the mix, one fcfs and one mlfq run each")
    parser.add_argument("--threads", type=int,
                        help="threads of both engines (default: the CPUs this process may use; --cluster: 1)")
    parser.add_argument("--prompt-cache", type=int, help="serve --prompt-cache (default: the server's; 0 = off)")
    parser.add_argument("--skip-llama-server", action="store_true",
                        help="concurrency: serve alone; never builds llama-server")
    parser.add_argument("--llama-server", type=Path, metavar="BINARY", help="an existing llama-server: no build")
    parser.add_argument("--llama-cpp-source", default=os.environ.get("FASTSERVE_BENCH_LLAMA_CPP_SOURCE", LLAMA_CPP_SOURCE),
                        help="pip requirement (NAME==VERSION) or sdist path to build llama-server from")
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
    args.model_list = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    if not args.model_list or not set(args.model_list) <= set(BENCH_MODELS):
        parser.error(f"--models: choose among {','.join(BENCH_MODELS)}")
    args.session_counts = _ints(args.sessions, "--sessions", parser)
    try:
        args.seed_list = list(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))
    except ValueError:
        parser.error(f"--seeds must be integers like 1,2,3, got {args.seeds!r}")
    if not args.seed_list:
        parser.error("--seeds needs at least one seed")
    if args.duration <= 0 or args.rate <= 0:
        parser.error("--duration and --rate must be above 0")
    for flag, value in (("--requests", args.requests), ("--max-sessions", args.max_sessions),
                        ("--max-tokens", args.max_tokens), ("--ctx", args.ctx),
                        ("--structured-sessions", args.structured_sessions),
                        ("--threads", args.threads if args.threads is not None else 1)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.quiet_wait < 0 or args.timeout <= 0:
        parser.error("--quiet-wait must be 0 or more and --timeout above 0")
    if args.threads is None and not args.cluster:  # both engines get the same, never each its own default
        args.threads = len(os.sched_getaffinity(0))
    return args


def local_target(model: BenchModel) -> Target:
    env = {k: v for k, v in os.environ.items() if k != "FASTSERVE_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    # serve looks for peers on the LAN unless told not to: one machine means this one alone
    return Target("one machine", model, ["--local-only"], env, subprocess.Popen)


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
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": sorted(os.sched_getaffinity(0)),
                    "platform": platform.platform()},
        "fastserve": {"commit": _git("rev-parse", "--short", "HEAD") or "?", "dirty": bool(_git("status", "--porcelain"))},
        "model": "?", "models": [], "llama_server": None,
        "settings": {"phases": args.phase_list, "models": args.model_list, "sessions": args.session_counts,
                     "duration_s": args.duration, "max_tokens": args.max_tokens, "ctx": args.ctx,
                     "structured_sessions": args.structured_sessions,
                     "rate": args.rate, "requests": args.requests, "max_sessions": args.max_sessions,
                     "seeds": args.seed_list, "threads": args.threads, "cluster": args.cluster,
                     "prompt_cache": args.prompt_cache,
                     "setting": "2-peer namespace LAN" if args.cluster else "one machine",
                     "long_share": LONG_SHARE, "short_max_tokens": SHORT_MAX_TOKENS, "long_max_tokens": LONG_MAX_TOKENS,
                     "fastserve_threads_env": os.environ.get("FASTSERVE_THREADS")},
        "goals": [], "rows": [], "runs": [], "problems": [],
        "workloads": {str(seed): [asdict(s) for s in mixed_workload(args.requests, args.rate, seed)]
                      for seed in args.seed_list},
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []

    def save() -> None:
        results["runs"] = [r.as_dict() for r in runs]
        results["rows"] = [summarize(r) for r in runs if r.records]
        results["goals"] = goals(results["rows"])
        results["problems"] = [f"{r.label}: {r.problem}" for r in runs if r.problem]
        args.json_out.write_text(json.dumps(results, indent=2))

    def run_phases(targets: list[Target], llama: LlamaServer | None) -> None:
        results["models"] = [{"key": t.model.key, "label": t.model.label, "path": str(t.model.path)} for t in targets]
        results["model"] = ", ".join(t.model.label for t in targets)
        if "concurrency" in args.phase_list:
            concurrency_phase(targets, llama, args, runs, save, say)
        if "structured" in args.phase_list:
            structured_phase(targets, args, runs, save, say)
        if "scheduler" in args.phase_list:
            scheduler_phase(targets[0], args, runs, save, say)

    try:
        if not args.cluster:
            targets = [local_target(m) for m in prepare_models(args, say)]
            llama = None
            if "concurrency" in args.phase_list and not args.skip_llama_server:
                llama = llama_server(bench_cache(), args.llama_cpp_source, binary=args.llama_server, say=say)
                results["llama_server"] = {"binary": str(llama.binary), "version": llama.version,
                                           "source": llama.source, "cmake_args": llama.cmake_args,
                                           "build_s": llama.build_s, "note": llama.note}
                say(f"llama-server: {llama.binary} ({llama.version})")
            run_phases(targets, llama)
        else:
            run_cluster(args, run_phases, say)
    except BenchError as problem:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
        results["problems"].append(str(problem))
        save()
        return 1
    save()
    print_report(results, args.json_out)
    return 0


def run_cluster(args: argparse.Namespace, run_phases, say) -> None:
    """m1, m2 run `fastserve join`; the server and the client run in m0. serve alone: no llama-server."""
    from tests import netns

    from fastserve_edge.cluster.auth import new_token

    model = Path(args.model) if args.model else smollm2_path()
    if not model.is_file():
        raise BenchError(f"no model file at {model}")
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
            target = Target("2-peer namespace LAN", BenchModel(model.name, model.name, model), extra, env,
                            lan[0].popen, peers)
            try:
                run_phases([target], None)
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
