"""The OpenAI-compatible HTTP API of `fastserve serve` (aiohttp, HTTP/1.1).

    POST /v1/chat/completions   messages, model, temperature, top_p, max_tokens, stop, seed, stream
    POST /v1/completions        prompt instead of messages
    POST /v1/embeddings         input: a string, strings, or token id lists
    POST /tokenize, /detokenize llama.cpp server's: {content, add_special?, with_pieces?} -> {tokens};
                                {tokens} -> {content}
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus text), /v1/status (JSON: sessions, stages, machines)
    GET  /  the web page: a chat and a live view of the cluster (webui.py)

Behaviour worth knowing (where OpenAI leaves room):
- Sampling: temperature and top_p from the request, else the [chat] settings; top_k, min_p
  from the [chat] settings (llama.cpp's server does the same); no repetition penalty (OpenAI
  has no such field), so temperature 0 equals `fastserve chat --temperature 0 --repeat-penalty 1`.
- max_tokens (or max_completion_tokens) defaults to the [chat] max_tokens, and is cut to the
  room the context leaves after the prompt (finish_reason "length"); only a prompt that does
  not fit at all is an error.
- Structured output: response_format (json_object, json_schema) and `grammar` (GBNF or Lark)
  are enforced while decoding (constrain.py); tools / tool_choice go through the model's chat
  template and come back as tool_calls (tool_calls.py). A model whose template has no tool
  support answers a request with tools with a 400.
- Streaming: chat.completion.chunk / text_completion chunks, `data: [DONE]` last. Usage goes
  in a final chunk with empty `choices` only when `stream_options.include_usage` is true, as
  OpenAI does; the non-streaming response always carries it.
- llama.cpp server's sampling fields top_k, min_p, repeat_penalty, repeat_last_n are taken
  (default: the [chat] top_k and min_p, no penalty), and its `ignore_eos`: the end-of-generation
  tokens are banned (never drawn, as llama.cpp does), so the answer runs to max_tokens.
- logprobs (chat: logprobs + top_logprobs; completions: logprobs N) are the model's: log-softmax
  of the raw logits, before temperature, top-k/p, min-p and any ban (OpenAI's meaning; llama.cpp's
  server reports the final sampling distribution). They cover the tokens whose text is sent:
  those that only spell a stop string are left out with their text. With logprobs (or
  ignore_eos) a cluster's last peer sends the host the logits instead of sampling itself.
- n answers share one prefill: the first answer's prompt KV is copied for the others
  (engine_loop.submit_many); where a peer holds layers they prefill each their own. With a seed,
  answer i samples with seed + i: reproducible, and different from each other.
- /v1/embeddings: the mean over the prompt's tokens of the final norm's output (the hidden
  states the LM head would read), L2-normalised, as llama.cpp's server gives for a model with no
  pooling of its own. Strings get the BOS the model wants. A 400 where the final layers run on a
  peer (the hidden states never reach the host there).
- Fields that would change the answer and are not implemented get a 400 that names them
  (`_refuse_unsupported`): logit_bias, functions, function_call, suffix, echo, best_of other
  than n, non-zero presence/frequency penalties, audio output, ... Others (user, metadata, store,
  service_tier, ...) change nothing here and are accepted.
- Errors: OpenAI's body {"error": {"message", "type", "param", "code"}} with its status codes.
- A client that disconnects cancels its session: generation stops, its KV is freed.
- With --api-key, every endpoint but /health and the page's files wants 'Authorization: Bearer KEY' (/metrics too).
- GET /openapi.json: the OpenAPI 3.1 description of every route (openapi.py holds the limits).

What a hostile client cannot do (issue 21; `Limits`, set by `fastserve serve`'s flags):
- hold connections: a request's head must arrive within idle_timeout of the connection's
  start (or of the previous answer), its body within idle_timeout of the head; an idle
  keep-alive connection is closed after it; a TLS handshake gets as long. Past
  max_connections open at once, a new one gets a 503 and is closed. A stream whose client
  stops reading is dropped (and its session cancelled) once a write has waited idle_timeout.
- queue without end: past max_queue sessions waiting for the engine, 429 with Retry-After.
- crash a handler: bodies over 1 MiB, nested deeper than MAX_DEPTH, with lone surrogates,
  NaN, or wrong types anywhere get a 4xx with OpenAI's error JSON, never a 500.
- TLS (`tls_context`): TLS 1.2 at least, with the certificate and key `serve` is given.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import ssl
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from fastserve_edge.engine.generate import Pipeline, PipelineReset
from fastserve_edge.engine.sampling import Sampler, SamplingParams, TokenLogprobs
from fastserve_edge.errors import ConfigError, FastServeError
from fastserve_edge.serving import constrain, openapi, tool_calls, webui
from fastserve_edge.serving.cluster_status import cluster_status
from fastserve_edge.serving.constrain import StructureError
from fastserve_edge.serving.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from fastserve_edge.serving.engine_loop import (
    EngineClosed,
    EngineLoop,
    Finished,
    QueueFull,
    Session,
    Token,
)
from fastserve_edge.serving.openapi import MAX_BODY_BYTES, MAX_DEPTH, MAX_STOP_STRINGS, ROLES, SEED, TEMPERATURE, TOP_P
from fastserve_edge.serving.openapi import (MAX_CHOICES, MAX_EMBEDDING_INPUTS, MAX_REPEAT_LAST_N, MAX_TOP_K,
                                            MAX_TOP_LOGPROBS, MIN_P, REPEAT_PENALTY)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2  # a 429's Retry-After: a queue slot frees when any session ends; the openai client honours it


@dataclass(frozen=True)
class ServeConfig:
    model_id: str
    api_key: str | None = None
    temperature: float = 0.7   # request defaults: the [chat] settings
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    max_tokens: int = 512


@dataclass(frozen=True)
class Limits:
    """What clients may hold of the server at once, however they behave."""
    max_queue: int = 64          # requests waiting beyond --max-sessions; past it, 429
    max_connections: int = 256   # open TCP connections; past it, a new one gets a 503 and is closed
    idle_timeout: float = 30.0   # s: for a request's head, its body, a TLS handshake, an idle keep-alive
                                 # connection (a 1 MiB body at 35 KB/s still arrives)


CONFIG = web.AppKey("config", ServeConfig)
LIMITS = web.AppKey("limits", Limits)
PIPELINE = web.AppKey("pipeline", object)  # engine.generate.Pipeline, or cluster.coordinator.ClusterPipeline
TOKENIZER = web.AppKey("tokenizer", object)  # models.tokenizer.Tokenizer
TOKEN_TEXTS = web.AppKey("token_texts", TokenTexts)
ENGINE_OPTIONS = web.AppKey("engine_options", dict)
ENGINE = web.AppKey("engine", EngineLoop)
REQUESTS = web.AppKey("requests", Counter)   # (endpoint, status) -> count
STARTED = web.AppKey("started", int)


# -- errors ------------------------------------------------------------------------------------


class APIError(Exception):
    """An error the client gets as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def _from_http(err: web.HTTPException) -> APIError:
    if err.status == 413:
        return APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes; send a shorter one",
                        code="request_too_large")
    if err.status == 404:
        return APIError(404, "no such endpoint; see GET /v1/models, POST /v1/chat/completions, "
                             "POST /v1/completions", code="unknown_url")
    if err.status == 405:
        allowed = ", ".join(sorted(getattr(err, "allowed_methods", ()))) or "another method"
        return APIError(405, f"this endpoint takes {allowed}", code="method_not_allowed")
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return APIError(err.status, err.reason or "error", type=kind)


