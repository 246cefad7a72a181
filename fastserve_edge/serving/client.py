"""A client for a running `fastserve serve`: the conversation `fastserve chat --url` holds.

It has the interface cli/chat.py uses from engine.chat.ChatSession (`ask`, `reset`,
`messages`, `last.stats`) but loads no model: the history is kept here and the whole
conversation is sent each turn, as OpenAI clients do. Synchronous on purpose (urllib,
Server-Sent Events read line by line) so that the REPL stays a plain loop; closing the
`ask` iterator (Ctrl-C) closes the HTTP stream, and the server then frees the session.
No torch here: a chat with a server needs none.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPResponse
from typing import Any

from fastserve_edge.errors import ConfigError, FastServeError

TIMEOUT_S = 600.0  # per socket read: a long prefill on a slow cluster sends nothing for a while


class ServerError(FastServeError):
    """The server refused a request; the message is its own, `code` its OpenAI error code."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class RemoteStats:
    """engine.generate.GenerationStats as a client can know it: counts from the server's usage
    chunk, times measured here (so they include the network)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0      # the API does not report prefix reuse
    generated_tokens: int = 0
    ttft_s: float = 0.0         # request sent -> first text piece received
    decode_s: float = 0.0       # first text piece -> last
    stop_reason: str = ""       # the server's finish_reason, or "cancelled"

    @property
    def decode_tok_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s and self.generated_tokens > 1 else 0.0


@dataclass
class RemoteTurn:
    stats: RemoteStats = field(default_factory=RemoteStats)
    text: str = ""
    dropped_messages: int = 0   # oldest messages dropped to fit the server's context


def base_url(url: str) -> str:
    """'http://HOST:PORT', 'http://HOST:PORT/' and the '.../v1' that `serve` prints all name the same server."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https://, got {url!r} "
                          "(the URL `fastserve serve` printed, e.g. http://127.0.0.1:8000)")
    return url.removesuffix("/v1")


