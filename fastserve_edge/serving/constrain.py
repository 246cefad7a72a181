"""Structured output for `fastserve serve`: the grammar a request asks for, enforced while
decoding with llguidance (the engine llama.cpp's server uses).

What asks for one (`grammar_of` reads the request body; tool_calls.py adds the fourth):
- response_format {"type": "json_object"}: one JSON object.
- response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}: JSON
  that validates against the schema. strict: a keyword llguidance cannot enforce is a 400;
  not strict: such keywords are ignored (OpenAI's non-strict mode is best effort too).
- grammar (llama-server's and vLLM's extension): GBNF (llama.cpp's dialect) or Lark
  (llguidance's), told apart by llguidance's `any_to_lark`.
- tool_choice "required" or a named function: a grammar forcing the model's tool-call syntax.

How: one llguidance vocabulary per model, built once from the `tokenizers` JSON our Tokenizer
holds (GGUF-built or tokenizer.json alike), and one LLMatcher per session, wrapped as a
sampling.Constraint: the Sampler masks the logits with it before its chain (so top-k, top-p,
min-p and temperature see only allowed tokens), and the engine loop feeds it each token it
delivers. The stop tokens are the grammar's end: once the grammar is complete only they are
allowed. On a cluster the host samples constrained sessions itself from the logits the last
peer sends (engine/generate.py `_peer_samples`). The cost per token is bench/constrain.py's.

JSON whitespace is bounded (WHITESPACE): with llguidance's default (any run of whitespace),
a small model decoding greedily can write newlines until max_tokens.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import llguidance as llg
import numpy as np
import torch

from fastserve_edge.errors import FastServeError

WHITESPACE = r"[ \t\n\r]{0,16}"  # between JSON tokens: room to indent, never an endless run
MAX_GRAMMAR_CHARS = 64 * 1024    # a `grammar` field longer than this is refused before compiling (llama.cpp's are ~1-10 KB)


class StructureError(FastServeError):
    """A request's structured-output or tool fields are invalid: the client gets a 400 naming `param`."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


class ConstraintFailed(RuntimeError):
    """A matcher that can allow nothing more (llguidance's error state): the session ends with the reason."""


_vocabularies: weakref.WeakKeyDictionary[Any, llg.LLTokenizer] = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer) -> llg.LLTokenizer:
    """llguidance's view of a models.tokenizer.Tokenizer: every token's bytes, special tokens
    marked, the stop tokens as its EOS. Built once per tokenizer (SmolLM2's 49152 tokens:
    about 0.4 s), then shared by every session."""
    with _vocabularies_lock:
        vocab = _vocabularies.get(tokenizer)
        if vocab is None:
            try:
                vocab = llg.LLTokenizer(tokenizer.backend_json(), n_vocab=tokenizer.vocab_size,
                                        eos_token=sorted(tokenizer.stop_ids) or None)
            except (ValueError, RuntimeError) as err:
                raise StructureError(f"this model's tokenizer cannot drive a grammar ({err}); structured output "
                                     "and forced tool calls are not available with it", "response_format",
                                     code="unsupported_tokenizer") from None
            _vocabularies[tokenizer] = vocab
    return vocab


# -- the grammars a request can ask for ---------------------------------------------------------


def json_schema_grammar(schema: dict[str, Any], *, strict: bool, param: str) -> str:
    """llguidance's grammar for JSON valid under `schema` ({}: any JSON value)."""
    options = {"whitespace_pattern": WHITESPACE, "lenient": not strict}
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)  # type: ignore[arg-type]
    except ValueError as err:
        raise StructureError(f"'{param}' is not a JSON schema llguidance can read ({err})", param) from None


def lark_grammar(text: str, *, param: str) -> str:
    """llguidance's grammar for GBNF or Lark text."""
    try:
        return llg.grammar_from("grammar", text)
    except ValueError as err:
        raise StructureError(f"'{param}' is neither GBNF nor Lark ({err}); see llama.cpp's grammars/README.md "
                             "for GBNF", param) from None


