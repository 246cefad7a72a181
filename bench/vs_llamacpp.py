"""fastserve against llama.cpp on the same GGUF files: prefill, decode, memory, first token.

    python bench/vs_llamacpp.py                      # all models, 1 and 2 threads, 3 repeats
    python bench/vs_llamacpp.py --models 1b-q4_0 --threads 2 --repeats 5
    python bench/vs_llamacpp.py --skip-llamacpp      # ours only
    python bench/vs_llamacpp.py --activations int16  # our default precision only

Each engine runs in its own subprocess, one per (model, threads), so each peak RSS is its
own and llama.cpp's native libraries never load into our process:

- llama.cpp: llama-cpp-python, compiled once from source for this CPU (GGML_NATIVE, no GPU
  backends) into a venv of its own in the bench cache, and driven by this same file
  (`_worker` mode: stdlib + llama_cpp + numpy only).
- ours: `fastserve bench MODEL --json` with the same flags, once per --activations: int16
  (our default) and int8 (llama.cpp's own activation precision: Q8_0 activations for its
  32-weight blocks, Q8_K for K-quants; ours take int8 for Q4_0/Q4_1/Q8_0 and for K-quant
  matrices in the x8 layouts, the rest keep int16). Both rows show the same llama.cpp run.

Methodology, the same for both engines (close to llama-bench's pp512/tg128): one short
warm-up (32-token prompt, 4 tokens), then per repeat a fresh KV cache, prefill = the
512-token prompt in one batch up to the first greedy token, decode = 128 greedy tokens one
at a time after it (llama-bench's tg128 starts from an empty cache instead; at depth 512
both engines pay for attending over the prompt). The median of the repeats is reported.
The prompt is the same filler text as `fastserve bench`, tokenized by each engine.

Models: `smollm2` is SmolLM2-135M-Instruct Q4_1 from the project's model cache (pulled
when missing). `1b-*` are a Llama-3.2-1B-shaped model with random weights (see
make_1b_gguf.py), written once as F16 and quantized with llama.cpp's own quantizer;
`moe-q4_k_m` the same for a mixture of experts: Qwen3-30B-A3B's layer shapes, 6 layers of 48.

Cache (never the repository): ${XDG_CACHE_HOME:-~/.cache}/fastserve-bench/

    llama-venv/                 python + llama-cpp-python (+ numpy and its small deps)
    llama-venv/fastserve-bench.json   what was built: version, CMAKE_ARGS, build seconds
    wheels/<key>/               the built wheel: a deleted venv is refilled without compiling
    build-llama-cpp.log         output of the last build
    models/                     the generated 1B GGUFs (F16 ~2.5 GB, quantized 0.7-1.3 GB)

Results: a Rich table and a markdown copy on stdout, JSON in --json-out
(default bench/results/vs_llamacpp-<date>.json, gitignored), rewritten after every row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ACTIVATIONS = ("int16", "int8")  # fastserve_edge.engine.quant.ACTIVATIONS (not imported: this process stays light)
LLAMA_CPP_SOURCE = "llama-cpp-python==0.3.36"  # or a path to its sdist: --llama-cpp-source
NO_GPU_NO_EXTRAS = (
    "-DGGML_CUDA=OFF", "-DGGML_HIP=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF",
    "-DGGML_SYCL=OFF", "-DGGML_OPENCL=OFF", "-DGGML_BLAS=OFF", "-DGGML_RPC=OFF",
    "-DLLAVA_BUILD=OFF",  # the multimodal library: not needed, a third of the compile
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)
# Sapphire Rapids and later, everything -march=native gives there except AMX (see cmake_args).
NATIVE_WITHOUT_AMX = (
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_BMI2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_AVX_VNNI=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON",
    "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def _gcc_major() -> int | None:
    try:
        done = subprocess.run(["gcc", "-dumpversion"], capture_output=True, text=True, timeout=30, check=False)
        return int(done.stdout.split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def cmake_args(cpu_flags: set[str], gcc_major: int | None) -> tuple[str, str | None]:
    """llama.cpp's build flags for this machine, and why they differ from -march=native (or None).

    GCC 12 (Debian 12's compiler) drops the stores that fill ggml's AMX tile configuration
    (the struct is only read by the ldtilecfg builtin, and GCC 12 does not count that as a
    read), so on a CPU with AMX every batch of more than one token dies with SIGSEGV at
    ldtilecfg inside ggml_backend_amx_mul_mat. There llama.cpp is built with every extension
    the CPU has but AMX: the build a user of that compiler can actually run.
    """
    base = ("-DCMAKE_BUILD_TYPE=Release",)
    if "amx_int8" in cpu_flags and gcc_major is not None and gcc_major < 13:
        why = (f"llama.cpp built without AMX: GCC {gcc_major} miscompiles ggml's AMX tile setup "
               "(every batch crashes at ldtilecfg); AVX-512 VNNI/BF16 as -march=native otherwise")
        return " ".join(base + NATIVE_WITHOUT_AMX + NO_GPU_NO_EXTRAS), why
    return " ".join(base + ("-DGGML_NATIVE=ON",) + NO_GPU_NO_EXTRAS), None  # -march=native: all this CPU has


CMAKE_ARGS, CMAKE_NOTE = cmake_args(_cpu_flags(), _gcc_major())
BUILD_JOBS = 2
BUILD_TIMEOUT_S = 3600
QUANTIZE_TIMEOUT_S = 1800
LLAMA_N_CTX = 1024   # prompt 512 + 128 generated fits
LLAMA_N_BATCH = 512  # the whole prompt in one batch, as llama-bench's default
WARMUP_PROMPT, WARMUP_GEN = 32, 4  # as fastserve_edge.engine.benchmark (this file runs in the llama venv too)
# The text fastserve_edge.engine.benchmark tokenizes for its prompt (copied: importing that
# module would load torch into this process, and the llama.cpp worker has no torch at all).
FILLER = (
    "The quick brown fox jumps over the lazy dog while the committee discusses the budget "
    "for next year's conference on distributed systems, caching, and numerical precision. "
)
RSS_GOAL_FACTOR = 1.15
RSS_GOAL_SLACK = 300 * 2**20   # the "300 MB", read as MiB
FIRST_TOKEN_GOAL_S = 3.0       # load + first token, for the 1B Q4_0 model
FIRST_TOKEN_GOAL_MODEL = "1b-q4_0"
GEN_VERSION = "v1"             # bump when make_1b_gguf changes what it writes
# Other processes may use the CPU during a run (2 busy threads on 2 cores then wait on each
# other: one run of llama.cpp's decode fell from 86 to 1.3 tok/s that way). Each run waits
# (--quiet-wait) until the rest of the machine uses less than this share of one core; a run
# during which it used more is noisy: measured again (--retries), marked * if it stays so.
NOISE_SHARE = 0.10


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    llama_ftype: tuple[str, int] | None = None  # (name, LLAMA_FTYPE_MOSTLY_*) for generated files
    shape: str = "1b"  # make_1b_gguf.py --shape: 1b (Llama-3.2-1B) or moe (Qwen3-30B-A3B's layers, 6 of them)


MODELS = {
    "smollm2": ModelSpec("smollm2", "SmolLM2-135M"),
    "1b-q4_0": ModelSpec("1b-q4_0", "1B-shape", ("Q4_0", 2)),
    "1b-q4_k_m": ModelSpec("1b-q4_k_m", "1B-shape", ("Q4_K_M", 15)),
    "1b-q5_k_m": ModelSpec("1b-q5_k_m", "1B-shape", ("Q5_K_M", 17)),
    "1b-q6_k": ModelSpec("1b-q6_k", "1B-shape", ("Q6_K", 18)),
    "1b-q8_0": ModelSpec("1b-q8_0", "1B-shape", ("Q8_0", 7)),
    "moe-q4_k_m": ModelSpec("moe-q4_k_m", "Qwen3-30B-A3B-shape, 6 layers", ("Q4_K_M", 15), shape="moe"),
}


class BenchError(Exception):
    """A step that could not be done; the message says what to do about it."""


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM).

    Not getrusage's ru_maxrss: Linux carries the parent's peak over into a child at exec, so
    a child of a 600 MB parent reports at least 600 MB there. This is also why this driver
    keeps itself small and does every heavy step in a child process.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- llama.cpp worker (llama venv)


def _worker_measure(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    threads = spec["threads"]
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["model"], n_threads=threads, n_threads_batch=threads,
                          n_ctx=spec["n_ctx"], n_batch=spec["n_batch"], n_ubatch=spec["n_batch"], verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    n = spec["prompt_tokens"]
    ids = llm.tokenize((FILLER * (n // 8 + 2)).encode(), add_bos=False, special=False)[:n]

    def greedy() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    internal: list[tuple[float, float]] = []  # llama.cpp's own timers: the binding's overhead is the gap

    def run_once(prompt: list[int], gen: int) -> tuple[float, float, float]:
        llm.reset()  # n_tokens = 0, and the next eval drops the KV from position 0 on ...
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)  # ... cleared anyway
        llama_cpp.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = greedy()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(gen):
            llm.eval([token])
            token = greedy()
        decode = time.perf_counter() - t1
        perf = llama_cpp.llama_perf_context(llm.ctx)
        internal.append((1e3 * perf.n_p_eval / max(perf.t_p_eval_ms, 1e-9), 1e3 * perf.n_eval / max(perf.t_eval_ms, 1e-9)))
        return len(prompt) / ttft, gen / decode, ttft

    cold_ttft = run_once(ids[:WARMUP_PROMPT], WARMUP_GEN)[2]
    runs = [run_once(ids, spec["gen_tokens"]) for _ in range(spec["repeats"])]
    prefill, decode, ttft = (statistics.median(r[i] for r in runs) for i in range(3))
    return {
        "prefill_tok_s": prefill, "decode_tok_s": decode, "ttft_s": ttft, "load_s": load_s, "cold_ttft_s": cold_ttft,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": threads, "prompt_tokens": len(ids), "gen_tokens": spec["gen_tokens"],
        "runs": runs, "llama_cpp_python": llama_cpp.__version__,
        "internal_prefill_tok_s": statistics.median(i[0] for i in internal[1:]),
        "internal_decode_tok_s": statistics.median(i[1] for i in internal[1:]),
    }


def _worker_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec["ftype"]
    params.nthread = spec["threads"]
    part = spec["out"] + ".part"
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(spec["source"].encode(), part.encode(), ctypes.byref(params))
    if rc != 0:
        Path(part).unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    os.replace(part, spec["out"])
    return {"seconds": time.perf_counter() - t0}


def _worker_describe(spec: dict[str, Any]) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(spec["path"])
    ftype = reader.get_field("general.file_type")
    quant = "?"
    if ftype is not None:
        try:
            quant = gguf.LlamaFileType(int(ftype.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quant = f"ftype {ftype.contents()}"
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"quant": quant, "tensor_types": types}


def _worker_probe(_spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip()}


WORKERS = {"measure": _worker_measure, "quantize": _worker_quantize, "probe": _worker_probe,
           "describe": _worker_describe}


def worker_main(argv: list[str]) -> None:
    """`_worker KIND JSON`: one JSON object on the last line of stdout."""
    kind, spec = argv[0], json.loads(argv[1])
    print(json.dumps(WORKERS[kind](spec)), flush=True)


# ---------------------------------------------------------------- subprocesses


@dataclass
class Outcome:
    data: dict[str, Any] | None
    problem: str | None
    wall_s: float
    cpu_s: float        # user + system CPU of the child: > threads x wall means it oversubscribed
    other_cpu_s: float  # CPU the rest of the machine used meanwhile (see NOISE_SHARE)
    steal_s: float      # CPU the hypervisor gave to other guests meanwhile

    @property
    def noisy(self) -> bool:
        return self.other_cpu_s > NOISE_SHARE * self.wall_s

    def figures(self) -> dict[str, Any] | None:
        """The child's JSON plus how it ran."""
        if self.data is None:
            return None
        return {**self.data, "wall_s": self.wall_s, "cpu_s": self.cpu_s, "other_cpu_s": self.other_cpu_s,
                "steal_s": self.steal_s, "noisy": self.noisy}


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def wait_for_quiet(max_wait_s: float, say, window_s: float = 2.0) -> bool:
    """Wait (at most max_wait_s) until the rest of the machine stays under NOISE_SHARE of a core."""
    deadline = time.monotonic() + max_wait_s
    told = False
    while True:
        busy0, _ = _machine_cpu_s()
        time.sleep(window_s)
        busy1, _ = _machine_cpu_s()
        if busy1 - busy0 <= NOISE_SHARE * window_s:
            return True
        if time.monotonic() >= deadline:
            say(f"  the machine is still busy after {max_wait_s:.0f} s; measuring anyway", "yellow")
            return False
        if not told:
            say(f"  other processes use {(busy1 - busy0) / window_s:.0%} of a core; waiting for quiet "
                f"(at most {max_wait_s:.0f} s)", "yellow")
            told = True


def run_json(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> Outcome:
    """Run a child that prints one JSON object as its last stdout line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, steal0 = _machine_cpu_s()
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(None, f"timed out after {timeout:.0f} s", time.perf_counter() - t0, 0.0, 0.0, 0.0)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, steal1 = _machine_cpu_s()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    meta = (wall, cpu, max(0.0, busy1 - busy0 - cpu), steal1 - steal0)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()][-3:]
        return Outcome(None, f"exit code {done.returncode}: {' | '.join(tail) or 'no output'}", *meta)
    try:
        return Outcome(json.loads(lines[-1]), None, *meta)
    except json.JSONDecodeError as err:
        return Outcome(None, f"unreadable JSON from {cmd[0]} ({err})", *meta)


def run_worker(python: Path, kind: str, spec: dict[str, Any], *, timeout: float) -> Outcome:
    return run_json([str(python), str(Path(__file__).resolve()), "_worker", kind, json.dumps(spec)], timeout=timeout)


# ---------------------------------------------------------------- the llama.cpp environment


@dataclass(frozen=True)
class LlamaEnv:
    python: Path
    version: str
    system_info: str
    build_s: float | None  # seconds spent compiling on this run; None: an earlier build was reused


def bench_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastserve-bench"


def _probe(python: Path) -> dict[str, Any] | None:
    if not python.is_file():
        return None
    out = run_worker(python, "probe", {}, timeout=120)
    return out.data


def find_llama_env(cache: Path, python: Path | None = None) -> LlamaEnv | None:
    """An interpreter that already imports llama_cpp: --llama-python, or the cached venv."""
    if python is not None:
        info = _probe(python)
        return LlamaEnv(python, info["version"], info["system_info"], None) if info else None
    venv = cache / "llama-venv"
    marker = venv / "fastserve-bench.json"
    try:
        built = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if built.get("cmake_args") != CMAKE_ARGS:
        return None
    info = _probe(venv / "bin" / "python")
    return LlamaEnv(venv / "bin" / "python", info["version"], info["system_info"], None) if info else None


def _pip(python: Path, *args: str, log: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"`pip {args[0]}` took longer than {timeout:.0f} s; see {log}") from None
    if done.returncode != 0:
        raise BenchError(f"`pip {args[0]}` failed (exit code {done.returncode}); the last lines of {log} say why")


def build_llama_env(cache: Path, *, source: str, jobs: int, say) -> LlamaEnv:
    """Compile llama-cpp-python for this CPU into cache/llama-venv (once; the wheel is kept)."""
    venv = cache / "llama-venv"
    python = venv / "bin" / "python"
    key = hashlib.sha256(f"{Path(source).name}\n{CMAKE_ARGS}".encode()).hexdigest()[:12]
    wheels = cache / "wheels" / key
    log = cache / "build-llama-cpp.log"
    cache.mkdir(parents=True, exist_ok=True)
    log.write_text(f"# {datetime.now().isoformat(timespec='seconds')} source={source}\n# CMAKE_ARGS={CMAKE_ARGS}\n")
    if venv.exists():
        shutil.rmtree(venv)
    say(f"creating {venv}")
    done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise BenchError(f"could not create a venv at {venv}: {done.stderr.strip() or done.returncode}")
    build_s = None
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        say(f"compiling {source} with {jobs} jobs (CMAKE_ARGS={CMAKE_ARGS}); log: {log}")
        env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs), FORCE_CMAKE="1")
        t0 = time.perf_counter()
        # --no-cache-dir: pip's own wheel cache is keyed by the source alone, not by CMAKE_ARGS
        _pip(python, "wheel", "-v", "--no-cache-dir", "--no-deps", "--no-binary", "llama-cpp-python", "-w", str(wheels), source,
             log=log, timeout=BUILD_TIMEOUT_S, env=env)
        build_s = time.perf_counter() - t0
        say(f"compiled in {build_s:.0f} s")
    wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
    _pip(python, "install", str(wheel), log=log, timeout=900)
    info = _probe(python)
    if info is None:
        raise BenchError(f"llama_cpp does not import in {venv} after installing {wheel.name}; see {log}")
    (venv / "fastserve-bench.json").write_text(json.dumps({
        "source": source, "wheel": str(wheel), "cmake_args": CMAKE_ARGS, "build_s": build_s,
        "built_at": datetime.now().isoformat(timespec="seconds"), **info,
    }, indent=2))
    return LlamaEnv(python, info["version"], info["system_info"], build_s)


def llama_env(cache: Path, *, source: str, python: Path | None, rebuild: bool, build: bool, say) -> LlamaEnv:
    """Find llama.cpp, or build it when allowed; BenchError says why there is none."""
    failed = cache / "llama-build-failed.json"
    if not rebuild:
        found = find_llama_env(cache, python)
        if found is not None:
            return found
        if python is not None:
            raise BenchError(f"{python} cannot import llama_cpp")
        if not build:
            raise BenchError("llama-cpp-python is not built yet; run without --skip-llamacpp once to build it")
        if failed.is_file():
            raise BenchError(f"an earlier build of llama-cpp-python failed ({json.loads(failed.read_text()).get('problem')}); "
                             f"see {cache / 'build-llama-cpp.log'}, then pass --rebuild-llamacpp to try again")
    try:
        env = build_llama_env(cache, source=source, jobs=BUILD_JOBS, say=say)
    except (BenchError, OSError, subprocess.SubprocessError) as err:
        failed.write_text(json.dumps({"problem": str(err), "source": source, "cmake_args": CMAKE_ARGS}))
        raise BenchError(f"building llama-cpp-python failed: {err}") from None
    failed.unlink(missing_ok=True)
    return env


# ---------------------------------------------------------------- models


@dataclass
class PreparedModel:
    spec: ModelSpec
    path: Path | None
    quant: str = "?"
    file_bytes: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    note: str = ""
    problem: str | None = None


def _describe(model: PreparedModel) -> PreparedModel:
    """Quantization and tensor types from the file's metadata (read in a child: see peak_rss_bytes)."""
    out = run_worker(Path(sys.executable), "describe", {"path": str(model.path)}, timeout=300)
    if out.data is not None:
        model.quant, model.tensor_types = out.data["quant"], out.data["tensor_types"]
    model.file_bytes = model.path.stat().st_size
    return model


def smollm2_path() -> Path:
    from fastserve_edge.errors import FastServeError
    from fastserve_edge.models.registry import resolve
    from fastserve_edge.settings import load_settings

    try:
        return resolve("smollm2-135m", load_settings(), pull_missing=True).path
    except FastServeError as err:
        raise BenchError(f"cannot get smollm2-135m: {err}") from None


MAKE_1B = Path(__file__).resolve().with_name("make_1b_gguf.py")
PURE_TYPES = ("Q4_0", "Q8_0")  # what make_1b_gguf.py --pure-quantize can write
MAKE_TIMEOUT_S = 1800


def _make_1b(*args: str) -> None:
    cmd = [sys.executable, str(MAKE_1B), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=MAKE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{MAKE_1B.name} took longer than {MAKE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.strip().splitlines()[-3:])
        raise BenchError(f"{MAKE_1B.name} failed (exit code {done.returncode}): {tail}")


def prepare_1b(spec: ModelSpec, *, cache: Path, tokenizer_from: Path, llama: LlamaEnv | None, say) -> PreparedModel:
    """The cached 1B file in spec's format, made on first use (llama.cpp's quantizer, else gguf-py)."""
    assert spec.llama_ftype is not None
    name, ftype = spec.llama_ftype
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    stem = (f"llama32-1b-shape-random-{GEN_VERSION}" if spec.shape == "1b"
            else f"qwen3-30b-a3b-shape-6l-random-{GEN_VERSION}")
    target = models / f"{stem}-{name.lower()}.gguf"
    pure = models / f"{stem}-{name.lower()}-pure.gguf"
    if target.is_file():
        return _describe(PreparedModel(spec, target))
    if llama is None and pure.is_file():
        return _describe(PreparedModel(spec, pure, note="gguf-py pure quantization"))
    f16 = models / f"{stem}-f16.gguf"
    if not f16.is_file():
        say(f"writing {f16.name} (random weights, {'~2.5' if spec.shape == '1b' else '~8.5'} GB)")
        t0 = time.perf_counter()
        _make_1b(str(f16), "--tokenizer-from", str(tokenizer_from), "--seed", "0", "--shape", spec.shape)
        say(f"wrote {f16.name} in {time.perf_counter() - t0:.0f} s")
    if llama is not None:
        say(f"quantizing to {name} with llama.cpp")
        out = run_worker(llama.python, "quantize", {"source": str(f16), "out": str(target), "ftype": ftype,
                                                     "threads": os.cpu_count() or 1}, timeout=QUANTIZE_TIMEOUT_S)
        if out.problem is None:
            say(f"quantized to {name} in {out.wall_s:.0f} s")
            return _describe(PreparedModel(spec, target))
        say(f"llama.cpp's quantizer failed for {name}: {out.problem}")
    if name not in PURE_TYPES or spec.shape != "1b":
        return PreparedModel(spec, None, quant=name, problem=f"{name} needs llama.cpp's quantizer, which is not available")
    say(f"quantizing to {name} with gguf-py (every matrix {name}; llama.cpp is not available)")
    _make_1b(str(pure), "--pure-quantize", name, "--source", str(f16), "--tokenizer-from", str(tokenizer_from))
    return _describe(PreparedModel(spec, pure, note="gguf-py pure quantization"))


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    model: str
    label: str
    quant: str
    threads: int
    file: str | None
    file_bytes: int
    llama: dict[str, Any] | None = None
    llama_problem: str | None = None
    ours: dict[str, Any] | None = None
    ours_problem: str | None = None
    note: str = ""
    activations: str = "int16"  # ours: --activations

    def ratio(self, key: str) -> float | None:
        if self.ours is None or self.llama is None or not self.llama.get(key):
            return None
        return self.ours[key] / self.llama[key]

    @property
    def rss_limit(self) -> float:
        return RSS_GOAL_FACTOR * self.file_bytes + RSS_GOAL_SLACK

    def rss_pass(self) -> bool | None:
        return None if self.ours is None else self.ours["peak_rss_bytes"] <= self.rss_limit

    def first_token_s(self, side: str = "ours", *, long: bool = False) -> float | None:
        """Load + the first token of a short first message (the cold 32-token warm-up run),
        or with long=True of the whole --prompt-tokens prompt (warm). Runs recorded before
        cold_ttft_s existed have only the long figure."""
        data = self.ours if side == "ours" else self.llama
        if data is None or (not long and "cold_ttft_s" not in data):
            return None
        return data["load_s"] + data["ttft_s" if long else "cold_ttft_s"]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        rss = None if self.ours is None else self.ours["peak_rss_bytes"]
        out.update(
            prefill_ratio=self.ratio("prefill_tok_s"), decode_ratio=self.ratio("decode_tok_s"),
            ours_rss_over_file=None if rss is None or not self.file_bytes else rss / self.file_bytes,
            rss_goal_bytes=self.rss_limit, rss_goal_pass=self.rss_pass(),
            ours_load_plus_first_token_s=self.first_token_s(long=True),  # the --prompt-tokens prompt
            llama_load_plus_first_token_s=self.first_token_s("llama", long=True),
            ours_load_plus_short_message_first_token_s=self.first_token_s(),  # the goal's figure
            llama_load_plus_short_message_first_token_s=self.first_token_s("llama"),
        )
        return out


def measure_quietly(run, args: argparse.Namespace, say) -> tuple[dict | None, str | None]:
    """run() when the machine is quiet, and again if it was not (at most --retries more times)."""
    wait_for_quiet(args.quiet_wait, say)
    out = run()
    for _ in range(args.retries):
        if out.data is None or not out.noisy:
            break
        say(f"  other processes used {out.other_cpu_s:.0f} CPU s during that {out.wall_s:.0f} s run; measuring again",
            "yellow")
        wait_for_quiet(args.quiet_wait, say)
        again = run()
        if again.data is not None and (again.other_cpu_s / again.wall_s) < (out.other_cpu_s / out.wall_s):
            out = again
    return out.figures(), out.problem


ROUND_MEDIANS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "cold_ttft_s", "wall_s")


def over_rounds(runs: list[tuple[dict | None, str | None]]) -> tuple[dict | None, str | None]:
    """One side's figures from its --rounds runs: the median of each rate and time, the
    highest peak RSS, noisy if any run was; the first problem when no run gave figures."""
    done = [data for data, _ in runs if data is not None]
    if not done:
        return None, next((why for _, why in runs if why), None)
    out = dict(done[0])
    out.update({key: statistics.median(d[key] for d in done) for key in ROUND_MEDIANS if key in out})
    out.update(peak_rss_bytes=max(d["peak_rss_bytes"] for d in done), noisy=any(d["noisy"] for d in done),
               rounds=[{key: d.get(key) for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes")} for d in done])
    return out, None


def measure_llama(llama: LlamaEnv, model: PreparedModel, args: argparse.Namespace, threads: int,
                  say) -> tuple[dict | None, str | None]:
    spec = {"model": str(model.path), "threads": threads, "n_ctx": max(LLAMA_N_CTX, args.prompt_tokens + args.gen_tokens + 8),
            "n_batch": max(LLAMA_N_BATCH, args.prompt_tokens), "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens, "repeats": args.repeats}
    return measure_quietly(lambda: run_worker(llama.python, "measure", spec, timeout=args.timeout), args, say)


def measure_ours(model: PreparedModel, args: argparse.Namespace, threads: int, say,
                 activations: str = "int16") -> tuple[dict | None, str | None]:
    cmd = [sys.executable, "-m", "cli.main", "bench", str(model.path), "--threads", str(threads), "--activations", activations,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--repeats", str(args.repeats), "--json"]
    return measure_quietly(lambda: run_json(cmd, timeout=args.timeout), args, say)


# ---------------------------------------------------------------- reporting


def _rate(x: float | None, noisy: bool = False) -> str:
    if x is None:
        return "n/a"
    return (f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}") + ("*" if noisy else "")


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _size(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table_rows(rows: list[Row], args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    pp, tg = f"pp{args.prompt_tokens}", f"tg{args.gen_tokens}"
    header = ["model", "quant", "thr", f"{pp} llama.cpp", f"{pp} ours", "ours/llama", f"{tg} llama.cpp", f"{tg} ours",
              "ours/llama", "file", "our peak RSS", "RSS/file", "RSS goal",
              f"load+1st tok, {WARMUP_PROMPT}-tok msg: ours (llama.cpp)", f"load+1st tok, {pp}: ours (llama.cpp)"]
    body = []
    for r in rows:
        llama = r.llama or {}
        ours = r.ours or {}
        rss = ours.get("peak_rss_bytes")
        goal = r.rss_pass()
        first_texts = []
        for long in (False, True):
            first, theirs = r.first_token_s(long=long), r.first_token_s("llama", long=long)
            text = "n/a" if first is None else f"{first:.2f} s"
            if first is not None and not long and r.model == FIRST_TOKEN_GOAL_MODEL:
                text += " pass" if first <= FIRST_TOKEN_GOAL_S else " FAIL"
            first_texts.append(text + ("" if theirs is None else f" ({theirs:.2f} s)"))
        body.append([
            r.label, r.quant + (" (pure)" if r.note else "") + (f" {r.activations} act." if r.activations != "int16" else ""),
            str(r.threads),
            _rate(llama.get("prefill_tok_s"), llama.get("noisy")), _rate(ours.get("prefill_tok_s"), ours.get("noisy")),
            _ratio(r.ratio("prefill_tok_s")),
            _rate(llama.get("decode_tok_s"), llama.get("noisy")), _rate(ours.get("decode_tok_s"), ours.get("noisy")),
            _ratio(r.ratio("decode_tok_s")),
            _size(r.file_bytes or None), _size(rss),
            "n/a" if rss is None or not r.file_bytes else f"{rss / r.file_bytes:.2f}",
            "n/a" if goal is None else f"{'pass' if goal else 'FAIL'} (<= {_size(r.rss_limit)})",
            *first_texts,
        ])
    return header, body


def caption(results: dict[str, Any]) -> str:
    s = results["settings"]
    llama = results["llama_cpp"]
    build = llama.get("build_note") or "GGML_NATIVE"
    lcp = (f"llama-cpp-python {llama['version']} ({build}, CPU only)" if "version" in llama
           else f"llama.cpp n/a ({llama.get('problem')})")
    return (f"{results['machine']['cpu']}, {results['machine']['cores']} cores; {lcp}; fastserve {results['fastserve']['commit']}"
            f"{' (dirty)' if results['fastserve']['dirty'] else ''}. Median of {s['repeats']} runs"
            f"{f', then of {rounds} rounds, llama.cpp and ours alternating' if (rounds := s.get('rounds', 1)) > 1 else ''}; prefill = "
            f"{s['prompt_tokens']}-token prompt to first token, decode = {s['gen_tokens']} greedy tokens after it; tok/s. "
            f"RSS goal: <= {RSS_GOAL_FACTOR} x file + {RSS_GOAL_SLACK // 2**20} MiB. "
            f"Load+1st tok: opening the model, then its first forward ever ({WARMUP_PROMPT}-token message, "
            f"cold) or the {s['prompt_tokens']}-token prompt (warm); goal <= {FIRST_TOKEN_GOAL_S:.0f} s for "
            f"{FIRST_TOKEN_GOAL_MODEL} on the short message. "
            f"* = other processes used over {NOISE_SHARE:.0%} of a core during that run.")


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def print_report(rows: list[Row], results: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = table_rows(rows, args)
    table = Table(title="fastserve vs llama.cpp", caption=caption(results), caption_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: 80 columns would fold every cell
        console = Console(width=240)
    console.print(table)
    problems = []
    for r in rows:
        where = f"{r.label} {r.quant}, {r.threads} thread(s)"
        if r.llama_problem and r.llama_problem == r.ours_problem:
            problems.append(f"{where}: {r.ours_problem}")
            continue
        problems += [f"{where}: {side}: {why}" for side, why in (("llama.cpp", r.llama_problem), ("ours", r.ours_problem)) if why]
    print("\nMarkdown:\n")
    print(caption(results) + "\n")
    print(markdown(header, body))
    for line in problems:
        print(f"\n- {line}")
    print(f"\nJSON: {args.json_out}")


def report_only(args: argparse.Namespace) -> int:
    """The tables of a saved run, with the settings it was measured with."""
    results = json.loads(args.report.read_text())
    names = {f.name for f in dataclass_fields(Row)}
    rows = [Row(**{k: v for k, v in row.items() if k in names}) for row in results["rows"]]
    args.prompt_tokens = results["settings"]["prompt_tokens"]
    args.gen_tokens = results["settings"]["gen_tokens"]
    args.json_out = args.report
    print_report(rows, results, args)
    return 0


# ---------------------------------------------------------------- main


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=False)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure llama.cpp and ours alternately this many times per row (each in a fresh "
                             "process); each figure the median over the rounds, so drift falls on both sides")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--skip-llamacpp", action="store_true", help="measure ours only (never builds llama.cpp)")
    parser.add_argument("--activations", default=",".join(ACTIVATIONS),
                        help="comma-separated: ours with int16 (default precision) and/or int8 activations")
    parser.add_argument("--llama-cpp-source", default=os.environ.get("FASTSERVE_BENCH_LLAMA_CPP_SOURCE", LLAMA_CPP_SOURCE),
                        help="pip requirement or sdist path to build llama-cpp-python from")
    parser.add_argument("--llama-python", type=Path, help="an existing python that imports llama_cpp (no build)")
    parser.add_argument("--rebuild-llamacpp", action="store_true", help="compile llama-cpp-python again")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine run (model x threads)")
    parser.add_argument("--retries", type=int, default=1,
                        help="measure a run again when other processes used the CPU meanwhile (at most this often)")
    parser.add_argument("--quiet-wait", type=float, default=600,
                        help="seconds to wait, before each run, for other processes to leave the CPU alone")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of an earlier run's JSON; measure nothing")
    parser.add_argument("--json-out", type=Path,
                        default=REPO / "bench" / "results" / f"vs_llamacpp-{datetime.now():%Y-%m-%dT%H%M}.json")
    args = parser.parse_args(argv)
    args.model_keys = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_keys if m not in MODELS]
    if unknown or not args.model_keys:
        parser.error(f"--models: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(MODELS)}")
    try:
        args.thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads must be integers like 1,2, got {args.threads!r}")
    args.activation_list = [a.strip() for a in args.activations.split(",") if a.strip()]
    if not args.activation_list or any(a not in ACTIVATIONS for a in args.activation_list):
        parser.error(f"--activations: choose from {', '.join(ACTIVATIONS)}, got {args.activations!r}")
    if args.retries < 0 or args.quiet_wait < 0:
        parser.error("--retries and --quiet-wait must be 0 or more")
    for flag, value in (("--threads", min(args.thread_counts, default=0)), ("--repeats", args.repeats), ("--rounds", args.rounds),
                        ("--prompt-tokens", args.prompt_tokens), ("--gen-tokens", args.gen_tokens)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.prompt_tokens < WARMUP_PROMPT:
        parser.error(f"--prompt-tokens must be at least {WARMUP_PROMPT} (the warm-up prompt)")
    return args


def progress(err):
    """say(msg, style=""): a progress line on the stderr Console `err`, with seconds since now."""
    from rich.markup import escape

    started = time.perf_counter()

    def say(msg: str, style: str = "") -> None:
        text = escape(msg) if not style else f"[{style}]{escape(msg)}[/]"
        err.print(f"[dim]{time.perf_counter() - started:7.0f}s[/] {text}", highlight=False)

    return say


def report_side(side: str, data: dict | None, why: str | None, say) -> None:
    if data is not None:
        say(f"  {side}: prefill {_rate(data['prefill_tok_s'])} tok/s, decode {_rate(data['decode_tok_s'])} "
            f"tok/s, peak RSS {_size(data['peak_rss_bytes'])} ({data['wall_s']:.0f} s{', noisy' if data['noisy'] else ''})")
    elif why:
        say(f"  {side}: {why}", "red")


def main(argv: list[str]) -> int:
    from rich.console import Console

    from fastserve_edge.cluster.profile import cpu_name  # no torch: this process stays light

    args = parse_args(argv)
    if args.report is not None:
        return report_only(args)
    err = Console(stderr=True)
    say = progress(err)

    cache = bench_cache()
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "fastserve": {"commit": _git("rev-parse", "--short", "HEAD") or "?", "dirty": bool(_git("status", "--porcelain"))},
        "settings": {"models": args.model_keys, "threads": args.thread_counts, "repeats": args.repeats, "rounds": args.rounds,
                     "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "activations": args.activation_list,
                     "llama_n_ctx": LLAMA_N_CTX, "llama_n_batch": LLAMA_N_BATCH, "timeout_s": args.timeout},
        "llama_cpp": {}, "models": {}, "rows": [],
    }

    llama: LlamaEnv | None = None
    try:
        llama = llama_env(cache, source=args.llama_cpp_source, python=args.llama_python,
                          rebuild=args.rebuild_llamacpp, build=not args.skip_llamacpp, say=say)
        results["llama_cpp"] = {"version": llama.version, "python": str(llama.python), "cmake_args": CMAKE_ARGS,
                                "build_note": CMAKE_NOTE, "build_s": llama.build_s, "system_info": llama.system_info}
        if CMAKE_NOTE:
            say(CMAKE_NOTE, "bold yellow")
        say(f"llama-cpp-python {llama.version} at {llama.python}"
            + (f" (compiled in {llama.build_s:.0f} s)" if llama.build_s else " (reused)"))
    except BenchError as problem:
        results["llama_cpp"] = {"problem": str(problem)}
        if not args.skip_llamacpp:
            say(f"llama.cpp is not available: {problem}; measuring ours only, the llama.cpp columns show n/a",
                "bold yellow")

    prepared: list[PreparedModel] = []
    try:
        tokenizer_from = smollm2_path()
    except BenchError as problem:
        tokenizer_from = None
        say(str(problem))
    for key in args.model_keys:
        spec = MODELS[key]
        try:
            if tokenizer_from is None:
                raise BenchError("the SmolLM2 file is needed (as the model or as the 1B tokenizer) and is missing")
            if spec.llama_ftype is None:
                model = _describe(PreparedModel(spec, tokenizer_from))
            else:
                model = prepare_1b(spec, cache=cache, tokenizer_from=tokenizer_from, llama=llama, say=say)
        except (BenchError, OSError, ValueError) as problem:
            model = PreparedModel(spec, None, problem=str(problem))
        results["models"][key] = {"path": str(model.path) if model.path else None, "quant": model.quant,
                                  "file_bytes": model.file_bytes, "tensor_types": model.tensor_types,
                                  "note": model.note, "problem": model.problem}
        prepared.append(model)

    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for model in prepared:
        for threads in args.thread_counts:
            precisions = list(args.activation_list)
            llama_runs: list[tuple[dict | None, str | None]] = []  # one llama.cpp run a round for every precision of ours
            ours_runs: dict[str, list[tuple[dict | None, str | None]]] = {a: [] for a in precisions}
            for round_no in range(args.rounds if model.path is not None else 0):
                tag = f" (round {round_no + 1}/{args.rounds})" if args.rounds > 1 else ""
                if llama is not None and not args.skip_llamacpp:
                    say(f"{model.spec.key} {model.quant}, {threads} thread(s): llama.cpp{tag}")
                    llama_runs.append(measure_llama(llama, model, args, threads, say))
                    report_side("llama.cpp", *llama_runs[-1], say)
                for activations in precisions:
                    say(f"{model.spec.key} {model.quant}, {threads} thread(s): ours, {activations} activations{tag}")
                    ours_runs[activations].append(measure_ours(model, args, threads, say, activations))
                    report_side("ours", *ours_runs[activations][-1], say)
            for activations in precisions:
                row = Row(model.spec.key, model.spec.label, model.quant, threads, str(model.path) if model.path else None,
                          model.file_bytes, note=model.note, activations=activations)
                if model.path is None:
                    row.llama_problem = row.ours_problem = model.problem
                else:
                    row.llama, row.llama_problem = over_rounds(llama_runs)
                    if not llama_runs and not args.skip_llamacpp:
                        row.llama_problem = "llama.cpp not available"
                    row.ours, row.ours_problem = over_rounds(ours_runs[activations])
                rows.append(row)
                results["rows"] = [r.as_dict() for r in rows]
                args.json_out.write_text(json.dumps(results, indent=2))

    results["driver_peak_rss_bytes"] = peak_rss_bytes()
    args.json_out.write_text(json.dumps(results, indent=2))
    print_report(rows, results, args)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
