"""Tensor parallelism on the namespace LAN: one machine against a tensor-parallel group.

    sudo .venv/bin/python bench/tensor.py --models smollm2,1b-q4_0,1b-q4_k_m,8b-q4_0 --machines 2

The LAN is tests/netns.py's; every machine's eth0 is shaped with tc tbf to --link-rate with a
32 KB burst (each exchange pays its time on the wire, as on a real link), and each machine
runs pinned to a core of its own (`taskset`), one thread. Rows, for each model:
- one machine: this project's one-machine path (Pipeline over local_stages: the prompt
  through the GEMM path, decode through the C block), in m0 alone;
- the same, on N machines at once, each running the whole model: here the "machines" share
  one box's memory bus, which a real LAN's do not; this row says how much of a tensor-parallel
  group's gain that sharing costs on this box (ideal group: N x this row's speed);
- tensor-parallel over N machines (engine/tensor.py over cluster/datapath.py), sealed, and
  once with plaintext frames (what the encryption costs).
Decode: greedy tokens after a short prompt; prefill: a --prompt-token prompt. Also the
data path's exchanges and bytes per decode token and its mean time per exchange.
The 1B-shaped models are bench/vs_llamacpp.py's (random weights, written on first use; Q4_K_M
needs its llama.cpp build, made by running that bench once); the 8B-shaped Q4_0 (Llama-3.1-8B's
shapes) is written here on first use by bench/make_1b_gguf.py --shape 8b --random-q4_0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PORT = 47123


def rank_main(argv: list[str]) -> None:
    """One machine of a run (started by main() inside a namespace); rank 0 prints a JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--addresses", default="")
    p.add_argument("--model", required=True)
    p.add_argument("--secret", default="")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--single", action="store_true")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from fastserve_edge.models import open_model

    source = open_model(Path(a.model))
    cfg = source.config
    ctx = a.prompt + a.decode + 64
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 1000, (a.prompt,), generator=gen).tolist()
    short = prompt[:16]
    if a.single:
        from fastserve_edge.engine.generate import Pipeline, local_stages
        from fastserve_edge.engine.sampling import Sampler, SamplingParams

        pipe = Pipeline(cfg, local_stages(source, max_tokens=ctx), ctx)
        greedy = Sampler(SamplingParams(temperature=0))
        pipe.forward("warm", short, 0)
        t0 = time.perf_counter()
        pipe.forward("p", prompt, 0)
        prefill_s = time.perf_counter() - t0
        tok = pipe.next_token("d", short, 0, greedy, short)
        t0 = time.perf_counter()
        for i in range(a.decode):
            tok = pipe.next_token("d", [tok], len(short) + i, greedy, short)
        decode_s = time.perf_counter() - t0
        print(json.dumps({"prefill_tok_s": a.prompt / prefill_s, "decode_tok_s": a.decode / decode_s}), flush=True)
        return
    from fastserve_edge.cluster import datapath
    from fastserve_edge.engine import kernels
    from fastserve_edge.engine.tensor import Slices, SliceWeights, TensorGroup, TensorSlice, TensorWorker

    addresses = [(host, int(port)) for host, port in (x.rsplit(":", 1) for x in a.addresses.split(","))]
    n = len(addresses)
    slices = Slices.split(cfg, [1.0] * n)
    t0 = time.perf_counter()
    part = TensorSlice(SliceWeights(source, slices, a.rank), max_tokens=ctx)
    load_s = time.perf_counter() - t0
    listener = datapath.listen(addresses[a.rank][0], addresses[a.rank][1])
    links = datapath.connect(kernels.load(), a.rank, addresses, listener, bytes.fromhex(a.secret), timeout_s=120,
                             sealed=not a.plain)
    if a.rank:
        worker = TensorWorker(part, links.mesh)
        worker.serve()
        if worker.error is not None:
            print(f"rank {a.rank}: {worker.error}", file=sys.stderr)
        return
    group = TensorGroup(part, links.mesh)
    mesh = links.mesh
    group.forward("warm", torch.tensor([short]), 0)
    t0 = time.perf_counter()
    group.forward("p", torch.tensor([prompt]), 0)
    prefill_s = time.perf_counter() - t0
    tok = int(group.forward("d", torch.tensor([short]), 0)[0].argmax())
    e0, b0, s0 = mesh.exchanges, mesh.bytes_out, mesh.seconds
    t0 = time.perf_counter()
    for i in range(a.decode):
        tok = int(group.forward_batch(["d"], torch.tensor([tok]), [len(short) + i])[0].argmax())
    decode_s = time.perf_counter() - t0
    ex, by, sec = mesh.exchanges - e0, mesh.bytes_out - b0, mesh.seconds - s0
    group.close()
    print(json.dumps({"prefill_tok_s": a.prompt / prefill_s, "decode_tok_s": a.decode / decode_s, "load_s": load_s,
                      "exchanges_per_token": ex / a.decode, "bytes_out_per_token": by / a.decode,
                      "ms_per_exchange": 1e3 * sec / max(ex, 1),
                      "exchange_ms_per_token": 1e3 * sec / a.decode}), flush=True)


