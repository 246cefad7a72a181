"""The HTTP contract of `fastserve serve` in one place: the limits a request must keep and
the OpenAPI 3.1 document (GET /openapi.json) that states them.

api.py validates with these same constants, and tests/integration/test_serve_hostile.py
generates requests from this document: a body the document allows must be served (or fail
only on what no schema can say: the context length, the chat template), and any other body
must get a 4xx with OpenAI's error JSON.
"""

from __future__ import annotations

from typing import Any

from fastserve_edge.serving import webui

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than a context of text, far less than a memory problem
MAX_DEPTH = 32            # JSON nesting; the deepest valid body (messages[i].content[j].text) is 5
MAX_STOP_STRINGS = 4      # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant", "tool")
TEMPERATURE = (0.0, 2.0)  # closed interval, as OpenAI's
TOP_P = (0.0, 1.0)        # (0, 1]: top_p 0 would keep no token
SEED = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_CHOICES = 8           # n: each answer is a session of its own after the shared prefill (a CPU server)
MAX_TOP_LOGPROBS = 20     # OpenAI's limit for top_logprobs (its legacy completions stop at 5)
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request
MIN_P = (0.0, 0.99)       # SamplingParams takes [0, 1); the schema subset has no exclusiveMaximum
REPEAT_PENALTY = (0.0, 10.0)  # (0, 10]: 1 is off
MAX_TOP_K = 1 << 20       # llama.cpp's top_k, bounded as the peers' wire field (uint32) and any vocabulary
MAX_REPEAT_LAST_N = 1 << 16
# fields that change the answer and are not implemented: a 400 (api._UNSUPPORTED says why)
UNSUPPORTED = ("logit_bias", "functions", "function_call", "suffix", "echo", "best_of", "presence_penalty",
               "frequency_penalty", "audio", "modalities", "reasoning_effort", "web_search_options", "n_probs",
               "mirostat", "typical_p", "dynatemp_range", "xtc_probability", "dry_multiplier")


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """null means "the default", as in OpenAI's own spec."""
    return {"anyOf": [schema, {"type": "null"}]}


