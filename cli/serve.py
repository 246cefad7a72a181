"""`fastserve serve [MODEL]`: an OpenAI-compatible HTTP API over a model on this machine.

Like `fastserve chat`, it looks for peers of its cluster and spreads the model over them
(`--local-only`: this machine alone); a peer that leaves costs a re-plan, and every open
answer goes on. The URL goes to stdout, one line; everything else to stderr.

Against clients that would exhaust it: --max-queue (then 429 with Retry-After),
--max-connections, --idle-timeout (slow or silent connections are closed); --tls-cert and
--tls-key serve HTTPS (TLS 1.2 at least). Every flag is checked before the model loads.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli.common import Activations, err_console, freeze_imports, user_errors
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
    max_queue: Annotated[int, typer.Option(help="requests that may wait beyond --max-sessions; more get "
                                                "429 with Retry-After")] = 64,
    max_connections: Annotated[int, typer.Option(help="open connections at once; more get a 503")] = 256,
    idle_timeout: Annotated[float, typer.Option(help="seconds a connection may take to send a request's head, "
                                                     "or its body, or sit idle; then it is closed")] = 30.0,
    tls_cert: Annotated[Path | None, typer.Option(help="serve HTTPS with this PEM certificate (with --tls-key)",
                                                  envvar="FASTSERVE_TLS_CERT")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="the certificate's PEM private key",
                                                 envvar="FASTSERVE_TLS_KEY")] = None,
    kv_memory: Annotated[str | None, typer.Option(help="memory all sessions' KV may use on each machine, e.g. 2G "
                                                       "(default: what is free there once the weights are in)")] = None,
    scheduler: Annotated[str, typer.Option(help=f"which waiting session runs next: {' | '.join(SCHEDULERS)}")] = "fcfs",
    prompt_cache: Annotated[int | None, typer.Option(help="ended sessions whose KV is kept, so that a prompt starting "
                                                          "the same way (the next turn of a chat, a shared system "
                                                          "prompt) prefills only the rest (default: --max-sessions; "
                                                          "0 = off)")] = None,
    ctx: Annotated[int | None, typer.Option(help="context length (default: the model's, capped at 4096)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores)", envvar="FASTSERVE_THREADS")] = None,
    activations: Activations = "int16",
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback --host without --api-key")] = False,
    token: Annotated[str | None, typer.Option(help="cluster token (default: this host's, created on first use)",
                                              envvar="FASTSERVE_TOKEN")] = None,
    peers: Annotated[int, typer.Option(help="wait until this many peers answered (error if they do not)")] = 0,
    wait: Annotated[float, typer.Option(help="seconds to look for peers on the LAN")] = 2.0,
    local_only: Annotated[bool, typer.Option(help="do not look for peers: this machine alone")] = False,
    min_stages: Annotated[int, typer.Option(help="spread the model over at least N machines")] = 1,
    layout: Annotated[str, typer.Option(help="auto (the fastest the planner predicts), single, pipeline, or tensor (every machine a slice of every layer)")] = "auto",
    max_memory: Annotated[str | None, typer.Option(help="memory this host may use for the model (e.g. 4G)")] = None,
    interface: Annotated[str | None, typer.Option(help="network interface to look for peers on")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="a peer's ADDRESS:PORT, for networks without mDNS (repeatable)")] = None,
    reprofile: Annotated[bool, typer.Option(help="measure this machine again instead of using the cached profile")] = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat/completions, completions, models, metrics)
    and ollama's (/api/chat, /api/generate, /api/tags...), on this machine and the peers it finds,
    as `fastserve chat` does."""
    with user_errors():
        cluster = None if local_only else dict(token=token, peers=peers, wait=wait, min_stages=min_stages, layout=layout,
                                               max_memory=max_memory, interface=interface,
                                               static_peers=tuple(peer or ()), reprofile=reprofile)
        serve(model=model, host=host, port=port, api_key=api_key, max_sessions=max_sessions, kv_memory=kv_memory,
              scheduler=scheduler, ctx=ctx, threads=threads, insecure=insecure, cluster=cluster,
              prompt_cache=prompt_cache, activations=activations, max_queue=max_queue,
              max_connections=max_connections, idle_timeout=idle_timeout, tls_cert=tls_cert, tls_key=tls_key)


