"""How fast this machine runs a model alone: prefill and decode tokens/s, first token, memory.

Used by `fastserve bench` and by the comparisons under bench/. Each figure is the median
of `repeats` runs after one warm-up; the prompt is real text so the tokenizer is exercised.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from fastserve_edge.engine.local import LocalModel
from fastserve_edge.engine.sampling import Sampler, SamplingParams

_FILLER = (
    "The quick brown fox jumps over the lazy dog while the committee discusses the budget "
    "for next year's conference on distributed systems, caching, and numerical precision. "
)


@dataclass
class BenchResult:
    model: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float        # prefill of the prompt + the first sampled token
    load_s: float
    cold_ttft_s: float   # the first forward after loading (the 32-token warm-up prompt): what
                         # a person waits for after `load_s` when their first message is short
    peak_rss_bytes: int
    activations: str = "int16"  # what the kernels rounded activations to (--activations)

    def as_dict(self) -> dict:
        return asdict(self)


WARMUP_PROMPT, WARMUP_GEN = 32, 4  # one short run first, as llama-bench does; its first token is cold


def peak_rss_bytes() -> int:
    """This process's own peak resident memory. VmHWM, not ru_maxrss: a child process
    inherits its parent's ru_maxrss on Linux, so a bench run from a big parent over-reports."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(local: LocalModel, n: int) -> list[int]:
    ids = local.tokenizer.encode(_FILLER * (n // 8 + 2))
    return ids[:n]


def run_once(local: LocalModel, ids: list[int], gen_tokens: int, session: str) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, ttft s) for one fresh session; stop tokens are ignored."""
    pipe = local.pipeline
    greedy = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))
    pipe.drop(session)
    t0 = time.perf_counter()
    logits = pipe.forward(session, ids, 0)
    token = greedy(logits)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(gen_tokens):
        logits = pipe.forward(session, [token], len(ids) + i)
        token = greedy(logits)
    decode = time.perf_counter() - t1
    pipe.drop(session)
    return len(ids) / ttft, gen_tokens / decode, ttft


def bench_model(local: LocalModel, *, name: str, threads: int, prompt_tokens: int, gen_tokens: int,
                repeats: int = 3, load_s: float = 0.0, activations: str = "int16") -> BenchResult:
    if prompt_tokens + gen_tokens + 1 > local.pipeline.ctx:
        raise ValueError("prompt + generated tokens exceed the context")
    ids = prompt_ids(local, prompt_tokens)
    with torch.inference_mode():
        cold_ttft = run_once(local, ids[: min(WARMUP_PROMPT, len(ids))], WARMUP_GEN, "bench-warmup")[2]
        runs = [run_once(local, ids, gen_tokens, f"bench-{i}") for i in range(repeats)]
    prefill, decode, ttft = (statistics.median(r[i] for r in runs) for i in range(3))
    return BenchResult(model=name, threads=threads, prompt_tokens=len(ids), gen_tokens=gen_tokens,
                       prefill_tok_s=prefill, decode_tok_s=decode, ttft_s=ttft, load_s=load_s, cold_ttft_s=cold_ttft,
                       peak_rss_bytes=peak_rss_bytes(), activations=activations)