def _request_schemas(model_id: str) -> dict[str, dict[str, Any]]:
    sampling = {
        "model": {"type": "string", "enum": [model_id], "description": "GET /v1/models lists it"},
        "temperature": _nullable({"type": "number", "minimum": TEMPERATURE[0], "maximum": TEMPERATURE[1]}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": TOP_P[0], "maximum": TOP_P[1]}),
        "max_tokens": _nullable({"type": "integer", "minimum": 1,
                                 "description": "cut to the room the context leaves after the prompt"}),
        "seed": _nullable({"type": "integer", "minimum": SEED[0], "maximum": SEED[1],
                           "description": "answer i of n samples with seed + i"}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_CHOICES,
                        "description": "answers sharing one prefill (the prompt's KV is copied)"}),
        "ignore_eos": _nullable({"type": "boolean", "description": "llama.cpp's: ban the end-of-generation "
                                                                   "tokens, run to max_tokens"}),
        "top_k": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_K,
                            "description": "llama.cpp's; 0 is off; default the server's [chat] top_k"}),
        "min_p": _nullable({"type": "number", "minimum": MIN_P[0], "maximum": MIN_P[1],
                            "description": "llama.cpp's; 0 is off; default the server's [chat] min_p"}),
        "repeat_penalty": _nullable({"type": "number", "exclusiveMinimum": REPEAT_PENALTY[0],
                                     "maximum": REPEAT_PENALTY[1], "description": "llama.cpp's; default 1 (off)"}),
        "repeat_last_n": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_REPEAT_LAST_N,
                                    "description": "llama.cpp's; tokens the penalty looks back over (64)"}),
        "stop": _nullable({"anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}},
        ]}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object",
                                     "properties": {"include_usage": _nullable({"type": "boolean"})}}),
    }
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {
        "type": "object", "required": ["role"],
        "properties": {
            "role": {"enum": list(ROLES), "description": "developer is read as system"},
            "content": _nullable({"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]}),
        },
    }
    logprobs_note = ("the model's log-probabilities: log-softmax of its raw logits, before temperature, "
                     "filters and bans")
    chat = {"type": "object", "required": ["model", "messages"],
            "properties": {**sampling,
                           "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
                           "logprobs": _nullable({"type": "boolean", "description": logprobs_note}),
                           "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                                                      "description": "needs logprobs: true"}),
                           "messages": {"type": "array", "minItems": 1, "items": message}},
            "x-unsupported": list(UNSUPPORTED)}
    completion = {"type": "object", "required": ["model", "prompt"],
                  "x-unsupported": list(UNSUPPORTED),
                  "properties": {**sampling,
                                 "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                                                        "description": "the top tokens besides the pick; "
                                                                       + logprobs_note}),
                                 "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                                                      {"type": "array", "minItems": 1, "maxItems": 1,
                                                       "items": {"type": "string", "minLength": 1}}]}}}
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    embedding = {"type": "object", "required": ["model", "input"],
                 "properties": {
                     "model": sampling["model"],
                     "input": {"anyOf": [{"type": "string", "minLength": 1},
                                         {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS,
                                          "items": {"type": "string", "minLength": 1}},
                                         token_ids,
                                         {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS,
                                          "items": token_ids}],
                               "description": "text, texts, or token ids; each within the context"},
                     "encoding_format": _nullable({"enum": ["float", "base64"]}),
                     "dimensions": _nullable({"type": "integer", "minimum": 1,
                                              "description": "only the model's own width"}),
                 }}
    tokenize = {"type": "object", "required": ["content"],
                "properties": {"content": {"type": "string"},
                               "add_special": _nullable({"type": "boolean", "description": "BOS, if the model "
                                                                                          "wants one"}),
                               "with_pieces": _nullable({"type": "boolean"})}}
    detokenize = {"type": "object", "properties": {"tokens": {"type": "array", "items": {"type": "integer",
                                                                                        "minimum": 0}}}}
    return {"ChatCompletionRequest": chat, "CompletionRequest": completion, "EmbeddingRequest": embedding,
            "TokenizeRequest": tokenize, "DetokenizeRequest": detokenize}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    why = {400: "invalid request (the message and param say what)", 401: "missing or wrong API key",
           404: "no such model", 408: "the body did not arrive in time", 413: "body over the limit",
           429: "the queue is full; see Retry-After", 503: "the server is shutting down"}
    return {str(s): _json("Error", why[s]) for s in statuses}