def _endpoint(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def errors_and_counts(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure becomes OpenAI's error JSON; every request is counted by status."""
    try:
        _check_key(request)
        response = await handler(request)
    except APIError as err:
        response = _error_response(request, err)
    except asyncio.CancelledError:  # the client went away (handler_cancellation): nginx's 499
        request.app[REQUESTS][(_endpoint(request), 499)] += 1
        raise
    except web.HTTPException as err:
        if err.status < 400:  # redirects and the like pass through
            raise
        response = _error_response(request, _from_http(err))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = _error_response(request, APIError(500, "internal server error; the server log has the details",
                                                     type="server_error"))
    request.app[REQUESTS][(_endpoint(request), response.status)] += 1
    return response


def _error_response(request: web.Request, err: APIError) -> web.Response:
    """OpenAI's error JSON; on ollama's routes (ollama.py), ollama's: {"error": message}."""
    if request.path.startswith("/api/"):
        return web.json_response({"error": err.message}, status=err.status, headers=err.headers)
    return err.response()


def _check_key(request: web.Request) -> None:
    key = request.app[CONFIG].api_key
    if key is None or request.path == "/health" or request.path in webui.PUBLIC_PATHS:  # the page asks for it
        return
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        what = "no API key was given" if not given else "the API key is wrong"
        raise APIError(401, f"{what}; send the --api-key the server was started with as "
                            "'Authorization: Bearer KEY'", code="invalid_api_key")


# -- request parsing ---------------------------------------------------------------------------


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def _json_body(request: web.Request) -> dict[str, Any]:
    timeout = request.app[LIMITS].idle_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
    except TimeoutError:  # aiohttp reads what follows for lingering_time (10 s) at most, then closes
        raise APIError(408, f"the request body did not arrive within {timeout:g} s; send it at once",
                       code="request_timeout") from None
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # the C decoder recurses per level: thousands of '[' end here
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, NaN, an int over 4300 digits
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    _check_tree(body)
    return body


def _too_deep() -> APIError:
    return APIError(400, f"the request body nests JSON deeper than {MAX_DEPTH} levels; no field of this API "
                         "needs more than 5", code="invalid_json")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _check_tree(body: dict[str, Any]) -> None:
    """Every value of the body, without recursion: not deeper than MAX_DEPTH, and every string
    encodable (JSON's \ud800 escapes give lone surrogates, which the tokenizer cannot take)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                raise APIError(400, "the request body has a string with a lone UTF-16 surrogate (an unpaired "
                                    "\\ud800-\\udfff escape); send valid Unicode", code="invalid_json") from None


def _bad_type(name: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"invalid type for '{name}': expected {expected}, got {type(value).__name__}",
                    param=name, code="invalid_type")


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_type(name, "a number", value)
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be in {interval}, got {value}", param=name, code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(name, "an integer", value)
    if value < lo or (hi is not None and value > hi):
        limits = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be {limits}, got {value}", param=name, code="invalid_value")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad_type(name, "a boolean", value)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad_type("stop", "a string or a list of strings", value)
    if len(items) > MAX_STOP_STRINGS or any(not s for s in items):
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop",
                       code="invalid_value")
    return tuple(items)


def _check_model(body: dict, config: ServeConfig) -> None:
    model = body.get("model")
    if model is None:
        raise APIError(400, f"'model' is required; this server serves '{config.model_id}'", param="model",
                       code="missing_required_parameter")
    if not isinstance(model, str):
        raise _bad_type("model", "a string (see GET /v1/models)", model)
    if model != config.model_id:
        raise APIError(404, f"the model '{model}' does not exist here; this server serves '{config.model_id}'",
                       param="model", code="model_not_found")


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad_type(f"messages[{i}].content", "a string or a list of text parts", content)


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _bad_type("messages", "a list", messages)
    if not messages:
        raise APIError(400, "'messages' is empty; send at least one message", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad_type(f"messages[{i}]", "an object", m)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                           param=f"messages[{i}].role", code="invalid_value")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, i),
                    **_structured(tool_calls.message_fields, m, i)})
    return out


def _structured(parse: Callable[..., Any], *args: Any) -> Any:
    """A parser of constrain.py or tool_calls.py; its StructureError becomes a 400."""
    try:
        return parse(*args)
    except StructureError as err:
        raise APIError(400, str(err), param=err.param, code=err.code) from None


@dataclass(frozen=True)
class GenRequest:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    n: int = 1                    # answers (choices) to the prompt
    logprobs: int | None = None   # None: none; k: the pick's and the k best tokens' log-probabilities
    ignore_eos: bool = False      # ban the stop tokens: run to max_tokens
    prompt_chars: int = 0         # the completion prompt's length: where legacy text_offset starts
    constraints: tuple = ()       # constrain.GrammarMask per answer: response_format, grammar, a forced tool call
    tools: tool_calls.ToolRequest | None = None


# fields that change the answer and that this server does not implement: a 400, never ignored.
# name -> (is this value harmless (null, neutral)?, what it would do); tools, tool_choice, response_format
# and grammar are structured output's (another module), not refused here
_UNSUPPORTED: dict[str, tuple[Callable[[Any, int], bool], str]] = {
    "logit_bias": (lambda v, n: v is None or v == {}, "per-token logit biases"),
    "functions": (lambda v, n: v is None, "OpenAI's deprecated function calling"),
    "function_call": (lambda v, n: v is None, "OpenAI's deprecated function calling"),
    "suffix": (lambda v, n: v is None or v == "", "insertion: text after the completion"),
    "echo": (lambda v, n: v is None or v is False, "the prompt echoed in the answer"),
    "best_of": (lambda v, n: v is None or v == n, "ranking more answers than n"),
    "presence_penalty": (lambda v, n: v is None or v == 0, "non-zero; llama.cpp's repeat_penalty is supported"),
    "frequency_penalty": (lambda v, n: v is None or v == 0, "non-zero; llama.cpp's repeat_penalty is supported"),
    "audio": (lambda v, n: v is None, "audio output"),
    "modalities": (lambda v, n: v is None or v == ["text"], "output other than text"),
    "reasoning_effort": (lambda v, n: v is None, "this model does not reason"),
    "web_search_options": (lambda v, n: v is None, "web search"),
    "n_probs": (lambda v, n: v is None or v == 0, "send OpenAI's logprobs and top_logprobs instead"),
    "mirostat": (lambda v, n: v is None or v == 0, "mirostat sampling"),
    "typical_p": (lambda v, n: v is None or v == 1, "typical sampling"),
    "dynatemp_range": (lambda v, n: v is None or v == 0, "dynamic temperature"),
    "xtc_probability": (lambda v, n: v is None or v == 0, "XTC sampling"),
    "dry_multiplier": (lambda v, n: v is None or v == 0, "DRY sampling"),
}


def _refuse_unsupported(body: dict, n: int) -> None:
    for name, (harmless, what) in _UNSUPPORTED.items():
        if name in body and not harmless(body[name], n):
            raise APIError(400, f"'{name}' is not supported by this server ({what}); leave it out", param=name,
                           code="unsupported_parameter")


@dataclass(frozen=True)
class _Extras:
    """What _parse reads besides OpenAI's basic fields (see the module docstring)."""
    n: int
    logprobs: int | None
    ignore_eos: bool
    top_k: int
    min_p: float
    repeat_penalty: float
    repeat_last_n: int


def _extras(body: dict, config: ServeConfig, *, chat: bool) -> _Extras:
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    _refuse_unsupported(body, n)
    if chat:
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if not _flag(body, "logprobs"):
            if top is not None:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
            logprobs = None
        else:
            logprobs = top or 0
    else:  # the legacy field: how many top tokens, 0 for the pick's alone
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    return _Extras(
        n=n, logprobs=logprobs, ignore_eos=_flag(body, "ignore_eos"),
        top_k=_integer(body, "top_k", config.top_k, 0, MAX_TOP_K),
        min_p=_number(body, "min_p", config.min_p, *MIN_P),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, *REPEAT_PENALTY, lo_open=True),
        repeat_last_n=_integer(body, "repeat_last_n", 64, 0, MAX_REPEAT_LAST_N))


async def _parse(request: web.Request, *, chat: bool) -> GenRequest:
    app = request.app
    config, tokenizer, ctx = app[CONFIG], app[TOKENIZER], app[PIPELINE].ctx
    body = await _json_body(request)
    _check_model(body, config)
    temperature = _number(body, "temperature", config.temperature, *TEMPERATURE)
    top_p = _number(body, "top_p", config.top_p, *TOP_P, lo_open=True)
    max_tokens = _integer(body, "max_completion_tokens", None, 1) if chat else None
    max_tokens = _integer(body, "max_tokens", max_tokens or config.max_tokens, 1)
    seed = _integer(body, "seed", None, *SEED)
    extras = _extras(body, config, chat=chat)
    stops = _stops(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise _bad_type("stream_options", "an object", options)
    include_usage = _flag(options, "include_usage")
    tools = None
    if chat:
        messages = _messages(body)
        tools = _structured(tool_calls.parse_request, body, tokenizer)
        try:
            prompt = await asyncio.to_thread(tokenizer.encode_chat, messages, tools=tool_calls.template_tools(tools))
        except FastServeError as err:  # the template refused this conversation
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        what = "messages"
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
            text = text[0]
        if text is None:
            raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
        if not isinstance(text, str):
            raise _bad_type("prompt", "a string", text)
        prompt = await asyncio.to_thread(tokenizer.encode, text, add_bos=tokenizer.add_bos_token)
        prompt_chars = len(text)
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
        what = "prompt"
    if len(prompt) >= ctx:
        raise APIError(400, f"the {what} {'are' if chat else 'is'} {len(prompt)} tokens but the context holds {ctx} "
                            "(and the answer needs room too); send less, or start the server with a larger --ctx",
                       param=what, code="context_length_exceeded")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=extras.top_k, min_p=extras.min_p,
                            repeat_penalty=extras.repeat_penalty, repeat_last_n=extras.repeat_last_n, seed=seed)
    # a grammar's matcher follows one answer: one for each of the n
    constraints = tuple([await asyncio.to_thread(_structured, _constraint, body, tokenizer, tools)
                         for _ in range(extras.n)])
    return GenRequest(prompt, params, max_tokens, stops, stream, include_usage, n=extras.n,
                      logprobs=extras.logprobs, ignore_eos=extras.ignore_eos,
                      prompt_chars=0 if chat else prompt_chars,
                      constraints=constraints if constraints[0] is not None else (), tools=tools)


def _constraint(body: dict, tokenizer, tools: tool_calls.ToolRequest | None) -> constrain.GrammarMask | None:
    """The grammar the request asks for, compiled for its session (worker thread: a schema takes
    milliseconds, the model's first one also its llguidance vocabulary, ~0.4 s)."""
    asked = constrain.grammar_of(body)
    if tools is not None and tools.forced:
        if asked is not None:
            raise StructureError("tool_choice 'required' or a named function already fixes the shape of the answer; "
                                 "leave out response_format and grammar", asked[1])
        asked = tool_calls.forced_grammar(tools, tokenizer), "tool_choice"
    return None if asked is None else constrain.GrammarMask.build(tokenizer, asked[0], param=asked[1])


# -- generation ----------------------------------------------------------------------------------


class TextStream:
    """Token ids -> text pieces, cut at the first stop string. Text that could be the start
    of a stop string is held back until it is known not to be one."""

    def __init__(self, tokenizer, stops: tuple[str, ...], *, skip_special: bool = True):
        self.decoder = tokenizer.stream_decoder(skip_special=skip_special)
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, token: int) -> str:
        return self._release(self.decoder.push(token), final=False)

    def flush(self) -> str:
        return self._release(self.decoder.flush(), final=True)

    def _release(self, piece: str, *, final: bool) -> str:
        self.held += piece
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.held = self.held[: min(hits)], ""
            return out
        keep = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out