class RemoteChat:
    """One person's conversation with a `fastserve serve`. `ask()` streams the answer's text pieces."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 system: str | None = None, temperature: float | None = None, top_p: float | None = None,
                 max_tokens: int | None = None, seed: int | None = None, timeout: float = TIMEOUT_S,
                 notice: Callable[[str], None] = lambda message: None):
        self.url = base_url(url)
        self.notice = notice
        self.api_key = api_key
        self.system = system
        self.timeout = timeout
        # None: the server's default (its [chat] settings), as for any OpenAI client
        self.options = {k: v for k, v in (("temperature", temperature), ("top_p", top_p),
                                          ("max_tokens", max_tokens), ("seed", seed)) if v is not None}
        self.model = model if model is not None else self._first_model()
        self.messages: list[dict[str, str]] = []
        self.last = RemoteTurn()

    def reset(self) -> None:
        self.messages.clear()  # the server keeps nothing between requests

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`. Closing the iterator early (Ctrl-C) keeps what was said."""
        messages = self.messages + [{"role": "user", "content": text}]
        start = time.perf_counter()
        response, dropped = self._send(messages)
        messages = messages[dropped:]
        turn = self.last = RemoteTurn(dropped_messages=dropped)
        stats = turn.stats
        first = last = 0.0
        pieces = 0
        with response:
            self.messages = messages  # the server took the conversation: it is history now
            try:
                for event in _events(response):
                    if "error" in event:  # after the headers, a failure travels as an event
                        error = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
                        raise ServerError(f"{self.url}: {error.get('message')}", error.get("code"))
                    if event.get("usage"):
                        stats.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                        stats.generated_tokens = event["usage"].get("completion_tokens", 0)
                    for choice in event.get("choices") or ():
                        stats.stop_reason = choice.get("finish_reason") or stats.stop_reason
                        piece = (choice.get("delta") or {}).get("content")
                        if not piece:
                            continue
                        last = time.perf_counter()
                        if not pieces:
                            first = last
                            stats.ttft_s = first - start
                        pieces += 1
                        turn.text += piece
                        yield piece
            finally:
                if not stats.stop_reason:
                    stats.stop_reason = "cancelled"
                if not stats.generated_tokens:  # no usage chunk (stopped early): one piece is about one token
                    stats.generated_tokens = pieces
                stats.decode_s = last - first
                self.messages.append({"role": "assistant", "content": turn.text})

    def _send(self, messages: list[dict[str, str]]) -> tuple[HTTPResponse, int]:
        """Open the answer's stream; a conversation over the server's context loses its oldest
        turns (never the system prompt) until it fits, as a local chat does."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        dropped = 0
        while True:
            body = {"model": self.model, "messages": system + messages[dropped:], **self.options, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                response = self._open("POST", "/v1/chat/completions", body)
            except ServerError as err:
                if err.code != "context_length_exceeded" or len(messages) - dropped <= 1:
                    raise
                # the oldest user message and the assistant answer that followed it
                dropped += 2 if len(messages) - dropped > 2 and messages[dropped + 1]["role"] == "assistant" else 1
                continue
            if dropped:
                self.notice(f"the conversation outgrew the server's context: dropped the {dropped} oldest message(s)")
            return response, dropped

    # -- HTTP ------------------------------------------------------------------------------------

    def _first_model(self) -> str:
        with self._open("GET", "/v1/models") as response:
            data = json.loads(response.read()).get("data") or []
        if not data:
            raise FastServeError(f"the server at {self.url} lists no model; give the model name as MODEL")
        return data[0]["id"]

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None) -> HTTPResponse:
        return open_api(self.url, self.api_key, method, path, body, timeout=self.timeout)


def server_status(url: str, api_key: str | None = None, *, timeout: float = 10.0) -> dict[str, Any]:
    """A running serve's GET /v1/status: its sessions and its stages (`fastserve status --url`)."""
    url = base_url(url)
    try:
        with open_api(url, api_key, "GET", "/v1/status", timeout=timeout) as response:
            status = json.loads(response.read())
    except ServerError as err:
        if err.code == "unknown_url" or " 404:" in str(err):
            raise ServerError(f"{err}; is it a `fastserve serve` of this version (older ones have no /v1/status)?",
                              err.code) from None
        raise
    except (ValueError, OSError) as err:  # not JSON (another server on that port), or the read timed out
        raise FastServeError(f"{url} did not answer GET /v1/status as `fastserve serve` does ({err}); "
                             "check --url") from None
    if not isinstance(status, dict) or "stages" not in status:
        raise FastServeError(f"{url} answered GET /v1/status with something else than a serve's status; check --url")
    return status


def open_api(url: str, api_key: str | None, method: str, path: str, body: dict[str, Any] | None = None, *,
             timeout: float = TIMEOUT_S) -> HTTPResponse:
    """One request to the server at `url`; its OpenAI error body becomes ServerError."""
    headers = {"Accept": "text/event-stream" if body and body.get("stream") else "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        with err:
            raw = err.read()
        try:
            error = json.loads(raw)["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = raw.decode(errors="replace").strip()[:200] or err.reason, None
        raise ServerError(f"{url} answered {err.code}: {message}", code) from None
    except urllib.error.URLError as err:
        why = err.reason.strerror if isinstance(err.reason, OSError) and err.reason.strerror else err.reason
        raise FastServeError(f"no fastserve serve answers at {url} ({why}); "
                             "start it with `fastserve serve`, or check --url") from None
    except (TimeoutError, ConnectionError) as err:
        raise FastServeError(f"no fastserve serve answers at {url} ({err}); "
                             "start it with `fastserve serve`, or check --url") from None


def _events(response: HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON events of a Server-Sent Events stream, up to `data: [DONE]`."""
    while True:
        try:
            line = response.readline()
        except (TimeoutError, ConnectionError) as err:
            raise FastServeError(f"the server stopped answering mid-answer ({err}); is it still running?") from None
        if not line:
            return  # the server closed the stream without [DONE] (it is shutting down)
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, other fields
        data = line[len(b"data:"):].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)
