"""`fastserve status`: every fastserve machine on the LAN, what it offers and what it does."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.common import err_console, user_errors
from fastserve_edge.errors import ConfigError


def command(
    wait: Annotated[float, typer.Option(help="seconds to listen for machines")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    interface: Annotated[str | None, typer.Option(help="network interface to listen on (default: every LAN interface)")] = None,
    url: Annotated[str | None, typer.Option(help="a running `fastserve serve` (http://HOST:PORT): its sessions "
                                                 "and the tokens/s of each stage, instead of the LAN")] = None,
    api_key: Annotated[str | None, typer.Option(help="the server's --api-key (with --url)",
                                                envvar="FASTSERVE_API_KEY")] = None,
) -> None:
    """List the fastserve machines on the LAN (profile, state, our cluster or not), or with --url
    what a running `fastserve serve` is doing."""
    if url is not None:
        with user_errors():
            show_server(url, api_key, as_json)
        return
    from fastserve_edge.cluster import discovery
    from fastserve_edge.cluster.auth import cluster_id, load_or_create_token
    from fastserve_edge.cluster.planner import describe_bytes
    from fastserve_edge.settings import Paths

    with user_errors():
        if not 0 < wait <= 600:
            raise ConfigError(f"--wait must be between 0 and 600 seconds, got {wait}")
        paths = Paths.from_env()
        ours = cluster_id(load_or_create_token(paths.config)[0]) if (paths.config / "cluster-token").is_file() else None
        interfaces = discovery.lan_interfaces(interface)
        with err_console.status(f"listening for fastserve machines for {wait:g} s…"):
            nodes = discovery.browse_sync(timeout=wait, interfaces=interfaces)
        if as_json:
            print(json.dumps([asdict(n) | {"in_our_cluster": ours is not None and n.cluster_id == ours}
                              for n in nodes], indent=2))
            return
        if not nodes:
            err_console.print(f"no fastserve machine answered within {wait:g} s on "
                              f"{', '.join(name for name, _ in interfaces)}; is `fastserve join` running?")
            return
        table = Table(title="fastserve machines on the LAN")
        for column in ("machine", "address", "role", "cluster", "memory", "GFLOP/s", "GB/s", "state"):
            table.add_column(column)
        for n in nodes:
            cluster = "ours" if ours is not None and n.cluster_id == ours else ("other" if n.cluster_id else "none")
            # every cell arrives from the LAN: printed as text, never as Rich markup
            table.add_row(escape(n.name), ", ".join(f"{a}:{n.port}" for a in n.addresses), n.role, cluster,
                          describe_bytes(n.memory_bytes), f"{n.decode_gflops:.1f}", f"{n.bandwidth_gbs:.1f}",
                          escape(n.state))
        Console().print(table)


def show_server(url: str, api_key: str | None, as_json: bool) -> None:
    from fastserve_edge.cluster.planner import describe_bytes
    from fastserve_edge.serving.client import server_status

    status = server_status(url, api_key)
    if as_json:
        print(json.dumps(status, indent=2))
        return
    console = Console()
    console.print(f"[bold]{escape(str(status['model']))}[/] · {status['scheduler']} · max {status['max_sessions']} sessions · "
                  f"ctx {status['ctx']} · up {status['uptime_s']} s · {status['tokens_generated']} tokens generated · "
                  f"mean decode batch {status['mean_decode_batch']:.1f}", highlight=False)
    stages = Table(title="stages")
    for column in ("stage", "layers", "machine", "tokens", "busy s", "tokens/s", "KV held", "KV budget"):
        stages.add_column(column)
    for r in status["stages"]:
        stages.add_row(str(r["index"]), f"{r['start']}-{r['end']}", escape(str(r["machine"])), str(r["tokens"]),
                       f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.1f}", describe_bytes(r["kv_bytes"]),
                       describe_bytes(r["kv_budget_bytes"]))
    console.print(stages)
    cache = status.get("prompt_cache") or {"sessions": 0, "kv_tokens": 0, "cached_tokens": 0, "prompt_tokens": 0}
    share = cache["cached_tokens"] / cache["prompt_tokens"] if cache["prompt_tokens"] else 0.0
    console.print(f"prompt cache: {cache['sessions']} ended sessions keep {cache['kv_tokens']} tokens of KV · "
                  f"{cache['cached_tokens']} of {cache['prompt_tokens']} prompt tokens came from it ({share:.0%})",
                  highlight=False)
    if not status["sessions"]:
        console.print("[dim]no active sessions[/]")
        return
    sessions = Table(title=f"sessions ({status['active_sessions']} holding KV, {status['queue_length']} waiting)")
    for column in ("session", "state", "prompt", "generated", "max", "KV tokens", "queue", "age s"):
        sessions.add_column(column)
    for s in status["sessions"]:
        sessions.add_row(escape(str(s["id"])), escape(str(s["state"])), str(s["prompt_tokens"]), str(s["generated"]), str(s["max_tokens"]),
                         str(s["kv_tokens"]), str(s["level"]), f"{s['age_s']:.1f}")
    console.print(sessions)
