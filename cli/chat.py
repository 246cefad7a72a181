"""`fastserve chat [MODEL]`: talk to a model in the terminal.

Interactive on a terminal; with -p, or with stdin not a terminal, one answer to stdout
(and nothing else there: notices and statistics go to stderr). With --url the same chat
talks to a running `fastserve serve` instead of loading the model (serving/client.py).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from rich.markup import escape

from cli.common import Activations, err_console, freeze_imports, user_errors
from cli.pull import resolve_or_pull
from fastserve_edge.errors import ConfigError, FastServeError
from fastserve_edge.settings import load_settings

if TYPE_CHECKING:  # torch-heavy: imported when the command runs, so `fastserve --help` stays quick
    from fastserve_edge.engine.chat import ChatSession
    from fastserve_edge.engine.generate import GenerationStats
    from fastserve_edge.serving.client import RemoteChat

# what only the side that holds the model decides: refused with --url (when given on the command line)
SERVER_SIDE = ("top_k", "min_p", "repeat_penalty", "ctx", "threads", "activations", "token", "peers", "wait", "local_only",
               "min_stages", "layout", "max_memory", "interface", "peer", "reprofile")

HELP = ("Commands: /reset clears the conversation, /replan looks for peers and plans again (cluster), "
        "/exit (or Ctrl-D) leaves; Ctrl-C stops an answer.")


def command(
    context: typer.Context,
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
    activations: Activations = "int16",
    token: Annotated[str | None, typer.Option(help="cluster token (default: this host's, created on first use)",
                                              envvar="FASTSERVE_TOKEN")] = None,
    peers: Annotated[int, typer.Option(help="wait until this many peers answered (error if they do not)")] = 0,
    wait: Annotated[float, typer.Option(help="seconds to look for peers on the LAN")] = 2.0,
    local_only: Annotated[bool, typer.Option(help="do not look for peers: this machine alone",
                                             envvar="FASTSERVE_LOCAL_ONLY")] = False,
    min_stages: Annotated[int, typer.Option(help="spread the model over at least N machines")] = 1,
    layout: Annotated[str, typer.Option(help="auto (the fastest the planner predicts), single, pipeline, or tensor (every machine a slice of every layer)")] = "auto",
    max_memory: Annotated[str | None, typer.Option(help="memory this host may use for the model (e.g. 4G)")] = None,
    interface: Annotated[str | None, typer.Option(help="network interface to look for peers on")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="a peer's ADDRESS:PORT, for networks without mDNS (repeatable)")] = None,
    reprofile: Annotated[bool, typer.Option(help="measure this machine again instead of using the cached profile")] = False,
    url: Annotated[str | None, typer.Option(help="talk to a running `fastserve serve` at this URL (http://HOST:PORT) "
                                                 "instead of loading the model here")] = None,
    api_key: Annotated[str | None, typer.Option(help="the server's --api-key (with --url)",
                                                envvar="FASTSERVE_API_KEY")] = None,
) -> None:
    """Chat with a model in the terminal: here, over `fastserve join` peers, or on a `fastserve serve` (--url)."""
    def on_command_line(name: str) -> bool:  # not from an env var or a default; by name: typer has its own click
        return getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"

    if url is not None:
        with user_errors():
            given = [name for name in SERVER_SIDE if on_command_line(name)]
            chat_with_server(url=url, api_key=api_key, model=model, prompt=prompt, system=system,
                             temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                             server_side=given)
        return
    from cli.cluster_view import check_cluster_flags
    from fastserve_edge.engine.chat import ChatSession
    from fastserve_edge.engine.local import load_local_model, set_threads
    from fastserve_edge.engine.quant import set_activations
    from fastserve_edge.engine.sampling import SamplingParams

    freeze_imports()
    with user_errors():
        if on_command_line("api_key"):
            raise ConfigError("--api-key is the key of a `fastserve serve`: give it together with --url")
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
        set_activations(activations)
        check_cluster_flags(wait=wait, peers=peers, min_stages=min_stages, layout=layout)
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
                resolved, settings, ctx=ctx, token=token, peers=peers, wait=wait, min_stages=min_stages, layout=layout,
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


def chat_with_server(*, url: str, api_key: str | None, model: str | None, prompt: str | None,
                     system: str | None, temperature: float | None, top_p: float | None,
                     max_tokens: int | None, seed: int | None, server_side: list[str]) -> None:
    """`chat --url`: the same chat, with the model on a `fastserve serve`; unset sampling
    flags are left to the server's defaults."""
    from fastserve_edge.serving.client import RemoteChat

    if server_side:
        flags = ", ".join("--" + name.replace("_", "-") for name in server_side)
        raise ConfigError(f"{flags} apply to the server, not to `chat --url`: set them where `fastserve serve` "
                          "runs; with --url, chat sends only --system, --temperature, --top-p, --max-tokens "
                          "and --seed")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
    interactive = prompt is None and sys.stdin.isatty()
    text = None if interactive else (prompt if prompt is not None else sys.stdin.read())
    if text is not None and not text.strip():
        raise ConfigError("nothing to answer: give a message with -p TEXT or on stdin")
    notice = lambda m: err_console.print(f"[yellow]{escape(m)}[/]", highlight=False)  # noqa: E731
    chat = RemoteChat(url, api_key=api_key, model=model, system=system, temperature=temperature,
                      top_p=top_p, max_tokens=max_tokens, seed=seed, notice=notice)
    if text is not None:
        answer_once(chat, text)
        return
    err_console.print(f"[bold]{escape(chat.model)}[/] · {escape(chat.url)} · {HELP}", highlight=False)
    repl(chat)


def stats_line(s: GenerationStats) -> str:
    cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
    return (f"{s.prompt_tokens} prompt tokens{cached} · {s.generated_tokens} generated · "
            f"first token {s.ttft_s:.2f} s · {s.decode_tok_s:.1f} tok/s")


def answer_once(chat: ChatSession | RemoteChat, text: str) -> None:
    out = sys.stdout
    for piece in chat.ask(text):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    err_console.print(f"[dim]{stats_line(chat.last.stats)}[/]", highlight=False)


def stream_answer(chat: ChatSession | RemoteChat, text: str, console: Console) -> None:
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


def repl(chat: ChatSession | RemoteChat, commands: dict[str, Callable[[], object]] | None = None) -> None:
    # Ctrl-C is how a person stops an answer: taken even where the process started with SIGINT
    # ignored (a shell's background job passes that on, and Python then never raises KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    console = Console()
    commands = commands or {}
    interrupted = False
    while True:
        try:
            if interrupted:  # the hint inside the try: a second Ctrl-C right after it still leaves cleanly
                console.print("\n[dim](Ctrl-C again or /exit to leave)[/]")
            text = console.input("[bold green]>>> [/]")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            if interrupted:
                console.print()
                return
            interrupted = True
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