def model_path(name: str) -> Path:
    """smollm2 (the model cache), 1b-* (bench/vs_llamacpp.py's), 8b-q4_0 (written here on first use)."""
    from bench.vs_llamacpp import GEN_VERSION, MAKE_1B, MODELS, bench_cache, prepare_1b
    if name == "smollm2":
        from tests.models_fixtures import smollm2_path
        return smollm2_path()
    if name == "8b-q4_0":
        from tests.models_fixtures import smollm2_path
        path = bench_cache() / "models" / f"llama31-8b-shape-random-{GEN_VERSION}-q4_0.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"writing {path.name} (random Q4_0 blocks, ~4.7 GB)", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(MAKE_1B), str(path), "--shape", "8b", "--random-q4_0",
                            "--tokenizer-from", str(smollm2_path())], check=True)
        return path
    spec = MODELS[name]
    from tests.models_fixtures import smollm2_path
    prepared = prepare_1b(spec, cache=bench_cache(), tokenizer_from=smollm2_path(), llama=None,
                          say=lambda m: print(m, file=sys.stderr))
    if prepared.path is None:
        raise SystemExit(f"{name}: {prepared.problem}")
    return prepared.path


def predictions(model: Path, one: dict, group: dict, machines: int, link_rate: str, up_to: int = 8) -> list[dict]:
    """The planner's decode predictions for 1..up_to identical machines, calibrated by this run:
    a machine's whole-model decode time is the one-machine row's (as its bandwidth), the
    exchange latency the measured ms per exchange of the N-machine group minus its bytes' wire
    time, the link --link-rate. Each predicted machine has a memory bus of its own (a real
    LAN); this box's "machines" share one, which the 'N at once' row measures."""
    import tempfile

    from bench.cluster import parse_rate
    from fastserve_edge.cluster import planner
    from fastserve_edge.cluster.coordinator import model_shape
    from fastserve_edge.cluster.shard_cache import build_manifest
    from fastserve_edge.models import open_model

    source = open_model(model)
    with tempfile.TemporaryDirectory() as cache:
        shape = model_shape(source, build_manifest(source, model, Path(cache)), 1024)
    link_gbps = parse_rate(link_rate) * 8 / 1e9
    whole_ms = 1e3 / one["decode_tok_s"]
    bytes_per_exchange = group["bytes_out_per_token"] / group["exchanges_per_token"]
    wire_ms = bytes_per_exchange * 8 / (link_gbps * 1e6)
    exchange_ms = max(group["ms_per_exchange"] - wire_ms, 0.001)
    gbs = (shape.weight_bytes + shape.head_bytes) / (whole_ms * 1e6)

    def machine(i: int) -> planner.Machine:
        return planner.Machine(f"m{i}", f"m{i}", "" if i == 0 else f"10.0.0.{i}:1", 64 << 30, 1e6, 1e6, gbs,
                               is_host=i == 0)

    rows = []
    for k in range(1, up_to + 1):
        p = planner.plan([machine(i) for i in range(k)], shape, layout="tensor" if k > 1 else "single",
                         link_gbps=link_gbps, exchange_ms=exchange_ms)
        rows.append({"machines": k, "ms": p.est_ms_per_token, "tok_s": 1e3 / p.est_ms_per_token,
                     "x_one": whole_ms / p.est_ms_per_token,
                     "measured": one["decode_tok_s"] if k == 1 else group["decode_tok_s"] if k == machines else None})
    return rows


