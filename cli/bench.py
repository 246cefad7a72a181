"""`fastserve bench [MODEL]`: this machine running the model alone, measured."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.common import Activations, err_console, freeze_imports, user_errors
from cli.pull import resolve_or_pull
from fastserve_edge.errors import ConfigError
from fastserve_edge.settings import load_settings


def command(
    model: Annotated[str | None, typer.Argument(help="model reference (default: smollm2-135m)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores)")] = None,
    activations: Activations = "int16",
    prompt_tokens: Annotated[int, typer.Option(help="prompt length for the prefill figure")] = 512,
    gen_tokens: Annotated[int, typer.Option(help="tokens generated for the decode figure")] = 128,
    repeats: Annotated[int, typer.Option(help="runs per figure; the median is reported")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """Prefill and decode tokens/s, time to first token and peak memory of this machine."""
    from fastserve_edge.engine.benchmark import WARMUP_PROMPT, bench_model  # torch: only when the command runs
    from fastserve_edge.engine.local import load_local_model, set_threads
    from fastserve_edge.engine.quant import set_activations

    freeze_imports()
    with user_errors():
        for flag, value, low in (("--prompt-tokens", prompt_tokens, 1), ("--gen-tokens", gen_tokens, 1), ("--repeats", repeats, 1)):
            if value < low:
                raise ConfigError(f"{flag} must be at least {low}, got {value}")
        settings = load_settings()
        n_threads = set_threads(threads)
        set_activations(activations)
        resolved = resolve_or_pull(model, settings)
        t0 = time.perf_counter()
        # the context a run needs, as llama-bench sizes it (the KV cache follows use anyway)
        local = load_local_model(resolved.path, ctx=None, max_ctx=prompt_tokens + gen_tokens + 8)
        load_s = time.perf_counter() - t0
        if prompt_tokens + gen_tokens + 1 > local.pipeline.ctx:
            raise ConfigError(f"--prompt-tokens + --gen-tokens must stay below the model's context ({local.pipeline.ctx})")
        with err_console.status(f"benchmarking {resolved.name} with {n_threads} thread(s)…"):
            result = bench_model(local, name=resolved.name, threads=n_threads, prompt_tokens=prompt_tokens,
                                 gen_tokens=gen_tokens, repeats=repeats, load_s=load_s, activations=activations)
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    table = Table(title=f"fastserve bench · {result.model} · {result.activations} activations")
    for col in ("threads", "prefill tok/s", "decode tok/s", "first token", "load", "then 1st token, cold", "peak RSS"):
        table.add_column(col, justify="right")
    table.add_row(str(result.threads), f"{result.prefill_tok_s:.1f} (pp{result.prompt_tokens})",
                  f"{result.decode_tok_s:.1f} (tg{result.gen_tokens})", f"{result.ttft_s:.3f} s",
                  f"{result.load_s:.2f} s", f"{result.cold_ttft_s:.3f} s ({min(WARMUP_PROMPT, result.prompt_tokens)}-token prompt)",
                  f"{result.peak_rss_bytes / 2**20:.0f} MiB")
    Console().print(table)
