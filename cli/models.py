"""`fastserve models`: what is in the local model cache, or (--available) what can be pulled
and whether this machine, or the cluster it sees, can hold it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.common import err_console, user_errors
from fastserve_edge.errors import ConfigError
from fastserve_edge.models import registry
from fastserve_edge.settings import Settings, load_settings


def command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    available: Annotated[bool, typer.Option(
        "--available", help="Every alias in models.toml (`fastserve pull NAME`): its size, the memory it needs "
                            "and whether this machine can hold it.")] = False,
    cluster: Annotated[bool, typer.Option(
        "--cluster", help="With --available: also listen --wait seconds for `fastserve join` peers of this "
                          "cluster on the LAN and say whether their memory pooled with this machine's holds it.")] = False,
    token: Annotated[str | None, typer.Option(help="cluster token for --cluster (default: this host's)",
                                              envvar="FASTSERVE_TOKEN")] = None,
    wait: Annotated[float, typer.Option(help="seconds to listen for peers with --cluster")] = 2.0,
    ctx: Annotated[int | None, typer.Option(help="tokens of context to count KV memory for "
                                                 "(default: the [chat] max_ctx setting)")] = None,
) -> None:
    """List the models in the local cache: architecture, parameters, quantization, size, path."""
    with user_errors():
        settings = load_settings()
        if not available:
            if cluster:
                raise ConfigError("--cluster goes with --available: `fastserve models --available --cluster`")
            show_cached(settings, as_json)
            return
        show_available(settings, as_json=as_json, cluster=cluster, token=token, wait=wait,
                       ctx=settings.chat.max_ctx if ctx is None else ctx)


def show_cached(settings: Settings, as_json: bool) -> None:
    found = registry.list_models(settings)
    if as_json:
        typer.echo(json.dumps([m.to_json() for m in found], indent=2))
        return
    if not found:
        err_console.print(
            f"no models in {settings.paths.models}; `fastserve pull` fetches {settings.default_model}, "
            "`fastserve models --available` lists the others",
            highlight=False,
        )
        return
    table = Table(title=f"models in {settings.paths.models}", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("architecture")
    table.add_column("parameters", justify="right")
    table.add_column("quantization")
    table.add_column("size", justify="right")
    table.add_column("path", overflow="fold")
    for m in found:
        info = m.info
        arch = info.architecture or (f"[red]unreadable[/]: {info.problem}" if info.problem else "?")
        table.add_row(
            m.name,
            arch,
            registry.format_parameters(info.parameters),
            info.quantization or "?",
            _size(m.size),
            str(m.path),
        )
    Console().print(table)


def show_available(settings: Settings, *, as_json: bool, cluster: bool, token: str | None, wait: float,
                   ctx: int) -> None:
    from fastserve_edge.cluster import profile
    from fastserve_edge.engine.kv_cache import KV_BYTES

    if not 0 < ctx <= 1 << 20:
        raise ConfigError(f"--ctx must be between 1 and {1 << 20} tokens, got {ctx}")
    here = profile.read_memory()[0]
    peers = _cluster_peers(settings, token, wait) if cluster else None
    pooled = None if peers is None else here + sum(n.memory_bytes for n in peers)
    rows = registry.available_models(settings, ctx=ctx, kv_value_bytes=KV_BYTES, memory_here=here,
                                     memory_cluster=pooled)
    if as_json:
        typer.echo(json.dumps({
            "ctx": ctx, "memory_here": here,
            "cluster": None if peers is None else {"peers": len(peers), "memory_bytes": pooled},
            "models": [r.to_json() for r in rows],
        }, indent=2))  # fmt: skip
        return
    caption = f"this machine offers {_size(here)}"
    if peers is not None:
        caption += f"; with {len(peers)} peer{'s' if len(peers) != 1 else ''} of this cluster, {_size(pooled or 0)}"
    table = Table(title=f"models to pull (`fastserve pull NAME`); memory counts KV for {ctx} tokens",
                  title_justify="left", caption=caption, caption_justify="left")
    table.add_column("name", style="bold")
    table.add_column("description", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("needs", justify="right")
    table.add_column("this machine")
    if peers is not None:
        table.add_column("cluster")
    table.add_column("pulled")
    for r in rows:
        cells = [escape(r.alias.name), escape(r.alias.description), _size(r.alias.size),
                 ("~" if r.kv_bytes is None else "") + _size(r.need_bytes), _fits(r.fits_here)]
        if r.fits_cluster is not None:
            cells.append(_fits(r.fits_cluster))
        cells.append("yes" if r.pulled else "")
        table.add_row(*cells)
    Console().print(table)


def _cluster_peers(settings: Settings, token: str | None, wait: float) -> list:
    """The `fastserve join` peers of our cluster that answer on the LAN within wait seconds.
    Their memory is what they announce over mDNS (unauthenticated): an estimate, as this table is."""
    from fastserve_edge.cluster import discovery
    from fastserve_edge.cluster.auth import TOKEN_FILE, check_token, cluster_id, load_or_create_token

    if not 0 < wait <= 600:
        raise ConfigError(f"--wait must be between 0 and 600 seconds, got {wait}")
    if token is None:
        if not (settings.paths.config / TOKEN_FILE).is_file():
            raise ConfigError("--cluster needs the cluster token: run this on the host whose `fastserve token` "
                              "the peers joined with, or pass --token")
        token = load_or_create_token(settings.paths.config)[0]
    ours = cluster_id(check_token(token))
    with err_console.status(f"listening for fastserve peers for {wait:g} s…"):
        nodes = discovery.browse_sync(timeout=wait, interfaces=discovery.lan_interfaces(None), cluster_id=ours)
    return [n for n in nodes if n.cluster_id == ours and n.role == "peer"]


def _fits(ok: bool) -> str:
    return "[green]fits[/]" if ok else "[red]does not fit[/]"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
