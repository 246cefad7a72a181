"""ollama's HTTP API beside OpenAI's, so that tools which speak ollama work unchanged (exo
does the same). Same server, same model, same generation path as api.py: an EngineLoop
session per request, TextStream for stop strings, the same auth, body limits and checks.

    POST /api/chat       messages, model, options, stream (default true), keep_alive
    POST /api/generate   prompt, system, raw, model, options, stream, keep_alive
    GET  /api/tags       the served model, as ollama lists its models
    POST /api/show       details, model_info, template (the model's jinja chat template), parameters
    GET  /api/ps         the served model, as ollama lists running ones
    GET  /api/version    OLLAMA_VERSION
    GET /openapi.json describes them too (openapi.py).

Answers: NDJSON (application/x-ndjson), one object per text piece, then one with done true,
done_reason ("stop" | "length") and the counts and durations (nanoseconds) ollama reports;
"stream": false gives that last object alone, with the whole text. Durations here:
load_duration is reading and tokenizing the request (the model stays loaded),
prompt_eval_duration from queueing the session to its first text (the queue's wait
included), eval_duration from there to the end.

Where ollama and this server differ (each refused with a 400 that says so, never ignored):
- options: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n (-1: the
  context), seed (-1: random), num_predict (-1, -2: until the context is full; default: the
  [chat] max_tokens), stop, num_ctx (the context this request may use: a prompt that does not
  fit is refused; past the server's --ctx it is cut to it, as ollama cuts it to the model's).
  Defaults: the [chat] settings, repeat_penalty 1 (as the OpenAI routes: the same request
  gets the same answer on both). Load-time options (num_gpu, num_thread, use_mmap...) are
  accepted and ignored (the model is loaded once, by `fastserve serve`); samplers this engine
  lacks (mirostat, typical_p, tfs_z, presence/frequency penalty) only at their off value;
  any other key is refused.
- format: "json" is one JSON object, a JSON schema is JSON valid under it, enforced while
  decoding as the OpenAI routes' response_format (constrain.py, llguidance; strict: a schema
  keyword llguidance cannot enforce is a 400, never ignored). /api/chat and /api/generate.
- tools (/api/chat): OpenAI's tool objects, as the OpenAI route with tool_choice "auto" takes
  them (ollama has no tool_choice): rendered through the model's own chat template, the calls
  the model writes parsed back (tool_calls.py) into message.tool_calls, ollama's shape
  `{"function": {"name", "arguments": {...}}}` (an object, not JSON text); a call whose
  arguments are no JSON object stays in the content as written. Streaming: content pieces as
  they come, each call in a piece of its own once it has ended (as ollama sends them);
  done_reason stays "stop". History: assistant messages with tool_calls, and role "tool"
  messages (`tool_name`: the function whose result they carry). A template without tool
  support: 400. /api/show lists "tools" among the capabilities where the template takes them.
- /api/generate: template, context, suffix, images are refused; a missing prompt loads the
  model as ollama's does (done_reason "load": it is always loaded). Same for /api/chat
  without messages.
- model names: the served one as /v1/models names it, or with ":latest" (what ollama
  writes for a name without a tag; /api/tags lists that form).
- digest: a sha256 naming this version of the file (its name, size and modification time),
  not of its bytes: hashing gigabytes at every start would cost minutes on an old PC.
- pull, push, create, copy, delete: 501; this server serves the one model it started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.errors import FastServeError
from fastserve_edge.serving import constrain, tool_calls
from fastserve_edge.serving.api import (
    CONFIG,
    ENGINE,
    LIMITS,
    PIPELINE,
    STARTED,
    TOKENIZER,
    APIError,
    TextStream,
    _bad_type,
    _generate,
    _integer,
    _json_body,
    _messages,
    _number,
    _queue_full,
    _structured,
)
from fastserve_edge.serving.constrain import GrammarMask, StructureError
from fastserve_edge.serving.engine_loop import EngineClosed, Finished, QueueFull, Session
from fastserve_edge.serving.openapi import MAX_STOP_STRINGS, OLLAMA_MANAGE, SEED, TEMPERATURE, TOP_P

log = logging.getLogger(__name__)

OLLAMA_VERSION = "0.6.0"  # the ollama release whose API these routes follow (tools compare it to pick features)
NDJSON = "application/x-ndjson"
FAR_FUTURE = "2318-01-01T00:00:00Z"  # /api/ps expires_at: never unloaded (ollama's keep_alive -1 looks the same)

# samplers this engine does not have: accepted at the value that turns them off, refused otherwise
OFF_VALUES = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
# options that choose how a model loads or runs, not what it answers: `fastserve serve` chose
IGNORED_BOOLS = ("numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock",
                 "embedding_only", "penalize_newline")
IGNORED_INTS = ("num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep")
IGNORED_NUMBERS = ("mirostat_tau", "mirostat_eta")  # only read with mirostat, which must be 0
USED = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "num_predict",
        "stop", "num_ctx")
KNOWN_OPTIONS = frozenset(USED) | set(OFF_VALUES) | set(IGNORED_BOOLS) | set(IGNORED_INTS) | set(IGNORED_NUMBERS)
MAX_REPEAT_PENALTY = 10.0  # far above any useful value (1.0-1.3); bounds what a client may send


@dataclass(frozen=True)
class ModelFacts:
    """What /api/tags, /api/show and /api/ps say about the served model's file."""
    format: str = ""          # "gguf" | "safetensors"; "" when not known
    family: str = ""          # the architecture: "llama", "qwen2"...
    parameters: int = 0       # weights counted in the file; 0 when not known
    quantization: str = ""    # "Q8_0", "Q4_K_M", "BF16"...
    size: int = 0             # bytes on disk
    modified_at: float = 0.0  # the file's mtime, s since the epoch
    digest: str = ""          # 64 hex digits (see the module docstring)


