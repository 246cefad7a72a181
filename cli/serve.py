"""`fastserve serve [MODEL]`: an OpenAI-compatible HTTP API over a model on this machine.

This slice serves from one machine (no peers yet). The URL goes to stdout, one line;
everything else to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

import typer
from rich.markup import escape

from cli.common import err_console, user_errors
from cli.pull import resolve_or_pull
from fastserve_edge.errors import ConfigError
from fastserve_edge.serving.scheduler import SCHEDULERS, make_scheduler
from fastserve_edge.settings import load_settings


def command(
    model: Annotated[str | None, typer.Argument(help="alias, .gguf path, HF folder, hf:ORG/REPO or hf:ORG/REPO/FILE, ollama:NAME or ollama:NAME:TAG")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (anything but loopback needs --api-key)",
                                      envvar="FASTSERVE_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port; the URL printed says which)")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="clients must send 'Authorization: Bearer KEY'",
                                                envvar="FASTSERVE_API_KEY")] = None,
    max_sessions: Annotated[int, typer.Option(help="sessions that generate at the same time; others queue")] = 4,
    scheduler: Annotated[str, typer.Option(help=f"which waiting session runs next: {' | '.join(SCHEDULERS)}")] = "fcfs",
    ctx: Annotated[int | None, typer.Option(help="context length (default: the model's, capped at 4096)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores)", envvar="FASTSERVE_THREADS")] = None,
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback --host without --api-key")] = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat/completions, completions, models, metrics)."""
    with user_errors():
        serve(model=model, host=host, port=port, api_key=api_key, max_sessions=max_sessions,
              scheduler=scheduler, ctx=ctx, threads=threads, insecure=insecure)


def serve(*, model: str | None, host: str, port: int, api_key: str | None, max_sessions: int, scheduler: str,
          ctx: int | None, threads: int | None, insecure: bool) -> None:
    from fastserve_edge.serving.api import ServeConfig, check_exposure, create_app

    # every check that needs no model first: a refusal must not wait for a model load
    check_exposure(host, api_key, insecure)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if max_sessions < 1:
        raise ConfigError(f"--max-sessions must be at least 1, got {max_sessions}")
    make_scheduler(scheduler)
    scheduler = scheduler.strip().lower()

    from fastserve_edge.engine.local import load_local_model, set_threads

    settings = load_settings()
    n_threads = set_threads(threads)
    resolved = resolve_or_pull(model, settings)
    with err_console.status(f"loading {resolved.name}…"):
        local = load_local_model(resolved.path, ctx=ctx, max_ctx=settings.chat.max_ctx)
    d = settings.chat
    config = ServeConfig(model_id=resolved.name, api_key=api_key, temperature=d.temperature, top_p=d.top_p,
                         top_k=d.top_k, min_p=d.min_p, max_tokens=d.max_tokens)
    app = create_app(local.pipeline, local.tokenizer, config, max_sessions=max_sessions,
                     scheduler=scheduler, threads=n_threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_run(app, host, port, resolved.name, local.pipeline.ctx, max_sessions, scheduler))
    except KeyboardInterrupt:
        pass


async def _run(app, host: str, port: int, name: str, n_ctx: int, max_sessions: int, scheduler: str) -> None:
    from aiohttp import web

    # handler_cancellation: a client that disconnects cancels its handler, which cancels its session
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                              "pick another --port or --host") from None
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"serving {name} on http://{shown}:{bound_port}/v1", flush=True)
        err_console.print(f"[dim]ctx {n_ctx} · max {max_sessions} sessions · {scheduler} · Ctrl-C stops[/]",
                          highlight=False)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        err_console.print(f"[dim]{escape(name)}: stopping[/]", highlight=False)
    finally:
        await runner.cleanup()
