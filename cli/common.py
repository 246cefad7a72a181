"""What every command shares: the stderr console and the one place errors are translated."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fastserve_edge.errors import FastServeError

err_console = Console(stderr=True)

# --activations, shared by every command that runs layers on this machine (chat, serve, join, bench)
Activations = Annotated[str, typer.Option(
    help="what the quantized kernels round activations to: int16 (default; logits within ~1e-3 of fp32) "
         "or int8 (llama.cpp's precision on Q4_0/Q4_1/Q8_0 and Q4_K/Q5_K/Q6_K layers, logits ~4e-2 off; 0.8-1.5x the speed "
         "of int16 by CPU and model: measure with fastserve bench)",
    envvar="FASTSERVE_ACTIVATIONS")]


def freeze_imports() -> None:
    """Exempt everything imported so far (torch alone is ~300k objects) from the cyclic
    garbage collector: modules live as long as the process, and a full collection over them
    took ~0.1 s of each model load. Called by the commands that run a model, after importing
    what they need; tests that load models in-process keep the default collector."""
    gc.freeze()


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