FACTS = web.AppKey("ollama_facts", ModelFacts)


def describe(path: Path, source: Any, name: str) -> ModelFacts:
    """Facts of a model file or HF folder; `source`: its open_model() (GGUFModel | HFModel)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [f.stat() for f in files]
    size = sum(s.st_size for s in stats)
    mtime_ns = max((s.st_mtime_ns for s in stats), default=0)
    digest = hashlib.sha256(f"{name}\0{size}\0{mtime_ns}".encode()).hexdigest()
    return ModelFacts(format="gguf" if source.kind == "gguf" else "safetensors", family=source.config.arch,
                      parameters=int(source.n_params), quantization=source.quantization or "", size=size,
                      modified_at=mtime_ns / 1e9, digest=digest)


def add_routes(app: web.Application) -> None:
    """ollama's routes on the API's app (api.create_app calls it); `fastserve serve` then sets
    app[FACTS] from the model file (without it: the architecture alone)."""
    app[FACTS] = ModelFacts(family=app[PIPELINE].config.arch, modified_at=float(app[STARTED]))
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_get("/api/version", version)
    for path in OLLAMA_MANAGE:
        app.router.add_post(path, embed if "embed" in path else manage)
    app.router.add_delete("/api/delete", manage)


# -- what is not here ------------------------------------------------------------------------------


def _refuse_truthy(body: dict[str, Any], names: dict[str, str]) -> None:
    for name, why in names.items():
        if body.get(name) not in (None, False, "", [], 0):
            raise APIError(400, f"'{name}' is not supported here: {why}", param=name, code="unsupported")


async def manage(request: web.Request) -> web.Response:
    raise APIError(501, f"{request.path} is not served: this server serves the one model it was started with "
                        f"('{request.app[CONFIG].model_id}'); fetch others with `fastserve pull NAME` and start "
                        "`fastserve serve NAME`", code="not_implemented")


async def embed(request: web.Request) -> web.Response:
    raise APIError(501, f"{request.path}: embeddings are not served by this server yet", code="not_implemented")


# -- names, times, facts ---------------------------------------------------------------------------


def listed_name(model_id: str) -> str:
    """ollama's "name:tag" form: ":latest" added when the last path part has no tag."""
    return model_id if ":" in model_id.rsplit("/", 1)[-1] else f"{model_id}:latest"