def document(model_id: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route, for the model this server serves."""
    generate = _errors(400, 401, 404, 408, 413, 429, 503)
    answer = {"description": "the answer (JSON), or Server-Sent Events with stream: true, `data: [DONE]` last",
              "content": {"application/json": {"schema": {"type": "object"}},
                          "text/event-stream": {"schema": {"type": "string"}}}}
    anything = {"type": "object"}
    bearer = [{"bearer": []}]
    paths = {
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion", "security": bearer,
            "requestBody": {"required": True, **_json("ChatCompletionRequest", "OpenAI's chat request")},
            "responses": {"200": answer, **generate}}},
        "/v1/completions": {"post": {
            "operationId": "createCompletion", "security": bearer,
            "requestBody": {"required": True, **_json("CompletionRequest", "OpenAI's completion request")},
            "responses": {"200": answer, **generate}}},
        "/v1/embeddings": {"post": {
            "operationId": "createEmbedding", "security": bearer,
            "requestBody": {"required": True, **_json("EmbeddingRequest", "OpenAI's embeddings request")},
            "responses": {"200": {"description": "mean-pooled, L2-normalised final hidden states (after the "
                                                 "final norm), one per input, with usage; 400 on a cluster "
                                                 "whose last layers run on a peer",
                                  "content": {"application/json": {"schema": anything}}},
                          **_errors(400, 401, 404, 408, 413, 503)}}},
        "/tokenize": {"post": {
            "operationId": "tokenize", "security": bearer,
            "requestBody": {"required": True, **_json("TokenizeRequest", "llama.cpp server's tokenize request")},
            "responses": {"200": {"description": "{tokens: [id]}, or [{id, piece}] with with_pieces",
                                  "content": {"application/json": {"schema": anything}}},
                          **_errors(400, 401, 408, 413)}}},
        "/detokenize": {"post": {
            "operationId": "detokenize", "security": bearer,
            "requestBody": {"required": True, **_json("DetokenizeRequest", "llama.cpp server's detokenize request")},
            "responses": {"200": {"description": "{content}: the text, special tokens written out",
                                  "content": {"application/json": {"schema": anything}}},
                          **_errors(400, 401, 408, 413)}}},
        "/v1/models": {"get": {
            "operationId": "listModels", "security": bearer,
            "responses": {"200": {"description": "the one model served",
                                  "content": {"application/json": {"schema": anything}}}, **_errors(401)}}},
        "/v1/models/{model}": {"get": {
            "operationId": "retrieveModel", "security": bearer,
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the model card",
                                  "content": {"application/json": {"schema": anything}}}, **_errors(401, 404)}}},
        "/v1/status": {"get": {
            "operationId": "status", "security": bearer,
            "responses": {"200": {"description": "sessions and stages (`fastserve status --url`)",
                                  "content": {"application/json": {"schema": anything}}}, **_errors(401)}}},
        "/health": {"get": {
            "operationId": "health", "security": [],
            "responses": {"200": {"description": "up; sessions and queue length",
                                  "content": {"application/json": {"schema": anything}}}}}},
        "/metrics": {"get": {
            "operationId": "metrics", "security": bearer,
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}, **_errors(401)}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "security": bearer,
            "responses": {"200": {"description": "this document",
                                  "content": {"application/json": {"schema": anything}}}, **_errors(401)}}},
    }
    paths |= webui.openapi_paths()
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fastserve serve", "version": "1",
                 "description": f"OpenAI-compatible API over {model_id}. Request bodies are JSON objects of at "
                              f"most {MAX_BODY_BYTES} bytes, nested at most {MAX_DEPTH} deep. Fields a schema "
                              "lists under x-unsupported change the answer and are not implemented: a 400 "
                              "names them (unless null, or their neutral value); other fields are ignored."},
        "paths": paths | _ollama_paths(),
        "components": {"schemas": {**_request_schemas(model_id), "Error": error, **_ollama_schemas(model_id)},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "the server's --api-key, if it has one"}}},
    }


# -- ollama's routes (ollama.py): the same limits, ollama's fields and error body ----------------

OLLAMA_MANAGE = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/embed", "/api/embeddings")


def _ollama_schemas(model_id: str) -> dict[str, dict[str, Any]]:
    names = [model_id, model_id if ":" in model_id.rsplit("/", 1)[-1] else f"{model_id}:latest"]
    integer = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
    options = {"type": "object", "description": "other keys: 400; load-time ones (num_gpu...) are ignored",
               "properties": {
                   "temperature": _nullable({"type": "number", "minimum": TEMPERATURE[0], "maximum": TEMPERATURE[1]}),
                   "top_k": _nullable({"type": "integer", "minimum": 0, "maximum": 2**31 - 1}),
                   "top_p": _nullable({"type": "number", "exclusiveMinimum": TOP_P[0], "maximum": TOP_P[1]}),
                   "min_p": _nullable({"type": "number", "minimum": 0, "exclusiveMaximum": 1}),
                   "repeat_penalty": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 10}),
                   "repeat_last_n": _nullable({"type": "integer", "minimum": -1, "maximum": 2**31 - 1}),
                   "seed": _nullable({"type": "integer", "minimum": SEED[0], "maximum": SEED[1],
                                      "description": "-1: random"}),
                   "num_predict": _nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1,
                                             "description": "also -1 and -2: until the context is full"}),
                   "num_ctx": _nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1,
                                         "description": "cut to the server's --ctx"}),
                   "stop": _nullable({"type": "array", "maxItems": MAX_STOP_STRINGS,
                                      "items": {"type": "string", "minLength": 1}}),
                   "num_thread": _nullable(integer), "num_gpu": _nullable(integer)}}
    common = {"model": {"enum": names, "description": "GET /api/tags lists it"},
              "stream": _nullable({"type": "boolean", "description": "default true: NDJSON"}),
              "keep_alive": _nullable({"anyOf": [{"type": "number"}, {"type": "string"}]}),
              "options": _nullable(options)}
    call = {"type": "object", "required": ["function"], "properties": {"function": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}}}}}
    message = {"type": "object", "required": ["role"],
               "properties": {"role": {"enum": list(ROLES)}, "content": _nullable({"type": "string"}),
                              "tool_calls": _nullable({"type": "array", "items": call,
                                                       "description": "an assistant's calls"}),
                              "tool_name": _nullable({"type": "string",
                                                      "description": "a tool message's function"})}}
    common["format"] = _nullable({"anyOf": [{"enum": ["", "json"]}, {"type": "object", "description": "a JSON schema"}],
                                  "description": "\"json\": one JSON object; a schema: JSON valid under it"})
    tool = {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                    "description": {"type": "string"}, "parameters": {"type": "object"}}}}}
    return {
        "OllamaChatRequest": {"type": "object", "required": ["model"], "properties": {
            **common, "messages": _nullable({"type": "array", "items": message,
                                             "description": "none: load the model (done_reason \"load\")"}),
            "tools": _nullable({"type": "array", "items": tool,
                                "description": "the model's template must take tools (else 400)"})}},
        "OllamaGenerateRequest": {"type": "object", "required": ["model"], "properties": {
            **common, "prompt": _nullable({"type": "string"}), "system": _nullable({"type": "string"}),
            "raw": _nullable({"type": "boolean", "description": "true: no template, and no system"})}},
        "OllamaShowRequest": {"type": "object", "required": ["model"], "properties": {
            "model": {"enum": names}, "verbose": _nullable({"type": "boolean"})}},
        "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    }


def _ollama_paths() -> dict[str, Any]:
    def body(schema: str, what: str) -> dict[str, Any]:
        return {"description": what,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}

    def errors(*statuses: int) -> dict[str, Any]:
        return {str(s): body("OllamaError", "ollama's error body") for s in statuses}

    bearer = [{"bearer": []}]
    answer = {"description": "NDJSON, one object per piece, done: true last; one JSON object with stream: false",
              "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                          "application/json": {"schema": {"type": "object"}}}}
    listing = {"description": "the served model", "content": {"application/json": {"schema": {"type": "object"}}}}
    generate = {"200": answer, **errors(400, 401, 404, 408, 413, 429, 503)}
    paths: dict[str, Any] = {
        "/api/chat": {"post": {"operationId": "ollamaChat", "security": bearer, "responses": generate,
                               "requestBody": {"required": True, **body("OllamaChatRequest", "ollama's chat")}}},
        "/api/generate": {"post": {"operationId": "ollamaGenerate", "security": bearer, "responses": generate,
                                   "requestBody": {"required": True,
                                                   **body("OllamaGenerateRequest", "ollama's generate")}}},
        "/api/show": {"post": {"operationId": "ollamaShow", "security": bearer,
                               "requestBody": {"required": True, **body("OllamaShowRequest", "which model")},
                               "responses": {"200": listing, **errors(400, 401, 404)}}},
        "/api/tags": {"get": {"operationId": "ollamaTags", "security": bearer,
                              "responses": {"200": listing, **errors(401)}}},
        "/api/ps": {"get": {"operationId": "ollamaPs", "security": bearer,
                            "responses": {"200": listing, **errors(401)}}},
        "/api/version": {"get": {"operationId": "ollamaVersion", "security": bearer,
                                 "responses": {"200": listing, **errors(401)}}},
        "/api/delete": {"delete": {"operationId": "ollamaDelete", "security": bearer,
                                   "responses": errors(401, 501)}},
    }
    for path in OLLAMA_MANAGE:
        name = "ollama" + path.rsplit("/", 1)[1].capitalize()
        paths[path] = {"post": {"operationId": name, "security": bearer, "responses": errors(401, 501)}}
    return paths