@dataclass(frozen=True)
class Piece:
    """Text of an answer as it is released, with the log-probabilities of the tokens it completes."""
    text: str
    logprobs: tuple[TokenLogprobs, ...] = ()


async def _generate(engine: EngineLoop, session: Session, text: TextStream) -> AsyncIterator[Piece | Finished]:
    """Pieces of a session's answer, then its Finished (reason "stop" or "length"). A token's
    logprobs go with the piece that releases its text (or a piece of no text at the end);
    tokens that only spell a stop string go unreported with it.
    The caller cancels the session when it stops listening, whatever the reason."""
    pending: list[TokenLogprobs] = []
    while True:
        event = await session.events.get()
        if isinstance(event, Token):
            if event.logprobs is not None:
                pending.append(event.logprobs)
            piece = text.push(event.id)
            if piece:
                yield Piece(piece, tuple(pending))
                pending = []
            if text.stopped:
                engine.cancel(session, reason="stop")
                yield Finished("stop")
                return
            continue
        if event.reason == "error":
            raise APIError(500, event.message or "generation failed", type="server_error")
        tail = text.flush()
        if tail or pending:
            yield Piece(tail, tuple(pending))
        yield Finished("stop" if event.reason in ("stop", "cancelled") else "length")
        return


async def _merged(streams: list[AsyncIterator[Piece | Finished]]) -> AsyncIterator[tuple[int, Piece | Finished]]:
    """(choice index, item) of several answers, as they come."""
    if len(streams) == 1:  # no task in between: one answer keeps its back-pressure as before
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[Piece | Finished]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, end))
        except Exception as err:  # APIError: an answer failed; the caller reports it
            await queue.put((i, err))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def _usage(gen: GenRequest, sessions: list[Session]) -> dict[str, Any]:
    done = sum(s.completion_tokens for s in sessions)  # the prompt counts once, as OpenAI's n does
    return {"prompt_tokens": len(gen.prompt), "completion_tokens": done, "total_tokens": len(gen.prompt) + done,
            "prompt_tokens_details": {"cached_tokens": sessions[0].cached}}  # as OpenAI reports its prompt cache