def run(lan, cpus, model: Path, n: int, args, *, single: bool = False, plain: bool = False) -> dict:
    me = [sys.executable, str(Path(__file__).resolve()), "rank", "--model", str(model),
          "--prompt", str(args.prompt), "--decode", str(args.decode)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if single:
        cmd = ["taskset", "-c", cpus[0], *me, "--rank", "0", "--single"]
        if n == 1:
            out = lan[0].run(cmd, timeout=1800, env=env)
            return json.loads(out.stdout.strip().splitlines()[-1])
        # n machines each running the whole model at once: what sharing this box's memory costs
        procs = [lan[r].popen(["taskset", "-c", cpus[r % len(cpus)], *cmd[3:]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(n)]
        got = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in procs]
        return {k: sum(g[k] for g in got) / n for k in got[0]}
    addresses = ",".join(f"{lan[r].ip}:{PORT}" for r in range(n))
    secret = os.urandom(32).hex()
    procs = []
    for r in range(n - 1, -1, -1):
        cmd = ["taskset", "-c", cpus[r % len(cpus)], *me, "--rank", str(r), "--addresses", addresses,
               "--secret", secret, *(["--plain"] if plain else [])]
        procs.append(lan[r].popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [proc.communicate(timeout=1800) for proc in procs]
    stdout, stderr = outs[-1]
    lines = stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"rank 0 printed nothing: {stderr[-2000:]} / {[o[1][-500:] for o in outs[:-1]]}")
    return json.loads(lines[-1])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,1b-q4_0")
    p.add_argument("--machines", type=int, default=2)
    p.add_argument("--link-rate", default="1gbit")
    p.add_argument("--burst", default="32kb")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-plain", action="store_true", help="skip the plaintext run")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("this benchmark builds a LAN of network namespaces: run it as root", file=sys.stderr)
        return 2
    from tests import netns

    cores = sorted(os.sched_getaffinity(0))
    cpus = [str(c) for c in cores]
    results = []
    predicted: dict[str, list[dict]] = {}
    with netns.lan(args.machines) as lan:
        for m in lan:
            netns.limit_link(m, rate=args.link_rate, burst=args.burst)
        for name in args.models.split(","):
            model = model_path(name)
            together = f"one machine, {args.machines} at once (each)"
            rows: dict[str, list[dict]] = {"one machine": [], together: [], f"tensor x{args.machines}": []}
            if not args.no_plain:
                rows[f"tensor x{args.machines}, plaintext"] = []
            for _ in range(args.repeats):  # alternately: this machine's speed drifts
                rows["one machine"].append(run(lan, cpus, model, 1, args, single=True))
                rows[together].append(run(lan, cpus, model, args.machines, args, single=True))
                rows[f"tensor x{args.machines}"].append(run(lan, cpus, model, args.machines, args))
                if not args.no_plain:
                    rows[f"tensor x{args.machines}, plaintext"].append(
                        run(lan, cpus, model, args.machines, args, plain=True))
            base = None
            for label, runs in rows.items():
                best = {k: max(r[k] for r in runs) if k.endswith("tok_s") else min(r[k] for r in runs)
                        for k in runs[0]}
                base = base or best
                results.append({"model": name, "layout": label, **best,
                                "decode_x": best["decode_tok_s"] / base["decode_tok_s"],
                                "prefill_x": best["prefill_tok_s"] / base["prefill_tok_s"]})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            one, group = (next(r for r in results if r["model"] == name and r["layout"] == label)
                          for label in ("one machine", f"tensor x{args.machines}"))
            predicted[name] = predictions(model, one, group, args.machines, args.link_rate)
    print(f"\nNamespace LAN, links {args.link_rate} (tc tbf, burst {args.burst}), each machine one pinned core, "
          f"one thread; best of {args.repeats}; prompt {args.prompt} tokens, {args.decode} greedy decode tokens.\n")
    print("| model | layout | decode tok/s | x one | prefill tok/s | x one | exchanges/token | KB out/token "
          "| ms/exchange | exchange ms/token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ex = r.get("exchanges_per_token")
        extra = (f"{ex:.0f} | {r['bytes_out_per_token'] / 1024:.0f} | {r['ms_per_exchange']:.3f} | "
                 f"{r['exchange_ms_per_token']:.2f}") if ex is not None else "- | - | - | -"
        print(f"| {r['model']} | {r['layout']} | {r['decode_tok_s']:.1f} | {r['decode_x']:.2f}x | "
              f"{r['prefill_tok_s']:.0f} | {r['prefill_x']:.2f}x | {extra} |")
    print(f"\nThe planner's decode predictions for identical machines, each with a memory bus of its own, "
          f"calibrated by this run (a machine = the one-machine row; the exchange latency = the measured "
          f"ms/exchange minus its bytes' time on a {args.link_rate} link):\n")
    print("| model | " + " | ".join(f"{k} machines" for k in range(1, 9)) + " |")
    print("|---|" + "---:|" * 8)
    for name, rows in predicted.items():
        cells = [f"{r['tok_s']:.1f} tok/s ({r['x_one']:.2f}x)" + (f", measured {r['measured']:.1f}"
                                                                  if r["measured"] else "") for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "predicted": predicted}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rank":
        rank_main(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
