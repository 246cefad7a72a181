"""bench/serve.py: the llama-server build it reuses, and the figures it pairs and judges."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.serve import (
    BenchError,
    cmake_cache_agrees,
    goals,
    scheduler_seeds,
    sdist_stem,
    server_cmake_args,
    vs_pairs,
)

SRC = Path("/cache/llama-server-src/llama_cpp_python-0.3.36/vendor/llama.cpp")


def test_the_sdist_is_named_after_the_pinned_requirement_or_the_file():
    assert sdist_stem("llama-cpp-python==0.3.36") == "llama_cpp_python-0.3.36"
    assert sdist_stem("/tmp/llama_cpp_python-0.3.36.tar.gz") == "llama_cpp_python-0.3.36"
    with pytest.raises(BenchError, match="pin a version"):
        sdist_stem("llama-cpp-python")


def test_server_flags_are_native_and_build_the_server_only():
    args = server_cmake_args({"avx2"}, 12)
    assert args[:2] == ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    assert "-DLLAMA_BUILD_SERVER=ON" in args and "-DLLAMA_CURL=OFF" in args and "-DGGML_CUDA=OFF" in args
    no_amx = server_cmake_args({"amx_int8"}, 12)  # GCC 12 on AMX: as vs_llamacpp's build
    assert "-DGGML_NATIVE=OFF" in no_amx and "-DGGML_AMX_INT8=OFF" in no_amx and "-DLLAMA_BUILD_SERVER=ON" in no_amx


def test_a_build_made_by_hand_is_adopted_only_with_the_same_flags_and_source():
    args = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"]
    cache = (f"CMAKE_BUILD_TYPE:STRING=Release\nGGML_NATIVE:BOOL=ON\nLLAMA_CURL:UNINITIALIZED=OFF\n"
             f"CMAKE_HOME_DIRECTORY:INTERNAL={SRC}\n")
    assert cmake_cache_agrees(cache, args, SRC)
    assert not cmake_cache_agrees(cache.replace("GGML_NATIVE:BOOL=ON", "GGML_NATIVE:BOOL=OFF"), args, SRC)
    assert not cmake_cache_agrees(cache.replace("LLAMA_CURL:UNINITIALIZED=OFF\n", ""), args, SRC)
    assert not cmake_cache_agrees(cache, args, SRC.parent / "other")


def row(phase: str, engine: str, c: int, tok_s: float, ttft_p99: float, **more) -> dict:
    return {"phase": phase, "engine": engine, "model_key": "smollm2", "model_label": "SmolLM2-135M Q4_1",
            "sessions": c, "tok_s": tok_s, "ttft_p99_s": ttft_p99, "noisy": False, **more}


def test_serve_must_match_llama_server_at_every_concurrency():
    rows = [row("concurrency", "llama-server", 1, 100, 0.05), row("concurrency", "serve", 1, 80, 0.04),
            row("concurrency", "llama-server", 8, 200, 0.5), row("concurrency", "serve", 8, 240, 0.6)]
    pairs = vs_pairs(rows)
    assert [(c, t["tok_s"], o["tok_s"]) for _, c, t, o in pairs] == [(1, 100, 80), (8, 200, 240)]
    by_goal = {g["goal"]: g for g in goals(rows)}
    tok = by_goal["SmolLM2-135M Q4_1: aggregate tok/s serve / llama-server, lowest over C"]
    assert tok["value"] == pytest.approx(0.8) and tok["pass"] is False
    ttft = by_goal["SmolLM2-135M Q4_1: p99 TTFT serve / llama-server, highest over C"]
    assert ttft["value"] == pytest.approx(1.2) and ttft["pass"] is False


def test_structured_cost_and_scheduler_median_over_seeds():
    rows = [row("structured", "serve", 8, 100, 0.1, variant="free"),
            row("structured", "serve", 8, 93, 0.1, variant="json_schema")]
    for seed, (fcfs, mlfq) in {1: (3.0, 1.0), 2: (2.0, 2.0), 3: (4.0, 2.0)}.items():
        rows += [row("scheduler", "serve", 0, 1, 1, scheduler="fcfs", seed=seed, jct_mean_s=fcfs, jct_p99_s=10.0),
                 row("scheduler", "serve", 0, 1, 1, scheduler="mlfq", seed=seed, jct_mean_s=mlfq, jct_p99_s=10.5)]
    assert [s[1] for s in scheduler_seeds(rows)] == [3.0, 1.0, 2.0]
    by_goal = {g["goal"]: g for g in goals(rows)}
    assert by_goal["SmolLM2-135M Q4_1: tok/s with json_schema / without, 8 sessions"]["pass"] is True
    mean = by_goal["mean JCT, fcfs / mlfq (median of 3 seeds)"]
    assert mean["value"] == 2.0 and mean["pass"] is True
    assert by_goal["p99 JCT, mlfq / fcfs (median of 3 seeds)"]["value"] == pytest.approx(1.05)