def _queue_full(err: QueueFull) -> APIError:
    return APIError(429, f"the server is busy: {err}; retry after {RETRY_AFTER_S} s (Retry-After), or start it "
                         "with a larger --max-queue or --max-sessions", type="requests", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _choice_seed(seed: int | None, i: int) -> int | None:
    """Answer i's seed: seed + i, wrapped into what a generator takes."""
    if seed is None:
        return None
    lo, hi = SEED
    return (seed + i - lo) % (hi - lo + 1) + lo


@dataclass
class _Choice:
    """One answer's logprobs as the API reports them (chat: entries; legacy: from text offsets)."""
    index: int
    chat: bool
    texts: TokenTexts
    offset: int = 0           # legacy text_offset of the next token
    entries: list[TokenLogprobs] = field(default_factory=list)

    def logprobs(self, entries: tuple[TokenLogprobs, ...]) -> dict[str, Any]:
        if self.chat:
            return chat_logprobs(entries, self.texts)
        shape, self.offset = completion_logprobs(entries, self.texts, self.offset)
        return shape


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    app = request.app
    if app[ENGINE].queue_full:  # before reading and tokenizing a body that cannot be queued
        raise _queue_full(QueueFull(f"{app[ENGINE].max_queue} requests already wait"))
    gen = await _parse(request, chat=chat)
    engine, config, tokenizer = app[ENGINE], app[CONFIG], app[TOKENIZER]
    # ignore_eos: llama.cpp bans the end-of-generation tokens rather than skipping them
    banned = tokenizer.stop_ids if gen.ignore_eos else frozenset()
    samplers = [Sampler(replace(gen.params, seed=_choice_seed(gen.params.seed, i)),
                        gen.constraints[i] if gen.constraints else None, logprobs=gen.logprobs, banned=banned)
                for i in range(gen.n)]
    try:
        sessions = engine.submit_many(gen.prompt, samplers, max_tokens=gen.max_tokens,
                                      stop_ids=frozenset() if gen.ignore_eos else tokenizer.stop_ids)
    except EngineClosed:
        raise APIError(503, "the server is shutting down; try again when it is back", type="server_error",
                       code="shutting_down") from None
    except QueueFull as err:
        raise _queue_full(err) from None
    # a format whose call markers are special tokens ([TOOL_CALLS]) needs them in the text it parses
    skip_special = gen.tools is None or not gen.tools.format.special_markers
    answers = [_generate(engine, s, TextStream(tokenizer, gen.stops, skip_special=skip_special)) for s in sessions]
    choices = [_Choice(i, chat, app[TOKEN_TEXTS], gen.prompt_chars) for i in range(gen.n)]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{sessions[0].id}"
    created = int(time.time())
    try:
        if gen.stream:
            return await _stream(request, answers, choices, sessions, gen, rid, created, chat=chat)
        pieces: list[list[str]] = [[] for _ in sessions]
        reasons = ["stop"] * len(sessions)
        async for i, item in _merged(answers):
            if isinstance(item, Finished):
                reasons[i] = item.reason
            else:
                pieces[i].append(item.text)
                choices[i].entries.extend(item.logprobs)
        out = []
        for c, parts, reason in zip(choices, pieces, reasons):
            logprobs = c.logprobs(tuple(c.entries)) if gen.logprobs is not None else None
            answer = "".join(parts)
            message: dict[str, Any] = {"role": "assistant", "content": answer}
            if gen.tools is not None:
                message, reason = tool_calls.message(answer, reason, gen.tools)
            out.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason} if chat
                       else {"index": c.index, "text": answer, "logprobs": logprobs, "finish_reason": reason})
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": config.model_id, "choices": out, "usage": _usage(gen, sessions),
        })
    finally:
        for s in sessions:
            engine.cancel(s)  # no-op when it finished; frees the KV when the client went away


