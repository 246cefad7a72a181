"""`fastserve models`: what is in the local model cache."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.common import err_console, user_errors
from fastserve_edge.models import registry
from fastserve_edge.settings import load_settings


def command(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List the models in the local cache: architecture, parameters, quantization, size, path."""
    with user_errors():
        settings = load_settings()
        found = registry.list_models(settings)
    if as_json:
        typer.echo(json.dumps([m.to_json() for m in found], indent=2))
        return
    if not found:
        err_console.print(
            f"no models in {settings.paths.models}; `fastserve pull` fetches {settings.default_model}",
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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