def _model(body: dict[str, Any], app: web.Application) -> str:
    """The requested model name (as sent, which ollama echoes); 404 unless it is the served one."""
    model = body.get("model")
    if model is None:
        model = body.get("name")  # ollama's older spelling, still sent by some tools
    model_id = app[CONFIG].model_id
    if model is None or model == "":
        raise APIError(400, f"'model' is required; this server serves '{listed_name(model_id)}'", param="model")
    if not isinstance(model, str):
        raise _bad_type("model", "a string (see GET /api/tags)", model)
    if model not in (model_id, listed_name(model_id)):
        raise APIError(404, f"model '{model[:200]}' not found; this server serves '{listed_name(model_id)}' "
                            "(GET /api/tags)", param="model", code="model_not_found")
    return model


def _timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as ollama writes created_at."""
    moment = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parameter_size(n: int) -> str:
    """ollama's spelling: "135.00M", "1.2B", "8B"."""
    if n >= 10**9:
        return f"{n / 10**9:.0f}B" if n % 10**9 == 0 else f"{n / 10**9:.1f}B"
    if n >= 10**6:
        return f"{n / 10**6:.2f}M"
    if n >= 10**3:
        return f"{n / 10**3:.2f}K"
    return str(n) if n else ""


def _details(facts: ModelFacts) -> dict[str, Any]:
    return {"parent_model": "", "format": facts.format, "family": facts.family,
            "families": [facts.family] if facts.family else None,
            "parameter_size": _parameter_size(facts.parameters), "quantization_level": facts.quantization}


def _listing(app: web.Application) -> dict[str, Any]:
    facts, name = app[FACTS], listed_name(app[CONFIG].model_id)
    return {"name": name, "model": name, "modified_at": _timestamp(facts.modified_at), "size": facts.size,
            "digest": facts.digest, "details": _details(facts)}


async def tags(request: web.Request) -> web.Response:
    return web.json_response({"models": [_listing(request.app)]})


async def ps(request: web.Request) -> web.Response:
    app = request.app
    running = _listing(app) | {"expires_at": FAR_FUTURE, "size_vram": 0, "context_length": app[PIPELINE].ctx}
    del running["modified_at"]
    return web.json_response({"models": [running]})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


async def show(request: web.Request) -> web.Response:
    app = request.app
    body = await _json_body(request)
    _model(body, app)
    if not isinstance(body.get("verbose", False), (bool, type(None))):
        raise _bad_type("verbose", "a boolean", body["verbose"])
    config, facts, tokenizer, serve = app[PIPELINE].config, app[FACTS], app[TOKENIZER], app[CONFIG]
    arch = config.arch
    info: dict[str, Any] = {
        "general.architecture": arch, "general.parameter_count": facts.parameters or None,
        f"{arch}.context_length": config.context_length, f"{arch}.embedding_length": config.dim,
        f"{arch}.block_count": config.n_layers, f"{arch}.feed_forward_length": config.ffn_dim,
        f"{arch}.attention.head_count": config.n_heads, f"{arch}.attention.head_count_kv": config.n_kv_heads,
        f"{arch}.attention.key_length": config.head_dim, f"{arch}.attention.value_length": config.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": config.norm_eps, f"{arch}.rope.freq_base": config.rope_theta,
        f"{arch}.vocab_size": config.vocab_size,
    }
    if config.moe:
        info |= {f"{arch}.expert_count": config.n_experts, f"{arch}.expert_used_count": config.n_experts_used}
    stops = sorted(t for i in tokenizer.stop_ids if (t := tokenizer.decode([i], skip_special=False)))
    parameters = [("num_ctx", app[PIPELINE].ctx), ("temperature", serve.temperature), ("top_k", serve.top_k),
                  ("top_p", serve.top_p), ("min_p", serve.min_p), ("repeat_penalty", 1.0),
                  ("num_predict", serve.max_tokens), *(("stop", f'"{s}"') for s in stops)]
    text = "\n".join(f"{k} {v}" for k, v in parameters)
    modelfile = (f"# served by fastserve-edge; the template is the model's own (jinja), not a Go template\n"
                 f"FROM {serve.model_id}\n" + "".join(f"PARAMETER {k} {v}\n" for k, v in parameters))
    return web.json_response({
        "modelfile": modelfile, "parameters": text, "template": tokenizer.chat_template,
        "details": _details(facts), "model_info": {k: v for k, v in info.items() if v is not None},
        "capabilities": ["completion", *(["tools"] if tokenizer.template_takes_tools else [])],
        "modified_at": _timestamp(facts.modified_at),
    })