async def _stream(request: web.Request, answers: list[AsyncIterator[Piece | Finished]], choices: list[_Choice],
                  sessions: list[Session], gen: GenRequest, rid: str, created: int, *,
                  chat: bool) -> web.StreamResponse:
    model = request.app[CONFIG].model_id
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(c: _Choice, delta: dict[str, Any] | str, reason: str | None = None,
              entries: tuple[TokenLogprobs, ...] = ()) -> bytes:
        logprobs = c.logprobs(entries) if gen.logprobs is not None and entries else None
        choice = ({"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason} if chat else
                  {"index": c.index, "text": delta, "logprobs": logprobs, "finish_reason": reason})
        data: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if gen.include_usage:
            data["usage"] = None
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    timeout = request.app[LIMITS].idle_timeout

    async def send(data: bytes) -> None:
        """write() waits while the client's window is full: one that stops reading is cut off
        after idle_timeout, or it would hold its handler and connection for ever."""
        try:
            async with asyncio.timeout(timeout):
                await response.write(data)
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()  # close() would wait to flush to the same client
            raise ConnectionResetError(f"the client read nothing for {timeout:g} s") from None

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        if chat:
            for c in choices:
                await send(chunk(c, {"role": "assistant", "content": ""}))
        calls = [tool_calls.CallStream(gen.tools) if gen.tools is not None else None for _ in choices]
        async for i, item in _merged(answers):
            if isinstance(item, Finished):
                reason = item.reason
                if calls[i] is not None:
                    for delta in calls[i].finish():
                        await send(chunk(choices[i], delta))
                    reason = tool_calls.stream_reason(calls[i], reason)
                await send(chunk(choices[i], {} if chat else "", reason))
            elif calls[i] is not None:
                for delta in calls[i].push(item.text):
                    await send(chunk(choices[i], delta))
            else:
                await send(chunk(choices[i], {"content": item.text} if chat else item.text, None, item.logprobs))
        if gen.include_usage:
            final = {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                     "usage": _usage(gen, sessions)}
            await send(b"data: " + json.dumps(final).encode() + b"\n\n")
        await send(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away: the caller's finally cancels the session
    except APIError as err:  # after the headers: the error travels as an event, as OpenAI's does
        try:
            await response.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
            await response.write_eof()
        except ConnectionError:
            pass
    return response


# -- handlers ------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


# -- embeddings and tokens -------------------------------------------------------------------------


def _embedding_inputs(body: dict, tokenizer, ctx: int) -> list[list[int]]:
    """`input`: a string, a list of strings, a list of token ids, or a list of such lists."""
    value = body.get("input")
    if value is None:
        raise APIError(400, "'input' is required", param="input", code="missing_required_parameter")
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_id(v) for v in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad_type("input", "a string, an array of strings, or token ids (an array, or arrays of them)", value)
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"'input' holds {len(value)} items, more than {MAX_EMBEDDING_INPUTS}; send fewer at once",
                       param="input", code="invalid_value")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            ids = tokenizer.encode(item, add_bos=tokenizer.add_bos_token) if item else []
        elif isinstance(item, list) and all(_is_id(v) for v in item):
            ids = item
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise APIError(400, f"input[{i}] has a token id outside the vocabulary [0, {tokenizer.vocab_size})",
                               param="input", code="invalid_value")
        else:
            raise _bad_type(f"input[{i}]", "a string or an array of token ids", item)
        if not ids:
            raise APIError(400, f"input[{i}] is empty; send some text", param="input", code="invalid_value")
        if len(ids) > ctx:
            raise APIError(400, f"input[{i}] is {len(ids)} tokens but the context holds {ctx}; send less, or start "
                                "the server with a larger --ctx", param="input", code="context_length_exceeded")
        out.append(ids)
    return out


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def embeddings(request: web.Request) -> web.Response:
    app = request.app
    body = await _json_body(request)
    _check_model(body, app[CONFIG])
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format",
                       code="invalid_value")
    dim = app[PIPELINE].config.dim
    dimensions = _integer(body, "dimensions", dim, 1)
    if dimensions != dim:
        raise APIError(400, f"this model's embeddings have {dim} dimensions; shortening them is not supported",
                       param="dimensions", code="unsupported_parameter")
    inputs = await asyncio.to_thread(_embedding_inputs, body, app[TOKENIZER], app[PIPELINE].ctx)
    if not app[PIPELINE].holds_head:
        raise APIError(400, "embeddings need the model's last layers and final norm on this machine, and on this "
                            "cluster they run on a peer; serve the model on one machine (--local-only) for "
                            "/v1/embeddings", code="unsupported_on_cluster")
    data = []
    for i, ids in enumerate(inputs):  # one at a time: the answers being generated step in between
        try:
            hidden = await app[ENGINE].final_hidden(ids)
        except EngineClosed:
            raise APIError(503, "the server is shutting down; try again when it is back", type="server_error",
                           code="shutting_down") from None
        except PipelineReset:
            raise APIError(503, "the cluster was re-planned meanwhile; send the request again", type="server_error",
                           code="replanned") from None
        vector = torch.nn.functional.normalize(hidden.float().mean(0), dim=0).tolist()  # mean-pooled, unit length
        encoded: list[float] | str = (vector if fmt == "float" else
                                      base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode())
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(len(ids) for ids in inputs)
    return web.json_response({"object": "list", "data": data, "model": app[CONFIG].model_id,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def tokenize(request: web.Request) -> web.Response:
    """llama.cpp server's: {content, add_special?, with_pieces?} -> {tokens: [id] or [{id, piece}]}.
    Special-token text in content becomes that token (llama.cpp's parse_special default)."""
    app = request.app
    body = await _json_body(request)
    content = body.get("content")
    if not isinstance(content, str):
        raise _bad_type("content", "a string", content)
    tokenizer = app[TOKENIZER]
    ids = await asyncio.to_thread(tokenizer.encode, content,
                                  add_bos=_flag(body, "add_special") and tokenizer.add_bos_token)
    if not _flag(body, "with_pieces"):
        return web.json_response({"tokens": ids})
    texts = app[TOKEN_TEXTS]

    def piece(token: int) -> str | list[int]:  # llama.cpp: the text, or its bytes when not whole characters
        raw = texts.bytes(token)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return list(raw)

    return web.json_response({"tokens": [{"id": t, "piece": piece(t)} for t in ids]})


async def detokenize(request: web.Request) -> web.Response:
    """llama.cpp server's: {tokens} -> {content}, special tokens written out."""
    app = request.app
    body = await _json_body(request)
    tokens = body.get("tokens", [])
    vocab = app[TOKENIZER].vocab_size
    if not isinstance(tokens, list) or not all(_is_id(t) for t in tokens):
        raise _bad_type("tokens", "an array of token ids", tokens)
    if any(not 0 <= t < vocab for t in tokens):
        raise APIError(400, f"'tokens' has an id outside the vocabulary [0, {vocab})", param="tokens",
                       code="invalid_value")
    content = await asyncio.to_thread(app[TOKENIZER].decode, tokens, skip_special=False)
    return web.json_response({"content": content})


def _model_card(app: web.Application) -> dict[str, Any]:
    return {"id": app[CONFIG].model_id, "object": "model", "created": app[STARTED], "owned_by": "fastserve"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app)]})


