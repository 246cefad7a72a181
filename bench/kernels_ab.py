"""Our kernels at another git revision against the working tree's, in one process, calls alternating.

    python bench/kernels_ab.py --base HEAD~1                      # matrices, then SmolLM2 decode
    python bench/kernels_ab.py --base 3e1e60c --model FILE.gguf --threads 1,2 --rows 1,4
    python bench/kernels_ab.py --base HEAD --tree-activations int8  # int8 against int16 activations

On a noisy machine (this project's VM drifts by +-30% from minute to minute) two runs one
after the other cannot resolve a 10% change, and bench/vs_llamacpp.py runs its engines one
after the other. Here both builds of kernels/*.c are loaded into the same process, and every
measurement alternates between them (ABBA order), so drift falls on both alike:

- matrices: random Q4_0 and Q6_K blocks in the shapes of a 1B model (one 8192 x 2048 matrix
  that stays in cache; sixteen 16384 x 2048 and the 128256 x 2048 head, read from memory),
  `--rows` activation rows at a time; median ms per call. Q4_0 runs in the layout each build
  loads it in (eight-row groups where the build has them, else the file's order).
- model: the GGUF loaded twice, once per build (the weights are one memory map), a prompt,
  then decode tokens alternating between the two; median ms per token.

The ratio is base / working tree: above 1 means the working tree is faster. With
--tree-activations int8 the working tree's side runs int8 activations where the format has
them, the base int16: of the matrices Q4_0 (Q6_K, in the file's rows, keeps int16); of the
model every x8 matrix, K-quants too. Nothing is written; the builds go to a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.vs_llamacpp import smollm2_path  # noqa: E402
from fastserve_edge.engine import kernels  # noqa: E402
from fastserve_edge.engine.generate import LocalStage, Pipeline  # noqa: E402
from fastserve_edge.engine.model import Stage  # noqa: E402
from fastserve_edge.engine.quant import RuntimeWeights  # noqa: E402
from fastserve_edge.models import open_model  # noqa: E402


def build(revision: str | None, folder: Path) -> kernels.Kernels:
    """The kernels of `revision` (None: the working tree), compiled as kernels.load() does."""
    sources = kernels.SOURCES
    if revision is not None:
        sources = []
        for path in kernels.SOURCES:
            rel = path.relative_to(REPO).as_posix()
            shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{rel}"], capture_output=True)
            if shown.returncode != 0:  # a source that came later (attend.c): the base build goes without
                continue
            text = shown.stdout
            copy = folder / revision.replace("/", "_") / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(text)
            sources.append(copy)
    out = folder / f"{revision or 'tree'}.so".replace("/", "_")
    kernels._build("native", out, sources)
    return kernels.Kernels(out, "native")


def blocks(fmt: int, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Random blocks with sane fp16 scales (random bytes there would be NaN or inf)."""
    if fmt == kernels.FMT_Q4_0:
        b = rng.integers(0, 256, size=(n, k // 32, 18), dtype=np.uint8)
        b[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    else:  # Q6_K
        b = rng.integers(0, 256, size=(n, k // 256, 210), dtype=np.uint8)
        b[:, :, 192:208] = rng.integers(0, 64, size=(n, k // 256, 16)).astype(np.uint8)
        b[:, :, 208:210] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return torch.from_numpy(b.reshape(n, -1))


def alternate(calls: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds of each call, run ABBA-alternating `rounds` times."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matrices(builds: dict[str, kernels.Kernels], rows: list[int], tree_fmt_flag: int = 0) -> None:
    rng = np.random.default_rng(0)
    k = 2048
    cases = [("Q4_0 8192x2048, in cache", kernels.FMT_Q4_0, 32, [blocks(kernels.FMT_Q4_0, 8192, k, rng)], 8192),
             ("Q4_0 16 x 16384x2048, memory", kernels.FMT_Q4_0, 32,
              [blocks(kernels.FMT_Q4_0, 16384, k, rng) for _ in range(16)], 16384),
             ("Q6_K 8192x2048, in cache", kernels.FMT_Q6_K, 256, [blocks(kernels.FMT_Q6_K, 8192, k, rng)], 8192),
             ("Q6_K 128256x2048 (head), memory", kernels.FMT_Q6_K, 256, [blocks(kernels.FMT_Q6_K, 128256, k, rng)], 128256)]
    def layout(name: str, lib: kernels.Kernels, fmt: int, mats: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """The format and blocks this build runs: in eight-row groups where it has them (the
        loader's choice), int8 activations in the file's order when asked for the tree."""
        if fmt in kernels.X8_OF:
            if name == "tree" and tree_fmt_flag:
                return fmt | tree_fmt_flag, mats
            if lib.x8:
                return kernels.X8_OF[fmt], [lib.repack_x8(fmt, w, k) for w in mats]
        return fmt, mats

    prepared = [(label, group, n, len(mats), {name: layout(name, lib, fmt, mats) for name, lib in builds.items()})
                for label, fmt, group, mats, n in cases]
    for m in rows:
        x = torch.randn(m, k)
        for label, group, n, count, per_build in prepared:
            reps = max(1, 8 // count)

            def call(lib, fmt, mats):
                return lambda: [lib.matmul(fmt, group, w, n, k, x) for _ in range(reps) for w in mats]
            med = alternate({name: call(lib, *per_build[name]) for name, lib in builds.items()}, rounds=15)
            report(f"{m} row(s), {label}", {name: t / reps / count for name, t in med.items()}, "ms/call")


def model(builds: dict[str, kernels.Kernels], path: Path, tokens: int, tree_activations: str = "int16") -> None:
    source = open_model(path)
    cfg = source.config
    pipes = {}
    for name, lib in builds.items():
        weights = RuntimeWeights(source, activations=tree_activations if name == "tree" else "int16")
        weights.kernels = lib  # this build instead of kernels.load()'s
        pipes[name] = Pipeline(cfg, [LocalStage(Stage(cfg, weights, 0, cfg.n_layers, max_tokens=512))], 512)
    prompt = [(7 * i) % 1000 + 5 for i in range(256)]
    with torch.inference_mode():
        last = {name: int(p.forward("ab", prompt, 0).argmax()) for name, p in pipes.items()}
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for i in range(tokens):
            for name in list(pipes) if i % 2 == 0 else list(pipes)[::-1]:
                t = time.perf_counter()
                logits = pipes[name].forward("ab", [last[name]], len(prompt) + i)
                times[name].append(time.perf_counter() - t)
                last[name] = int(logits.argmax())
    report(f"{path.name} decode at depth {len(prompt)}", {n: statistics.median(t) for n, t in times.items()}, "ms/token")


def report(label: str, seconds: dict[str, float], unit: str) -> None:
    base, tree = seconds["base"], seconds["tree"]
    print(f"{label:44s} base {base * 1e3:9.3f}  tree {tree * 1e3:9.3f} {unit}   base/tree {base / tree:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose kernels/*.c are the baseline")
    parser.add_argument("--model", type=Path, help="GGUF file for the decode A/B (default: smollm2-135m from the cache)")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts")
    parser.add_argument("--rows", default="1,4", help="activation rows per matrix call, comma-separated")
    parser.add_argument("--tokens", type=int, default=24, help="decode tokens per build")
    parser.add_argument("--skip-matrices", action="store_true")
    parser.add_argument("--tree-activations", choices=("int16", "int8"), default="int16",
                        help="the working tree's activation precision (the base: int16)")
    args = parser.parse_args()
    path = args.model if args.model is not None else smollm2_path()
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"base": build(args.base, Path(tmp)), "tree": build(None, Path(tmp))}
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            print(f"-- {threads} thread(s), base {args.base} vs the working tree")
            if not args.skip_matrices:
                matrices(builds, [int(m) for m in args.rows.split(",")],
                         kernels.FMT_ACT8 if args.tree_activations == "int8" else 0)
            model(builds, path, args.tokens, args.tree_activations)


if __name__ == "__main__":
    main()
