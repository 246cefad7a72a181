"""`fastserve chat [MODEL]`: talk to a model in the terminal.

Interactive on a terminal; with -p, or with stdin not a terminal, one answer to stdout
(and nothing else there: notices and statistics go to stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from rich.markup import escape

from cli.common import err_console, user_errors
from cli.pull import resolve_or_pull
from fastserve_edge.errors import ConfigError, FastServeError
from fastserve_edge.settings import load_settings

if TYPE_CHECKING:  # torch-heavy: imported when the command runs, so `fastserve --help` stays quick
    from fastserve_edge.engine.chat import ChatSession
    from fastserve_edge.engine.generate import GenerationStats

HELP = ("Commands: /reset clears the conversation, /replan looks for peers and plans again (cluster), "
        "/exit (or Ctrl-D) leaves; Ctrl-C stops an answer.")


def command(
    model: Annotated[str | None, typer.Argument(help="alias, .gguf path, HF folder, hf:ORG/REPO or hf:ORG/REPO/FILE.gguf, ollama:NAME or ollama:NAME:TAG")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="answer this one message, then exit")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (reproducible)")] = None,
    top_k: Annotated[int | None, typer.Option(help="keep the K most likely tokens (0 = off)")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling (1 = off)")] = None,
    min_p: Annotated[float | None, typer.Option(help="drop tokens below min-p x p(best) (0 = off)")] = None,
    repeat_penalty: Annotated[float | None, typer.Option(help="penalise recent tokens (1 = off)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed for reproducible sampling")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="longest answer, in tokens")] = None,
    ctx: Annotated[int | None, typer.Option(help="context length (default: the model's, capped at 4096)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores)", envvar="FASTSERVE_THREADS")] = None,
    token: Annotated[str | None, typer.Option(help="cluster token (default: this host's, created on first use)",
                                              envvar="FASTSERVE_TOKEN")] = None,
    peers: Annotated[int, typer.Option(help="wait until this many peers answered (error if they do not)")] = 0,
    wait: Annotated[float, typer.Option(help="seconds to look for peers on the LAN")] = 2.0,
    local_only: Annotated[bool, typer.Option(help="do not look for peers: this machine alone",
                                             envvar="FASTSERVE_LOCAL_ONLY")] = False,
    min_stages: Annotated[int, typer.Option(help="spread the model over at least N machines")] = 1,
    max_memory: Annotated[str | None, typer.Option(help="memory this host may use for the model (e.g. 4G)")] = None,
    interface: Annotated[str | None, typer.Option(help="network interface to look for peers on")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="a peer's ADDRESS:PORT, for networks without mDNS (repeatable)")] = None,
    reprofile: Annotated[bool, typer.Option(help="measure this machine again instead of using the cached profile")] = False,
) -> None:
    """Chat with a model in the terminal, on this machine or spread over `fastserve join` peers."""
    from fastserve_edge.engine.chat import ChatSession
    from fastserve_edge.engine.local import load_local_model, set_threads
    from fastserve_edge.engine.sampling import SamplingParams

    with user_errors():
        settings = load_settings()
        d = settings.chat
        params = SamplingParams(
            temperature=d.temperature if temperature is None else temperature,
            top_k=d.top_k if top_k is None else top_k,
            top_p=d.top_p if top_p is None else top_p,
            min_p=d.min_p if min_p is None else min_p,
            repeat_penalty=d.repeat_penalty if repeat_penalty is None else repeat_penalty,
            repeat_last_n=d.repeat_last_n,
            seed=seed,
        )
        answer_limit = d.max_tokens if max_tokens is None else max_tokens
        if answer_limit < 1:
            raise ConfigError(f"--max-tokens must be at least 1, got {answer_limit}")
        n_threads = set_threads(threads)
        if wait < 0 or peers < 0 or min_stages < 1:
            raise ConfigError("--wait and --peers must be >= 0 and --min-stages >= 1")
        resolved = resolve_or_pull(model, settings)
        notice = lambda m: err_console.print(f"[yellow]{escape(m)}[/]", highlight=False)  # noqa: E731
        coordinator = None
        if local_only:
            with err_console.status(f"loading {resolved.name}…"):
                local = load_local_model(resolved.path, ctx=ctx, max_ctx=d.max_ctx)
            pipeline, tokenizer, config = local.pipeline, local.tokenizer, local.config
        else:
            from cli.cluster_view import start_cluster

            coordinator, pipeline, tokenizer, config = start_cluster(
                resolved, settings, ctx=ctx, token=token, peers=peers, wait=wait, min_stages=min_stages,
                max_memory=max_memory, interface=interface, static_peers=tuple(peer or ()), threads=n_threads,
                reprofile=reprofile, notice=notice)
        try:
            chat = ChatSession(pipeline, tokenizer, params, max_tokens=answer_limit, system=system, notice=notice)
            interactive = prompt is None and sys.stdin.isatty()
            if not interactive:
                text = prompt if prompt is not None else sys.stdin.read()
                if not text.strip():
                    raise ConfigError("nothing to answer: give a message with -p TEXT or on stdin")
                answer_once(chat, text)
                return
            err_console.print(f"[bold]{escape(resolved.name)}[/] · {config.arch} · ctx {pipeline.ctx} · {HELP}",
                              highlight=False)
            commands = {"/replan": pipeline.replan} if coordinator is not None else {}
            repl(chat, commands)
        finally:
            if coordinator is not None:
                coordinator.close()


def stats_line(s: GenerationStats) -> str:
    cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
    return (f"{s.prompt_tokens} prompt tokens{cached} · {s.generated_tokens} generated · "
            f"first token {s.ttft_s:.2f} s · {s.decode_tok_s:.1f} tok/s")


def answer_once(chat: ChatSession, text: str) -> None:
    out = sys.stdout
    for piece in chat.ask(text):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    err_console.print(f"[dim]{stats_line(chat.last.stats)}[/]", highlight=False)


def stream_answer(chat: ChatSession, text: str, console: Console) -> None:
    """Print the answer as it comes; Ctrl-C stops it and keeps what was said."""
    stream = chat.ask(text)
    try:
        for piece in stream:
            console.out(piece, end="", highlight=False)
            console.file.flush()
    except KeyboardInterrupt:
        stream.close()
        console.print("\n[yellow]⏹ stopped[/]", highlight=False)
    console.print()
    console.print(f"[dim]{stats_line(chat.last.stats)}[/]", highlight=False)


def repl(chat: ChatSession, commands: dict[str, Callable[[], object]] | None = None) -> None:
    console = Console()
    commands = commands or {}
    interrupted = False
    while True:
        try:
            text = console.input("[bold green]>>> [/]")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            if interrupted:
                console.print()
                return
            interrupted = True
            console.print("\n[dim](Ctrl-C again or /exit to leave)[/]")
            continue
        interrupted = False
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            chat.reset()
            console.print("[dim]conversation cleared[/]")
            continue
        if text in ("/help", "/?"):
            console.print(HELP)
            continue
        if text in commands:
            try:
                commands[text]()
            except FastServeError as err:
                console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            continue
        try:
            stream_answer(chat, text, console)
        except FastServeError as err:  # e.g. a message longer than the context: say so, keep going
            console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