async def get_model(request: web.Request) -> web.Response:
    _check_model({"model": request.match_info["model"]}, request.app[CONFIG])
    return web.json_response(_model_card(request.app))


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"status": "ok", "model": request.app[CONFIG].model_id,
                              "active_sessions": engine.active_sessions, "queue_length": engine.queue_length})


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    engine, m = app[ENGINE], app[ENGINE].metrics
    lines = ["# HELP fastserve_requests_total HTTP requests by endpoint and status.",
             "# TYPE fastserve_requests_total counter"]
    for (endpoint, status), n in sorted(app[REQUESTS].items()):
        lines.append(f'fastserve_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    lines += ["# HELP fastserve_tokens_generated_total Tokens generated for clients (stop tokens excluded).",
              "# TYPE fastserve_tokens_generated_total counter",
              f"fastserve_tokens_generated_total {m.tokens_generated}",
              "# HELP fastserve_prompt_tokens_total Prompt tokens of every request.",
              "# TYPE fastserve_prompt_tokens_total counter",
              f"fastserve_prompt_tokens_total {m.prompt_tokens}",
              "# HELP fastserve_prompt_tokens_cached_total Of those, whose KV the prompt cache gave (not prefilled).",
              "# TYPE fastserve_prompt_tokens_cached_total counter",
              f"fastserve_prompt_tokens_cached_total {m.cached_tokens}",
              "# HELP fastserve_preemptions_total Times a running session was made to wait by the scheduler.",
              "# TYPE fastserve_preemptions_total counter",
              f"fastserve_preemptions_total {m.preemptions}",
              "# HELP fastserve_evictions_total Times a session's KV was dropped for room (it re-prefills).",
              "# TYPE fastserve_evictions_total counter",
              f"fastserve_evictions_total {m.evictions}",
              "# HELP fastserve_session_waits_total Sessions left out of a step (queued or preempted), over all steps.",
              "# TYPE fastserve_session_waits_total counter",
              f"fastserve_session_waits_total {m.waits}",
              "# HELP fastserve_sessions_finished_total Sessions ended, by reason.",
              "# TYPE fastserve_sessions_finished_total counter"]
    for reason, n in sorted(m.sessions_finished.items()):
        lines.append(f'fastserve_sessions_finished_total{{reason="{reason}"}} {n}')
    lines += m.ttft.render("fastserve_time_to_first_token_seconds", "Request arrival to its first token.")
    lines += m.per_token.render("fastserve_time_per_output_token_seconds", "Time between a session's tokens.")
    gauges = [
        ("fastserve_queue_length", "Sessions waiting (not in the current step).", engine.queue_length),
        ("fastserve_active_sessions", "Sessions whose KV cache is held.", engine.active_sessions),
        ("fastserve_kv_tokens", "Tokens of KV held by the live sessions.", engine.kv_tokens),
        ("fastserve_prompt_cache_sessions", "Ended sessions whose KV is kept for later prompts (--prompt-cache).",
         engine.kept_sessions),
        ("fastserve_prompt_cache_tokens", "Tokens of KV they hold (counted in the KV budget).", engine.kept_tokens),
        ("fastserve_kv_tokens_peak", "The most KV (sessions' and prompt cache's) held after any step so far.",
         m.kv_peak),
        ("fastserve_kv_budget_tokens", "Tokens of KV all sessions may hold (memory, --kv-memory, --max-sessions).",
         engine.kv_budget_tokens),
        ("fastserve_max_sessions", "Sessions that may take a step together (--max-sessions).", engine.max_sessions),
    ]
    for name, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    lines += ["# HELP fastserve_decode_steps_total Batched decode forwards (every decoding session in one).",
              "# TYPE fastserve_decode_steps_total counter", f"fastserve_decode_steps_total {m.decode_steps}",
              "# HELP fastserve_decode_rows_total Session tokens those forwards carried (/ steps = mean batch).",
              "# TYPE fastserve_decode_rows_total counter", f"fastserve_decode_rows_total {m.decode_rows}",
              "# HELP fastserve_pipeline_resets_total Steps lost to a re-plan (a peer left); sessions re-prefilled.",
              "# TYPE fastserve_pipeline_resets_total counter", f"fastserve_pipeline_resets_total {m.resets}"]
    stages = engine.stage_report()
    per_stage = [
        ("fastserve_stage_seconds_total", "counter", "Wall time spent in each stage (a peer's includes its link).",
         lambda r: f"{r.seconds:.6f}"),
        ("fastserve_stage_tokens_total", "counter", "Tokens through each stage.", lambda r: r.tokens),
        ("fastserve_stage_kv_bytes", "gauge", "KV the sessions hold on each stage.", lambda r: r.kv_bytes),
        ("fastserve_stage_kv_budget_bytes", "gauge", "KV each stage may hold (the KV budget: memory, --kv-memory, --max-sessions).",
         lambda r: r.kv_budget_bytes),
    ]
    for name, kind, help_text, value in per_stage:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{stage="{r.index}",layers="{r.start}-{r.end}",machine="{_label(r.machine)}"}} {value(r)}'
                  for r in stages]
    return web.Response(body=("\n".join(lines) + "\n").encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(request.app[CONFIG].model_id))


