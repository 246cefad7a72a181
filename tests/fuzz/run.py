"""Runs one fuzz target for N examples: `python -m tests.fuzz.run wire|chunks|gguf|txt N`.

Hypothesis draws each example as a seed from the corpus with a few mutations (bit flips, byte
writes, insertions, deletions, truncation, and little-endian integers that break counts and
sizes: 0, -1, 2^31, 2^63...), or for TXT records, a seed record with fields replaced. The
examples are the same on every run unless FASTSERVE_FUZZ_RANDOM=1. tests/fuzz/test_fuzz.py
runs this in a subprocess that loads the kernels' sanitizer build.
"""

from __future__ import annotations

import json
import os
import struct
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets

INTERESTING = [0, 1, 2, 7, 8, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
               2**64 - 1]
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING)),
)


def mutate(seed: bytes, mutations: list[tuple]) -> bytes:
    data = bytearray(seed)
    for op, at, arg in mutations:
        at = at % (len(data) + 1)
        if op == "flip" and at < len(data):
            data[at] ^= 1 << arg
        elif op == "set" and at < len(data):
            data[at] = arg
        elif op == "insert":
            data[at:at] = arg
        elif op == "delete":
            del data[at:at + arg]
        elif op == "truncate":
            del data[at:]
        elif op in ("u32", "u64"):
            size = 4 if op == "u32" else 8
            data[at:at + size] = struct.pack("<Q", arg % 2**64)[:size]
    return bytes(data)


def mutated(kind: str) -> st.SearchStrategy[bytes]:
    return st.builds(mutate, st.sampled_from(targets.seeds(kind)), st.lists(MUTATION, max_size=6))


TEXT = st.one_of(st.none(), st.text(max_size=80), st.sampled_from(["", "0", "-1", "nan", "inf", "1e999", "0x10",
                                                                     "1_000", "9" * 5000, "ready", "host", "peer"]))


def records() -> st.SearchStrategy[dict]:
    seeds = [json.loads(s) for s in targets.seeds("txt")]

    def edit(seed: dict, changes: dict) -> dict:
        return {**seed, **changes}

    return st.builds(edit, st.sampled_from(seeds), st.dictionaries(st.sampled_from(sorted(seeds[0]) + ["x"]), TEXT,
                                                                    max_size=4))


def chunk_lists() -> st.SearchStrategy[list]:
    def split(blob: bytes, cuts: list[int], edits: list[tuple[int, int, int]]) -> list[tuple]:
        edges = sorted({0, len(blob), *(c % (len(blob) + 1) for c in cuts)})
        pieces = [[i, a, len(blob), blob[a:b], b == len(blob)] for i, (a, b) in enumerate(zip(edges, edges[1:]))]
        for which, field, value in edits:  # index, offset or total of one chunk changed
            if pieces:
                pieces[which % len(pieces)][field] = value % (2**32 if field == 0 else 2**64)  # uint32 index
        return [tuple(p) for p in pieces]

    return st.builds(split, mutated("wire"), st.lists(st.integers(0, 1 << 16), max_size=4),
                     st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2), st.sampled_from(INTERESTING)),
                              max_size=2))


def main(kind: str, examples: int) -> None:
    config = settings(max_examples=examples, deadline=None, database=None,
                      derandomize=os.environ.get("FASTSERVE_FUZZ_RANDOM") != "1",
                      suppress_health_check=list(HealthCheck))
    if kind == "txt":
        test = given(records(), st.integers(-1, 70000))(targets.txt)
    elif kind == "chunks":
        test = given(chunk_lists())(targets.chunks)
    else:
        test = given(mutated(kind))(getattr(targets, kind))
    config(test)()
    print(f"{kind}: {examples} examples, no failure")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