# -- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OllamaRequest:
    model: str                # as the client named it (echoed back)
    prompt: list[int]         # token ids
    params: SamplingParams
    max_tokens: int
    stops: tuple[str, ...]
    stream: bool
    constraint: GrammarMask | None = None      # format's grammar
    tools: tool_calls.ToolRequest | None = None


@dataclass(frozen=True)
class Options:
    params: SamplingParams
    max_tokens: int
    stops: tuple[str, ...]
    ctx: int                  # the context this request may use: num_ctx, cut to the server's


def _options(body: dict[str, Any], app: web.Application) -> Options:
    config, ctx = app[CONFIG], app[PIPELINE].ctx
    raw = body.get("options")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise _bad_type("options", "an object", raw)
    unknown = sorted(set(raw) - KNOWN_OPTIONS)
    if unknown:
        raise APIError(400, f"unknown option '{unknown[0][:100]}'; this server takes {', '.join(USED)} (and ignores "
                            "load-time options such as num_gpu)", param=f"options.{unknown[0][:100]}",
                       code="invalid_value")
    o = {f"options.{k}": v for k, v in raw.items()}  # the helpers name the field as the client wrote it

    for name in IGNORED_BOOLS:
        if o.get(f"options.{name}") is not None and not isinstance(o[f"options.{name}"], bool):
            raise _bad_type(f"options.{name}", "a boolean", o[f"options.{name}"])
    for name in IGNORED_INTS:
        _integer(o, f"options.{name}", None, -(2**31), 2**31 - 1)
    for name in IGNORED_NUMBERS:
        _number(o, f"options.{name}", 0.0, -1e9, 1e9)
    for name, off in OFF_VALUES.items():
        value = _number(o, f"options.{name}", off, -1e9, 1e9)
        if value != off:
            raise APIError(400, f"'options.{name}' is not supported by this engine; send {off} (off) or leave it out"
                                + ("; repeat_penalty is supported" if "penalty" in name else ""),
                           param=f"options.{name}", code="unsupported")

    num_ctx = _integer(o, "options.num_ctx", ctx, 1, 2**31 - 1)
    if num_ctx > ctx:
        log.info("num_ctx %d cut to the server's context of %d tokens", num_ctx, ctx)
    n_ctx = min(num_ctx, ctx)
    num_predict = _integer(o, "options.num_predict", config.max_tokens, -2, 2**31 - 1)
    if num_predict == 0:
        raise APIError(400, "'options.num_predict' must be -1 or -2 (until the context is full) or at least 1, got 0",
                       param="options.num_predict", code="invalid_value")
    seed = _integer(o, "options.seed", None, *SEED)
    repeat_last_n = _integer(o, "options.repeat_last_n", 64, -1, 2**31 - 1)
    params = SamplingParams(
        temperature=_number(o, "options.temperature", config.temperature, *TEMPERATURE),
        top_k=_integer(o, "options.top_k", config.top_k, 0, 2**31 - 1),
        top_p=_number(o, "options.top_p", config.top_p, *TOP_P, lo_open=True),
        min_p=_number(o, "options.min_p", config.min_p, 0.0, 1.0),
        repeat_penalty=_number(o, "options.repeat_penalty", 1.0, 0.0, MAX_REPEAT_PENALTY, lo_open=True),
        repeat_last_n=n_ctx if repeat_last_n == -1 else min(repeat_last_n, n_ctx),
        seed=None if seed == -1 else seed,  # ollama's -1: a random seed
    )
    if params.min_p >= 1.0:
        raise APIError(400, f"'options.min_p' must be in [0, 1), got {params.min_p}", param="options.min_p",
                       code="invalid_value")
    return Options(params, n_ctx if num_predict < 0 else num_predict, _stops(o.get("options.stop")), n_ctx)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad_type("options.stop", "a list of strings", value)
    if len(items) > MAX_STOP_STRINGS or any(not s for s in items):
        raise APIError(400, f"'options.stop' takes at most {MAX_STOP_STRINGS} non-empty strings",
                       param="options.stop", code="invalid_value")
    return tuple(items)