async def status(request: web.Request) -> web.Response:
    """What `fastserve status --url` shows: the sessions and every stage, as JSON."""
    app = request.app
    engine, m = app[ENGINE], app[ENGINE].metrics
    stages = engine.stage_report()
    return web.json_response({
        "model": app[CONFIG].model_id, "scheduler": engine.scheduler_name, "max_sessions": engine.max_sessions,
        "ctx": engine.pipeline.ctx, "uptime_s": int(time.time()) - app[STARTED],
        "tokens_generated": m.tokens_generated, "queue_length": engine.queue_length,
        "active_sessions": engine.active_sessions, "kv_tokens": engine.kv_tokens,
        "prompt_cache": {"sessions": engine.kept_sessions, "kv_tokens": engine.kept_tokens,
                         "prompt_tokens": m.prompt_tokens, "cached_tokens": m.cached_tokens},
        "mean_decode_batch": m.decode_rows / m.decode_steps if m.decode_steps else 0.0,
        "sessions": engine.session_report(),
        "stages": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in stages],
    } | cluster_status(engine, stages))


# -- the app -------------------------------------------------------------------------------------


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = EngineLoop(app[PIPELINE], **app[ENGINE_OPTIONS], max_queue=app[LIMITS].max_queue)
    engine.start()
    app[ENGINE] = engine
    yield
    await engine.close()