def grammar_of(body: dict[str, Any]) -> tuple[str, str] | None:
    """The grammar the body's response_format or grammar field asks for, and that field's
    name (for errors); None for plain text."""
    fmt, text = body.get("response_format"), body.get("grammar")
    if text is not None:
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise StructureError("give either 'response_format' or 'grammar', not both", "grammar")
        if not isinstance(text, str) or not text.strip():
            raise StructureError("'grammar' must be a non-empty string of GBNF or Lark", "grammar",
                                 code="invalid_type")
        _check_size(len(text), "grammar")
        return lark_grammar(text, param="grammar"), "grammar"
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise StructureError("'response_format' must be an object such as {\"type\": \"json_object\"}",
                             "response_format", code="invalid_type")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, strict=True, param="response_format"), "response_format"
    if kind != "json_schema":
        raise StructureError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                             "response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise StructureError("response_format.json_schema must be an object with 'name' and 'schema'",
                             "response_format.json_schema", code="invalid_type")
    name, schema, strict = spec.get("name"), spec.get("schema", {}), spec.get("strict")
    if name is not None and not isinstance(name, str):
        raise StructureError("response_format.json_schema.name must be a string", "response_format.json_schema.name",
                             code="invalid_type")
    if not isinstance(schema, dict):
        raise StructureError("response_format.json_schema.schema must be a JSON Schema object",
                             "response_format.json_schema.schema", code="invalid_type")
    if strict is not None and not isinstance(strict, bool):
        raise StructureError("response_format.json_schema.strict must be a boolean",
                             "response_format.json_schema.strict", code="invalid_type")
    return json_schema_grammar(schema, strict=bool(strict), param="response_format.json_schema.schema"), \
        "response_format.json_schema.schema"


def _check_size(chars: int, param: str) -> None:
    if chars > MAX_GRAMMAR_CHARS:
        raise StructureError(f"'{param}' is {chars} characters, over the limit of {MAX_GRAMMAR_CHARS}", param)


# -- one session's matcher ------------------------------------------------------------------------


class GrammarMask:
    """A sampling.Constraint over one llguidance matcher: the session's place in its grammar."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size  # tokens the mask covers; logits beyond them (padding rows) are forbidden

    @classmethod
    def build(cls, tokenizer, grammar: str, *, param: str) -> GrammarMask:
        """Compile `grammar` for this tokenizer (milliseconds for a schema; run it off the event
        loop); an invalid grammar is a StructureError naming `param`."""
        vocab = vocabulary(tokenizer)
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, vocab)
        if failed:
            raise StructureError(f"the grammar of '{param}' cannot be used: {messages[0].strip()}", param)
        matcher = llg.LLMatcher(vocab, grammar, log_level=0)
        if matcher.is_error():
            raise StructureError(f"the grammar of '{param}' cannot be used: {matcher.get_error()}", param)
        return cls(matcher, vocab.vocab_size)

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens the grammar allows next."""
        if self.matcher.is_error():
            raise ConstraintFailed(f"the grammar cannot go on: {self.matcher.get_error()}")
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)  # bit i of word: token i
        allowed = torch.from_numpy(np.unpackbits(bits, count=self.vocab_size, bitorder="little").view(np.bool_))
        if not bool(allowed.any()):
            raise ConstraintFailed("the grammar allows no token here")
        return allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed()
        if logits.shape[-1] != allowed.shape[0]:  # the model's vocab rows past the tokenizer's, or fewer
            full = torch.zeros(logits.shape[-1], dtype=torch.bool)
            n = min(logits.shape[-1], allowed.shape[0])
            full[:n] = allowed[:n]
            allowed = full
        return logits.float().masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        # a token the grammar refuses leaves the matcher in its error state; the next mask() ends the session
        self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The grammar may end here (its stop tokens are allowed)."""
        return self.matcher.is_accepting()