def _stream_flag(body: dict[str, Any]) -> bool:
    value = body.get("stream")
    if value is None:
        return True  # ollama streams unless told not to
    if not isinstance(value, bool):
        raise _bad_type("stream", "a boolean", value)
    return value


def _common(body: dict[str, Any], app: web.Application) -> tuple[str, Options, bool]:
    """What /api/chat and /api/generate share: model, stream, keep_alive, options, what is not here."""
    model = _model(body, app)
    stream = _stream_flag(body)
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float, str))):
        raise _bad_type("keep_alive", "a duration (a number of seconds or a string such as \"5m\")", keep_alive)
    _refuse_truthy(body, {"think": "the model's thinking is not split from its answer here",
                          "logprobs": "log probabilities are not served on /api/ routes yet",
                          "top_logprobs": "log probabilities are not served on /api/ routes yet"})
    return model, _options(body, app), stream


def _format(body: dict[str, Any]) -> str | None:
    """The grammar `format` asks for: "json" (one JSON object) or a JSON schema; None for none."""
    value = body.get("format")
    if value is None or value == "":
        return None
    if value == "json":
        return constrain.json_schema_grammar({"type": "object"}, strict=True, param="format")
    if not isinstance(value, dict):
        raise StructureError(f"'format' must be \"json\" or a JSON schema (an object), got {str(value)[:100]!r}",
                             "format", code="invalid_type" if not isinstance(value, str) else "invalid_value")
    return constrain.json_schema_grammar(value, strict=True, param="format")


async def _constraint(body: dict[str, Any], tokenizer) -> GrammarMask | None:
    """format's grammar compiled for one session (worker thread: a schema takes milliseconds)."""
    def build() -> GrammarMask | None:
        grammar = _format(body)
        return None if grammar is None else GrammarMask.build(tokenizer, grammar, param="format")

    return await asyncio.to_thread(_structured, build)


def _chat_messages(messages: list[Any]) -> list[Any]:
    """ollama's messages in the OpenAI shape api._messages reads: a tool result's `tool_name`
    is its `name` (what chat templates read); tool_calls pass as they are (their arguments are
    objects already)."""
    out = []
    for m in messages:
        if isinstance(m, dict) and "tool_name" in m:
            m = {k: v for k, v in m.items() if k != "tool_name"} | {"name": m["tool_name"]}
        out.append(m)
    return out


def _request(model: str, prompt: list[int], opts: Options, stream: bool, what: str,
             app: web.Application, constraint: GrammarMask | None = None,
             tools: tool_calls.ToolRequest | None = None) -> OllamaRequest:
    """The request to generate for, once its prompt is known to fit the context it may use."""
    if len(prompt) >= opts.ctx:
        server = app[PIPELINE].ctx
        holds = (f"the context holds {server}" if opts.ctx == server else
                 f"options.num_ctx allows {opts.ctx} (the server's context holds {server})")
        raise APIError(400, f"the {what} is {len(prompt)} tokens but {holds}, and the answer needs room too; "
                            "send less" + (", or start the server with a larger --ctx" if opts.ctx == server else
                                           ", or raise num_ctx"), param=what, code="context_length_exceeded")
    return OllamaRequest(model, prompt, opts.params, min(opts.max_tokens, opts.ctx - len(prompt)), opts.stops,
                         stream, constraint, tools)