def serve(*, model: str | None, host: str, port: int, api_key: str | None, max_sessions: int, scheduler: str,
          ctx: int | None, threads: int | None, insecure: bool, cluster: dict | None = None,
          kv_memory: str | None = None, prompt_cache: int | None = None, activations: str = "int16",
          max_queue: int = 64, max_connections: int = 256, idle_timeout: float = 30.0,
          tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
    from fastserve_edge.serving.api import Limits, ServeConfig, check_exposure, create_app, tls_context
    from fastserve_edge.serving.engine_loop import KV_GROWTH, kv_room

    # every check that needs no model first: a refusal must not wait for a model load
    check_exposure(host, api_key, insecure)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if max_sessions < 1:
        raise ConfigError(f"--max-sessions must be at least 1, got {max_sessions}")
    if max_queue < 0:
        raise ConfigError(f"--max-queue must be at least 0 (0: every request past --max-sessions gets a 429), "
                          f"got {max_queue}")
    if max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {max_connections}")
    if not idle_timeout > 0:
        raise ConfigError(f"--idle-timeout must be more than 0 seconds, got {idle_timeout}")
    limits = Limits(max_queue=max_queue, max_connections=max_connections, idle_timeout=idle_timeout)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key; give the other one too")
    ssl_context = tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    if prompt_cache is not None and prompt_cache < 0:
        raise ConfigError(f"--prompt-cache must be at least 0 (ended sessions whose KV is kept, within the KV "
                          f"budget; 0 turns the cache off), got {prompt_cache}")
    make_scheduler(scheduler)
    from fastserve_edge.cluster.profile import parse_size, read_memory

    try:
        kv_cap = parse_size(kv_memory) if kv_memory is not None else None
    except ConfigError as err:
        raise ConfigError(f"--kv-memory: {err}") from None
    scheduler = scheduler.strip().lower()

    from fastserve_edge.engine.local import load_local_model, set_threads
    from fastserve_edge.engine.quant import set_activations

    freeze_imports()
    settings = load_settings()
    n_threads = set_threads(threads)
    set_activations(activations)
    if cluster is not None:  # start_cluster's keyword arguments: chat's peer flags
        from cli.cluster_view import check_cluster_flags
        from fastserve_edge.cluster.coordinator import ClusterPipeline

        check_cluster_flags(wait=cluster["wait"], peers=cluster["peers"], min_stages=cluster["min_stages"],
                            layout=cluster["layout"])
        if max_sessions > ClusterPipeline.max_open_sessions:
            raise ConfigError(f"--max-sessions {max_sessions} is more than a cluster keeps open at once "
                              f"({ClusterPipeline.max_open_sessions}: one stream per session on every peer); "
                              "lower it, or serve with --local-only")
    resolved = resolve_or_pull(model, settings)
    coordinator = None
    if cluster is None:
        with err_console.status(f"loading {resolved.name}…"):
            local = load_local_model(resolved.path, ctx=ctx, max_ctx=settings.chat.max_ctx)
        pipeline, tokenizer = local.pipeline, local.tokenizer
    else:
        from cli.cluster_view import start_cluster

        notice = lambda m: err_console.print(f"[yellow]{escape(m)}[/]", highlight=False)  # noqa: E731
        coordinator, pipeline, tokenizer, _ = start_cluster(resolved, settings, ctx=ctx, threads=n_threads,
                                                            notice=notice, **cluster)
    try:
        d = settings.chat
        config = ServeConfig(model_id=resolved.name, api_key=api_key, temperature=d.temperature, top_p=d.top_p,
                             top_k=d.top_k, min_p=d.min_p, max_tokens=d.max_tokens)
        room = kv_room(pipeline, local=cluster is None, cap=kv_cap, free_now=read_memory()[0])
        if (tokens := room() // KV_GROWTH) < pipeline.ctx:
            why = (f"--kv-memory {kv_memory}" if kv_cap is not None else "the free memory") + \
                  f" holds {tokens} tokens of KV, less than one context ({pipeline.ctx})"
            if kv_cap is not None:
                raise ConfigError(f"{why}; raise --kv-memory or lower --ctx")
            err_console.print(f"[yellow]{escape(why)}: one session at a time may still run out of memory; "
                              "lower --ctx[/]", highlight=False)
        app = create_app(pipeline, tokenizer, config, max_sessions=max_sessions, scheduler=scheduler,
                         threads=n_threads, kv_room=room, prompt_cache=prompt_cache, limits=limits)
        from fastserve_edge.models import open_model
        from fastserve_edge.serving import ollama

        source = local.source if cluster is None else open_model(resolved.path)  # metadata only: mapped, not read
        app[ollama.FACTS] = ollama.describe(resolved.path, source, resolved.name)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            asyncio.run(_run(app, host, port, resolved.name, pipeline.ctx, max_sessions, scheduler, ssl_context))
        except KeyboardInterrupt:
            pass
    finally:
        if coordinator is not None:
            coordinator.close()


async def _run(app, host: str, port: int, name: str, n_ctx: int, max_sessions: int, scheduler: str,
               ssl_context: ssl.SSLContext | None) -> None:
    from fastserve_edge.serving.api import serving

    async with serving(app, host, port, ssl_context=ssl_context) as (bound_host, bound_port):
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "https" if ssl_context is not None else "http"
        print(f"serving {name} on {scheme}://{shown}:{bound_port}/v1", flush=True)
        err_console.print(f"[dim]ctx {n_ctx} · max {max_sessions} sessions · {scheduler} · Ctrl-C stops[/]",
                          highlight=False)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        err_console.print(f"[dim]{escape(name)}: stopping[/]", highlight=False)