async def _end_sessions(app: web.Application) -> None:
    """on_shutdown runs before aiohttp waits for open requests: end the generations so that
    streams close now rather than after their last token (a Ctrl-C must not take minutes)."""
    app[ENGINE].shutdown()


def create_app(pipeline: Pipeline, tokenizer, config: ServeConfig, *, max_sessions: int = 4,
               scheduler: str = "fcfs", threads: int | None = None,
               kv_room: Callable[[], int] | None = None, prompt_cache: int | None = None,
               limits: Limits = Limits()) -> web.Application:
    """The API over a loaded model. The engine loop starts and stops with the app (cleanup_ctx).
    Run it with `serving()`, which enforces the connection limits and cancels the generation
    of a client that leaves a non-streaming request (streams notice on their next write)."""
    app = web.Application(middlewares=[errors_and_counts], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[LIMITS] = limits
    app[PIPELINE] = pipeline
    app[TOKENIZER] = tokenizer
    app[TOKEN_TEXTS] = TokenTexts(tokenizer)
    app[ENGINE_OPTIONS] = {"max_sessions": max_sessions, "scheduler": scheduler, "threads": threads,
                           "kv_room": kv_room, "prompt_cache": prompt_cache}
    app[REQUESTS] = Counter()
    app[STARTED] = int(time.time())
    app.cleanup_ctx.append(_engine_ctx)
    app.on_shutdown.append(_end_sessions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    webui.add_routes(app)  # the web page at /
    from fastserve_edge.serving import ollama  # it builds on this module

    ollama.add_routes(app)
    return app


@asynccontextmanager
async def serving(app: web.Application, host: str, port: int, *,
                  ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[str, int]]:
    """Serve `app` on host:port (0: any free port) inside the block; yields the bound (host, port).
    On leaving, the listener closes first, then aiohttp ends the app (on_shutdown ends the
    sessions, open requests get up to its shutdown timeout, cleanup_ctx stops the engine)."""
    limits = app[LIMITS]
    # keepalive_timeout: aiohttp 3.14 arms it when a connection opens and after every answer,
    # and closes the connection if a whole request head has not arrived by then: the idle
    # limit and the head limit in one (bytes trickling in do not push it back)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its session
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=limits.idle_timeout)
    await runner.setup()
    try:
        # not a web.TCPSite: aiohttp has no cap on connections, so the protocol factory counts them
        loop = asyncio.get_running_loop()
        try:
            listener = await loop.create_server(
                _at_most(runner.server, limits.max_connections), host, port, ssl=ssl_context,
                ssl_handshake_timeout=limits.idle_timeout if ssl_context is not None else None)
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                              "pick another --port or --host") from None
        try:
            yield listener.sockets[0].getsockname()[:2]
        finally:
            listener.close()
    finally:
        await runner.cleanup()


def _at_most(server: web.Server, max_connections: int) -> Callable[[], asyncio.Protocol]:
    def protocol() -> asyncio.Protocol:
        return server() if len(server.connections) < max_connections else _TurnAway(max_connections)
    return protocol


class _TurnAway(asyncio.Protocol):
    """A connection past the cap: one 503 with OpenAI's error JSON, then closed, unread."""

    def __init__(self, max_connections: int):
        self.max_connections = max_connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = json.dumps(APIError(503, f"the server holds its limit of {self.max_connections} connections; retry "
                                        f"after {RETRY_AFTER_S} s, or close idle ones", type="server_error",
                                   code="too_many_connections").body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(head.encode() + body)
        transport.close()


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for --tls-cert/--tls-key (PEM), TLS 1.2 at least."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file; give the PEM file (e.g. from certbot, mkcert or "
                              "openssl req -x509)")
        try:
            path.read_bytes()
        except OSError as err:
            raise ConfigError(f"{flag} {path}: cannot read it ({err.strerror or err}); check its permissions") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    def encrypted() -> bytes:  # OpenSSL would otherwise ask on the terminal
        raise ConfigError(f"--tls-key {key} is encrypted; give it unencrypted (openssl pkey -in KEY -out PLAIN), "
                          "readable only by the user that serves")

    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as err:
        what = ("the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(err) else
                f"they are not a PEM certificate and its unencrypted PEM key ({err.reason or err})")
        raise ConfigError(f"--tls-cert {cert} --tls-key {key}: {what}; give the key the certificate was "
                          "made with") from None
    return context


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without an API key, unless told to (--insecure)."""
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key is empty; give a real key, or leave the flag out on loopback")
    if api_key or insecure or _is_loopback(host):
        return
    raise ConfigError(
        f"--host {host} is reachable from other machines, and without --api-key anyone there could use "
        "this server (and its CPU); give --api-key KEY (clients send 'Authorization: Bearer KEY'), "
        "bind to 127.0.0.1, or pass --insecure if the network is yours alone"
    )


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
