"""`fastserve pull [MODEL]`: fetch a model into the local cache, with a progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cli.common import err_console, user_errors
from fastserve_edge.models import registry
from fastserve_edge.settings import Settings, load_settings


class RichProgress:
    """registry.Progress drawn on the stderr console: a pulsing bar while the size is
    unknown (pip download), a byte bar with speed while extracting and hashing."""

    def __init__(self, bar: Progress) -> None:
        self._bar = bar
        self._task: TaskID | None = None
        self.shown = False

    def start(self, description: str, total: int | None) -> None:
        if not self.shown:  # drawn only once there is something to show (resolve may not pull)
            self._bar.start()
            self.shown = True
        self.finish()
        self._task = self._bar.add_task(description, total=total)

    def finish(self) -> None:
        if self._task is None:
            return
        task = next(t for t in self._bar.tasks if t.id == self._task)
        if task.total is None:
            # a pulse has no sizes to show: replace it with one line saying it is done
            self._bar.remove_task(self._task)
            self._bar.console.print(f"  [green]✓[/] {task.description}", highlight=False)
        else:
            self._bar.stop_task(self._task)
        self._task = None

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, amount)

    def close(self) -> None:
        if self.shown:
            self._bar.stop()


@contextmanager
def progress_bar() -> Iterator[RichProgress]:
    """A progress reporter for registry.pull/resolve(pull_missing=True), e.g. from `fastserve chat`."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    progress = RichProgress(Progress(*columns, console=err_console, transient=False))
    try:
        yield progress
        progress.finish()  # only on success: a failed phase must not be ticked off
    finally:
        progress.close()


def resolve_or_pull(model: str | None, settings: Settings) -> registry.ResolvedModel:
    """registry.resolve for commands that need the files now (`fastserve chat`): an alias or
    hf: reference that is not in the cache yet is pulled, with the progress bar."""
    with progress_bar() as progress:
        return registry.resolve(model, settings, pull_missing=True, progress=progress)


def command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Alias from models.toml (default: the configured default model), "
            "hf:ORG/REPO or hf:ORG/REPO/FILE.gguf; a local path or ollama:NAME:TAG is only checked.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Download a model into the local cache (a no-op when it is already there and intact)."""
    with user_errors():
        settings = load_settings()
        with progress_bar() as progress:
            result = registry.pull(model, settings, progress=progress)
        if result.fetched:
            state = "downloaded"
        elif result.model.path.is_relative_to(settings.paths.models):
            state = "already up to date"
        else:
            state = "on this machine already, nothing to pull"
        err_console.print(f"[green]{result.model.name}[/]: {state} ({result.model.path})", highlight=False)
