"""`fastserve token`: the cluster token, as the line to run on every peer."""

from __future__ import annotations

from rich.markup import escape

from cli.common import err_console, user_errors


def join_line(token: str) -> str:
    return f"fastserve join --token {token}"


def announce_token(created: bool, token: str) -> None:
    """Say how peers join; loudly the first time the token exists."""
    if created:
        err_console.print("[bold]A new cluster token was created.[/] On every other PC, run:", highlight=False)
    else:
        err_console.print("To add a PC to this cluster, run on it:", highlight=False)
    err_console.print(f"  [bold cyan]{escape(join_line(token))}[/]", highlight=False, soft_wrap=True)


def command() -> None:
    """Print the cluster token (created on first use) and the `fastserve join` line for peers."""
    from fastserve_edge.cluster.auth import load_or_create_token
    from fastserve_edge.settings import Paths

    with user_errors():
        token, created = load_or_create_token(Paths.from_env().config)
        print(join_line(token))
        if created:
            err_console.print("[dim]a new cluster token was created and stored in the configuration folder[/]")
