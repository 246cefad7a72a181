"""What every command shares: the stderr console and the one place errors are translated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from fastserve_edge.errors import FastServeError

err_console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a FastServeError into one red line on stderr and a non-zero exit."""
    try:
        yield
    except FastServeError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None


def run(fn: Callable[[], object]) -> None:
    with user_errors():
        fn()