async def _parse_chat(request: web.Request) -> OllamaRequest:
    """The request; its prompt is empty when there are no messages (ollama's "load")."""
    app = request.app
    body = await _json_body(request)
    model, opts, stream = _common(body, app)
    messages = body.get("messages")
    if messages is None or messages == []:
        return OllamaRequest(model, [], opts.params, opts.max_tokens, opts.stops, stream)
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("images") not in (None, []):
                raise APIError(400, f"messages[{i}].images: the model reads text only", param=f"messages[{i}].images",
                               code="unsupported")
    chat = _messages({"messages": _chat_messages(messages) if isinstance(messages, list) else messages})
    tokenizer = app[TOKENIZER]
    tools = _structured(tool_calls.parse_request, {"tools": body.get("tools")}, tokenizer)
    constraint = await _constraint(body, tokenizer)
    try:
        prompt = await asyncio.to_thread(tokenizer.encode_chat, chat, tools=tool_calls.template_tools(tools))
    except FastServeError as err:  # the template refused this conversation
        raise APIError(400, str(err), param="messages", code="invalid_value") from None
    return _request(model, prompt, opts, stream, "messages", app, constraint, tools)


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad_type(name, "a string", value)
    return value


async def _parse_generate(request: web.Request) -> OllamaRequest:
    app = request.app
    body = await _json_body(request)
    model, opts, stream = _common(body, app)
    for name in ("template", "suffix"):
        if _text(body, name):
            raise APIError(400, f"'{name}' is not supported here: the model's own chat template writes the prompt "
                                "(or send 'raw': true with the prompt written out)", param=name, code="unsupported")
    _refuse_truthy(body, {"context": "send the conversation to /api/chat instead (this server returns no context)",
                          "images": "the model reads text only",
                          "tools": "tools are /api/chat's (as ollama's); send them there with the messages"})
    raw = body.get("raw")
    if raw is not None and not isinstance(raw, bool):
        raise _bad_type("raw", "a boolean", raw)
    prompt_text, system = _text(body, "prompt"), _text(body, "system")
    if not prompt_text:
        return OllamaRequest(model, [], opts.params, opts.max_tokens, opts.stops, stream)
    tokenizer = app[TOKENIZER]
    if raw:
        if system:
            raise APIError(400, "'system' needs the chat template, which 'raw': true skips; write it into the prompt",
                           param="system", code="invalid_value")
        prompt = await asyncio.to_thread(tokenizer.encode, prompt_text, add_bos=tokenizer.add_bos_token)
    else:
        chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt_text}]
        try:
            prompt = await asyncio.to_thread(tokenizer.encode_chat, chat)
        except FastServeError as err:
            raise APIError(400, str(err), param="prompt", code="invalid_value") from None
    if not prompt:
        raise APIError(400, "'prompt' is no tokens at all; send some text", param="prompt", code="invalid_value")
    return _request(model, prompt, opts, stream, "prompt", app, await _constraint(body, tokenizer))


# -- answers ---------------------------------------------------------------------------------------


async def chat(request: web.Request) -> web.StreamResponse:
    return await _answer(request, chat=True)


async def generate(request: web.Request) -> web.StreamResponse:
    return await _answer(request, chat=False)


def _submit(app: web.Application, req: OllamaRequest) -> Session:
    try:
        return app[ENGINE].submit(req.prompt, Sampler(req.params, req.constraint), max_tokens=req.max_tokens,
                                  stop_ids=app[TOKENIZER].stop_ids)
    except EngineClosed:
        raise APIError(503, "the server is shutting down; try again when it is back", code="shutting_down") from None
    except QueueFull as err:
        raise _queue_full(err) from None


