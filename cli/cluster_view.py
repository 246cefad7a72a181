"""How the host shows a cluster to the person: the plan table and the weight transfers.

Shared by `chat` (and later `serve`); the library decides, this module only renders.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from cli.common import err_console


def check_cluster_flags(*, wait: float, peers: int, min_stages: int, layout: str = "auto") -> None:
    """chat's and serve's peer flags, checked before any model is pulled or loaded."""
    from fastserve_edge.cluster.planner import LAYOUTS
    from fastserve_edge.errors import ConfigError

    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if wait < 0 or peers < 0 or min_stages < 1:
        raise ConfigError(f"--wait ({wait:g}) and --peers ({peers}) must be >= 0 and --min-stages ({min_stages}) >= 1")


def show_plan(plan, console: Console = err_console) -> None:
    from fastserve_edge.cluster.planner import SUMMARY_COLUMNS

    others = "; ".join(f"{name} {ms:.1f} ms" if ms is not None else f"{name}: {why[:60]}"
                       for name, ms, why in plan.alternatives if name != plan.layout)
    caption = "; ".join(filter(None, [f"predicted per token: {others}" if others else "", plan.link]))
    table = Table(title=f"plan: {plan.headline()}", caption=caption or None)
    for column in SUMMARY_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in plan.summary_rows():
        table.add_row(*(escape(str(cell)) for cell in row))
    console.print(table)


def apply_with_progress(coordinator, plan, console: Console = err_console):
    """coordinator.apply(plan) with a progress bar per peer while it fetches its layers."""
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["pipeline"] = coordinator.apply(plan)
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=work, name="fastserve-apply", daemon=True)
    thread.start()
    if len(plan.stages) > 1 or plan.layout == "tensor":
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=False) as progress:
            tasks: dict[str, int] = {}
            while thread.is_alive() or not tasks:
                for address, t in list(coordinator.transfers.items()):
                    if address not in tasks:
                        tasks[address] = progress.add_task(f"layers → {escape(t.name)}", total=max(t.expected, 1))
                    done = t.expected if t.done else min(t.sent, t.expected)
                    progress.update(tasks[address], completed=done)
                if not thread.is_alive():
                    break
                time.sleep(0.1)
            for address, t in coordinator.transfers.items():
                if address in tasks:
                    progress.update(tasks[address], completed=max(t.expected, 1))
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    for address, t in coordinator.transfers.items():
        if t.reply is not None:
            r = t.reply
            console.print(f"[dim]{escape(t.name)} ({address}): {r.tensors_cached} tensors from its cache, {r.tensors_fetched} fetched "
                          f"({r.bytes_fetched / 1e6:.1f} MB), ready in {r.load_seconds:.2f} s[/]", highlight=False)
    return result["pipeline"]


def start_cluster(resolved, settings, *, ctx, token, peers, wait, min_stages, max_memory, interface, static_peers,
                  threads, reprofile, notice, layout="auto"):
    """Discover, plan, show, load: returns (coordinator, pipeline, tokenizer, config)."""
    from cli.token import announce_token
    from fastserve_edge.cluster import discovery
    from fastserve_edge.cluster.auth import check_token, load_or_create_token
    from fastserve_edge.cluster.coordinator import ClusterOptions, ClusterPipeline, Coordinator
    from fastserve_edge.cluster.profile import parse_size
    from fastserve_edge.engine.local import choose_ctx
    from fastserve_edge.errors import FastServeError
    from fastserve_edge.models import open_model

    paths = settings.paths
    if token is None:
        token, created = load_or_create_token(paths.config)
        if created:
            announce_token(True, token)
    token = check_token(token)
    options = ClusterOptions(token=token, want_peers=peers, wait_s=wait, min_stages=min_stages,
                             max_memory=parse_size(max_memory) if max_memory else None, interface=interface,
                             static_peers=static_peers, threads=threads, reprofile=reprofile, layout=layout)
    with err_console.status(f"opening {resolved.name} and measuring this machine…"):
        source = open_model(resolved.path)
        n_ctx = choose_ctx(source.config, ctx, settings.chat.max_ctx)
        coordinator = Coordinator(paths=paths, source=source, model_path=resolved.path, model_name=resolved.name,
                                  ctx=n_ctx, options=options, notice=notice)
    try:
        if wait > 0 or static_peers:
            with err_console.status(f"looking for peers for up to {wait:g} s…") as status:
                try:
                    coordinator.discover(on_found=lambda n: status.update(f"looking for peers… {n} found"))
                except discovery.DiscoveryError as err:
                    if peers or min_stages > 1:
                        raise
                    notice(f"{err}; running on this machine alone")
        for machine, why in coordinator.refused:
            notice(f"not using {machine}: {why}")
        if peers and len(coordinator.peers) < peers:
            raise FastServeError(
                f"only {len(coordinator.peers)} of {peers} peers answered within {wait:g} s; is "
                "`fastserve join --token ...` running on them with this host's token (`fastserve token`)?")
        plan = coordinator.make_plan()
        if coordinator.peers or len(plan.stages) > 1:
            show_plan(plan)
        elif min_stages == 1:
            err_console.print("[dim]no peers found: running on this machine. To add one, run "
                              "`fastserve token` here and the line it prints on the other PC.[/]", highlight=False)
        pipeline = ClusterPipeline(coordinator, notice=notice, on_plan=show_plan)
        apply_with_progress(coordinator, plan)
    except BaseException:
        coordinator.close()
        raise
    return coordinator, pipeline, source.tokenizer(), source.config
