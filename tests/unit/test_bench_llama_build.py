"""bench/vs_llamacpp.py: the llama.cpp build flags follow the CPU and the compiler."""

from __future__ import annotations

from bench.vs_llamacpp import cmake_args


def test_native_build_where_nothing_is_known_to_break():
    args, why = cmake_args({"avx512f", "avx512_vnni"}, 12)
    assert "-DGGML_NATIVE=ON" in args.split() and why is None
    args, why = cmake_args({"amx_int8", "amx_tile"}, 13)  # GCC 13 keeps the tile configuration's stores
    assert "-DGGML_NATIVE=ON" in args.split() and why is None


def test_amx_left_out_where_gcc_12_would_crash_it():
    args, why = cmake_args({"amx_int8", "amx_tile", "avx512f"}, 12)
    flags = args.split()
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AMX_INT8=OFF" in flags
    assert "-DGGML_AVX512_VNNI=ON" in flags and "-DGGML_CUDA=OFF" in flags
    assert "GCC 12" in why and "AMX" in why


def test_unknown_compiler_keeps_the_native_build():
    args, why = cmake_args({"amx_int8"}, None)
    assert "-DGGML_NATIVE=ON" in args.split() and why is None