async def _answer(request: web.Request, *, chat: bool) -> web.StreamResponse:
    app = request.app
    start = time.monotonic_ns()
    if app[ENGINE].queue_full:  # before reading and tokenizing a body that cannot be queued
        raise _queue_full(QueueFull(f"{app[ENGINE].max_queue} requests already wait"))
    req = await (_parse_chat(request) if chat else _parse_generate(request))

    def piece(text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text} | ({"tool_calls": calls} if calls else {})
        return {"model": model, "created_at": _timestamp(),
                **({"message": message} if chat else {"response": text}), "done": False}

    model = req.model
    if not req.prompt:  # nothing to generate: ollama's answer to "load the model" (it is loaded)
        loaded = piece("") | {"done": True, "done_reason": "load"}
        if not req.stream:
            return web.json_response(loaded)
        response = await _prepare(request)
        await _write(request, response, loaded)
        await response.write_eof()
        return response
    session = _submit(app, req)
    queued = time.monotonic_ns()
    engine = app[ENGINE]
    # a format whose call markers are special tokens ([TOOL_CALLS]) needs them in the text it parses
    text = TextStream(app[TOKENIZER], req.stops,
                      skip_special=req.tools is None or not req.tools.format.special_markers)
    first: int | None = None

    def final(reason: str, whole: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        end = time.monotonic_ns()
        began = first if first is not None else end
        return piece(whole, calls) | {
            "done": True, "done_reason": reason, "total_duration": end - start, "load_duration": queued - start,
            "prompt_eval_count": len(req.prompt), "prompt_eval_duration": began - queued,
            "eval_count": session.completion_tokens, "eval_duration": end - began}

    try:
        if not req.stream:
            pieces: list[str] = []
            reason = "stop"
            async for item in _generate(engine, session, text):
                first = first or time.monotonic_ns()
                if isinstance(item, Finished):
                    reason = item.reason
                else:
                    pieces.append(item.text)
            answer = "".join(pieces)
            if req.tools is None:
                return web.json_response(final(reason, answer))
            message, _ = tool_calls.message(answer, reason, req.tools)
            content, calls = _ollama_calls(message.get("content") or "", message.get("tool_calls", []))
            return web.json_response(final(reason, content, calls))
        response = await _prepare(request)
        reader = tool_calls.CallStream(req.tools) if req.tools is not None else None
        sent = 0  # calls of reader.calls gone out

        async def send(deltas: list[dict[str, Any]]) -> None:
            nonlocal sent
            content = "".join(d.get("content", "") for d in deltas)
            if content:
                await _write(request, response, piece(content))
            for call in reader.calls[sent:]:  # each call in a piece of its own once it has ended
                sent += 1
                more, calls = _ollama_calls("", [call.openai()])
                await _write(request, response, piece(more, calls))

        try:
            async for item in _generate(engine, session, text):
                first = first or time.monotonic_ns()
                if reader is None:
                    await _write(request, response, final(item.reason) if isinstance(item, Finished)
                                 else piece(item.text))
                elif isinstance(item, Finished):
                    await send(reader.finish())
                    await _write(request, response, final(item.reason))
                else:
                    await send(reader.push(item.text))
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away: the finally cancels the session
        except APIError as err:  # after the headers: the error travels as a line, as ollama's does
            try:
                await response.write(_line({"error": err.message}))
                await response.write_eof()
            except ConnectionError:
                pass
        return response
    finally:
        engine.cancel(session)  # no-op when it finished; frees the KV when the client went away


def _ollama_calls(content: str, calls: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI's tool_calls -> ollama's ({"function": {"name", "arguments": an object}}); a call
    whose arguments are no JSON object (cut short by num_predict) stays in the content as the
    model wrote it."""
    out = []
    for call in calls:
        fn = call["function"]
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError:
            arguments = None
        if isinstance(arguments, dict):
            out.append({"function": {"name": fn["name"], "arguments": arguments}})
        else:
            content += f'{{"name": {json.dumps(fn["name"])}, "arguments": {fn["arguments"]}}}'
    return content, out


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


async def _prepare(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def _write(request: web.Request, response: web.StreamResponse, obj: dict[str, Any]) -> None:
    """write() waits while the client's window is full: one that stops reading is cut off after
    idle_timeout (as api.py's streams are), or it would hold its handler and session for ever."""
    timeout = request.app[LIMITS].idle_timeout
    try:
        async with asyncio.timeout(timeout):
            await response.write(_line(obj))
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError(f"the client read nothing for {timeout:g} s") from None
