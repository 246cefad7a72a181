"""Function calling for `fastserve serve`: OpenAI's `tools` / `tool_choice` through the model's
own chat template, and the calls the model writes parsed back into `tool_calls`.

The template gets the tools as transformers passes them (`tools`: OpenAI's tool objects); a
template that never reads `tools` cannot tell the model about them, and such a request is a
400. The model writes its calls in its family's syntax, told apart by what the template
itself writes (`ToolFormat.of`):

- hermes  (Qwen 2.5/3, Hermes, most ChatML tool templates): one block per call,
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- mistral (`[TOOL_CALLS]`): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
- llama3  (Llama 3.1-3.3; also the fallback for a template that reads `tools` but writes
  no marker): the whole answer is one JSON object `{"name": ..., "parameters": {...}}`,
  possibly after `<|python_tag|>`; it counts only when the name is one of the tools.

tool_choice:
- "auto" (the default with tools): the answer is parsed; calls become `tool_calls` with
  finish_reason "tool_calls", the text around them stays `content`. Text that does not parse
  as calls stays content, as llama.cpp leaves it.
- "none": the template gets no tools and nothing is parsed.
- "required", {"type": "function", "function": {"name": N}}: a grammar (constrain.py) forces
  the format's syntax, a name among the allowed ones (N only) and arguments valid under that
  function's `parameters` schema, written compactly. Exactly one call for a named choice or
  with parallel_tool_calls false; else one or more (hermes, mistral; llama3 writes one).

Streaming: content goes out as it comes, held back only where it could begin a call marker.
A call goes out as OpenAI streams one: once its head `{"name": N, "arguments": ` is read, a
delta `{"index", "id", "type", "function": {"name", "arguments": ""}}`, then its arguments
object in fragments `{"index", "function": {"arguments": ...}}` as the model writes them (the
text of every piece since the last), up to the brace that closes it (a string-aware brace
count, not a JSON parse). Arguments written as a JSON string, keys in another order, or text
that is no call syntax are read whole at the end of the block (hermes: its `</tool_call>`,
the others: the answer's end) and sent in two deltas, as before. The arguments are the
model's own text, not re-serialised, so a streamed and a whole answer carry the same string.
Once a call's head is sent it stands: a call cut short by max_tokens keeps the arguments
written so far (finish_reason "length"), as OpenAI's do.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastserve_edge.serving import constrain
from fastserve_edge.serving.constrain import StructureError

MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function name


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes its calls."""

    name: str
    starts: tuple[str, ...]     # markers that open calls
    end: str | None             # closes one call (hermes); None: the calls run to the end of the answer
    whole_answer: bool          # the calls count only as the whole answer (llama3's bare JSON)
    arguments_key: str          # what the forced grammar writes: "arguments" or "parameters"
    special_markers: bool       # its markers are special tokens: the answer is decoded with them

    @staticmethod
    def of(template: str) -> ToolFormat:
        if "<tool_call>" in template:
            return HERMES
        if "[TOOL_CALLS]" in template:
            return MISTRAL
        return LLAMA3


HERMES = ToolFormat("hermes", ("<tool_call>",), "</tool_call>", False, "arguments", False)
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",), None, False, "arguments", True)
LLAMA3 = ToolFormat("llama3", ("<|python_tag|>", "{"), None, True, "parameters", True)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one chat request, and what the model may or must do with them."""

    tools: tuple[dict[str, Any], ...]   # OpenAI's tool objects, checked: what the template gets
    choice: str                         # "auto" | "required" | "function"
    forced_name: str | None             # the named function of choice "function"
    parallel: bool
    format: ToolFormat

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def forced(self) -> bool:
        return self.choice != "auto"


# -- request fields -------------------------------------------------------------------------------


def parse_request(body: dict[str, Any], tokenizer) -> ToolRequest | None:
    """The body's tools, tool_choice and parallel_tool_calls; None when there are no tools or
    tool_choice is "none" (then the template gets none either)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise StructureError("'tool_choice' needs 'tools': give the functions the model may call", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise StructureError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools",
                             code="invalid_type")
    if len(tools) > MAX_TOOLS:
        raise StructureError(f"'tools' has {len(tools)} entries; at most {MAX_TOOLS}", "tools")
    checked = tuple(_tool(t, i) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise StructureError("'tools' names a function twice; give every function its own name", "tools")
    forced_name = None
    if choice is None or choice == "auto":
        kind = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        kind = "required"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        kind, forced_name = "function", choice["function"].get("name")
        if forced_name not in names:
            raise StructureError(f"tool_choice names the function {forced_name!r}, which is not among 'tools' "
                                 f"({', '.join(names)})", "tool_choice")
    else:
        raise StructureError("'tool_choice' must be 'auto', 'none', 'required' or "
                             "{\"type\": \"function\", \"function\": {\"name\": NAME}}", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise StructureError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", code="invalid_type")
    if not tokenizer.template_takes_tools:
        raise StructureError("this model's chat template has no tool support (it never reads 'tools'), so the "
                             "model cannot be told about them; use a model whose template supports tools "
                             "(Qwen 2.5, Llama 3.1, Mistral, Hermes), or describe the functions in the "
                             "messages yourself", "tools", code="tools_not_supported")
    return ToolRequest(checked, kind, forced_name, parallel, ToolFormat.of(tokenizer.chat_template))


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise StructureError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", "
                             "\"description\", \"parameters\"}}}", where, code="invalid_type")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise StructureError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                             f"{where}.function.name")
    description, parameters = fn.get("description"), fn.get("parameters")
    if description is not None and not isinstance(description, str):
        raise StructureError(f"{where}.function.description must be a string", f"{where}.function.description",
                             code="invalid_type")
    if parameters is not None and not isinstance(parameters, dict):
        raise StructureError(f"{where}.function.parameters must be a JSON Schema object",
                             f"{where}.function.parameters", code="invalid_type")
    out: dict[str, Any] = {"name": name}
    if description is not None:
        out["description"] = description
    # no parameters: OpenAI's "empty parameter list", which the forced grammar then keeps empty
    out["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {},
                                                                   "additionalProperties": False}
    if isinstance(fn.get("strict"), bool):
        out["strict"] = fn["strict"]
    return {"type": "function", "function": out}


def message_fields(message: dict[str, Any], i: int) -> dict[str, Any]:
    """A message's tool fields, as chat templates read them: an assistant's `tool_calls` (their
    arguments as objects, which transformers' templates expect; OpenAI sends JSON text) and a
    tool result's `tool_call_id` and `name`."""
    out: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if message.get("role") != "assistant" or not isinstance(calls, list):
            raise StructureError(f"messages[{i}].tool_calls must be a list, on an assistant message",
                                 f"messages[{i}].tool_calls", code="invalid_type")
        out["tool_calls"] = [_history_call(c, i, j) for j, c in enumerate(calls)]
    for key in ("tool_call_id", "name"):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise StructureError(f"messages[{i}].{key} must be a string", f"messages[{i}].{key}",
                                     code="invalid_type")
            out[key] = value
    return out


def _history_call(call: Any, i: int, j: int) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{j}]"
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise StructureError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                             "\"arguments\"}}}", where, code="invalid_type")
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # kept as the text it is
    elif not isinstance(arguments, dict):
        raise StructureError(f"{where}.function.arguments must be a JSON string", f"{where}.function.arguments",
                             code="invalid_type")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


# -- the forcing grammar --------------------------------------------------------------------------


def forced_grammar(request: ToolRequest, tokenizer) -> str:
    """llguidance's grammar for the calls tool_choice forces, in the model's own syntax."""
    fmt = request.format
    allowed = [t["function"] for t in request.tools
               if request.forced_name is None or t["function"]["name"] == request.forced_name]
    calls = [{"type": "object",
              "properties": {"name": {"const": fn["name"]}, fmt.arguments_key: fn["parameters"]},
              "required": ["name", fmt.arguments_key], "additionalProperties": False} for fn in allowed]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "lenient": True}}
    call = "%json " + json.dumps(schema)
    many = request.parallel and request.forced_name is None
    if fmt is HERMES:
        open_, close = _literal("<tool_call>", tokenizer), _literal("</tool_call>", tokenizer)
        lines = [f'call: {open_} "\\n" {call} "\\n" {close}',
                 'start: call ("\\n" call)*' if many else "start: call"]
    elif fmt is MISTRAL:
        lines = [f"call: {call}",
                 f'start: {_literal("[TOOL_CALLS]", tokenizer)} "[" call ' + ('("," call)* "]"' if many else '"]"')]
    else:
        lines = [f"start: {call}"]
    return constrain.lark_grammar("\n".join(lines) + "\n", param="tool_choice")


def _literal(marker: str, tokenizer) -> str:
    """A marker in Lark: its token when the vocabulary has it as a special token (which no
    string matches), else its text."""
    token = tokenizer.token_id(marker)
    if token is not None and constrain.vocabulary(tokenizer).is_special_token(token):
        return f"<[{token}]>"
    return json.dumps(marker)


# -- the answer back into calls ---------------------------------------------------------------------


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


SEPARATORS = " \t\r\n,;[]"  # between calls: whitespace, list punctuation (mistral writes them as a JSON array)


def parse_calls(body: str, names: frozenset[str] | None = None) -> list[ToolCall] | None:
    """The calls written after a marker: JSON objects {"name", "arguments" or "parameters"}, or
    arrays of them, one after another (separated by SEPARATORS). None when the text is anything
    else, or (names given) names a function outside them."""
    decoder = json.JSONDecoder()
    out: list[ToolCall] = []
    i = 0
    while True:
        while i < len(body) and body[i] in SEPARATORS:
            i += 1
        if i == len(body):
            break
        try:
            value, i = decoder.raw_decode(body, i)
        except ValueError:
            return None
        for item in [value]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            if names is not None and item["name"] not in names:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    json.loads(arguments)
                except ValueError:
                    return None
            else:
                arguments = json.dumps(arguments, ensure_ascii=False)
            out.append(ToolCall(item["name"], arguments, _new_id()))
    return out or None


def _call_head(text: str, i: int, names: frozenset[str] | None) -> tuple[str, int] | bool | None:
    """A call's head at text[i:]: `{"name": N, "arguments": ` (or "parameters"), whitespace
    free. (N, where its arguments' value starts) when read; None while the text ends before the
    value starts and could still be one; False when it is none (or, names given, N is not
    among them). A name with escapes is left to parse_calls."""
    for expected in (("{",), ('"name"',), (":",), None, (",",), ('"arguments"', '"parameters"'), (":",)):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        rest = text[i:]
        if expected is None:  # the name: a JSON string
            if not rest:
                return None
            if rest[0] != '"':
                return False
            j = 1
            while j < len(rest) and rest[j] not in '"\\':
                j += 1
            if j == len(rest):
                return None
            if rest[j] != '"':
                return False
            name, i = rest[1:j], i + j + 1
            if names is not None and name not in names:
                return False
            continue
        word = next((w for w in expected if rest.startswith(w)), None)
        if word is None:
            return None if any(w.startswith(rest) for w in expected) else False
        i += len(word)
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return (name, i) if i < len(text) else None


class CallStream:
    """An answer's text, piece by piece -> OpenAI deltas: {"content": ...} and {"tool_calls": [...]}.

    Inside a call block the calls are read as they arrive: once a call's `{"name": N,
    "arguments": ` is read (and, for llama3, N is one of the tools), its first delta goes out,
    and then its arguments object as the model writes it, one fragment per piece, up to its
    closing brace. `calls` holds the calls read to their end (the one being read is not there)."""

    def __init__(self, request: ToolRequest):
        self.format = request.format
        self.names = request.names
        self.calls: list[ToolCall] = []
        self._held = ""         # text not yet released (could begin a marker, or the block's end marker)
        self._marker = ""       # the marker that opened the call block being read; "" outside calls
        self._spaces = ""       # whitespace-only content, released before the next content
        self._wrote = False     # non-whitespace content went out
        self._block = ""        # the block's text so far (llama3: with the "{" or "[" its marker is)
        self._at = 0            # _block[:_at] is read
        self._phase = "between"  # "between" calls | "arguments" | "after" them (their "}") | "raw": no call syntax
        self._block_calls = 0   # calls read from this block
        self._call: tuple[str, str] | None = None  # (name, id) of the call being read
        self._args_start = self._sent = self._scanned = 0  # its arguments: start, sent up to, scanned up to
        self._depth, self._in_string, self._escape = 0, False, False  # the scan of its arguments

    def push(self, text: str) -> list[dict[str, Any]]:
        self._held += text
        out: list[dict[str, Any]] = []
        while True:
            if self._marker:
                end = self.format.end
                if end is None:  # to the end of the answer
                    self._block, self._held = self._block + self._held, ""
                    self._read(out)
                    return out
                j = self._held.find(end)
                if j < 0:
                    keep = max((k for k in range(1, len(end)) if self._held.endswith(end[:k])), default=0)
                    self._block += self._held[:len(self._held) - keep]
                    self._held = self._held[len(self._held) - keep:]
                    self._read(out)
                    return out
                self._block, self._held = self._block + self._held[:j], self._held[j + len(end):]
                self._read(out)
                self._close(end, out)
                continue
            if self.format.whole_answer:
                lead = self._held.lstrip()
                if self._wrote or self.calls:
                    self._content(self._held, out)
                    self._held = ""
                    return out
                marker = next((m for m in self.format.starts if lead.startswith(m)), None)
                if marker is not None:
                    self._open(marker)
                    self._held = lead[len(marker):]
                    continue
                if lead and not any(m.startswith(lead) for m in self.format.starts):
                    self._content(self._held, out)
                    self._held = ""
                return out
            found = [(i, m) for m in self.format.starts if (i := self._held.find(m)) >= 0]
            if found:
                i, marker = min(found)
                self._content(self._held[:i], out)
                self._open(marker)
                self._held = self._held[i + len(marker):]
                continue
            keep = max((k for m in self.format.starts for k in range(1, len(m)) if self._held.endswith(m[:k])),
                       default=0)
            self._content(self._held[:len(self._held) - keep], out)
            self._held = self._held[len(self._held) - keep:]
            return out

    def finish(self) -> list[dict[str, Any]]:
        """The end of the answer: what is still held, as calls or as content."""
        out: list[dict[str, Any]] = []
        if self._marker:
            self._block, self._held = self._block + self._held, ""
            self._read(out)
            self._close("", out)
        else:
            self._content(self._held, out)
        self._held = ""
        if self._spaces and not self.calls:
            out.append({"content": self._spaces})
        self._spaces = ""
        return out

    def _open(self, marker: str) -> None:
        self._marker = marker
        self._block = marker if marker in ("{", "[") else ""  # llama3's bare "{" opens the JSON itself
        self._at, self._phase, self._block_calls = 0, "between", 0

    def _read(self, out: list[dict[str, Any]]) -> None:
        """Read the block as far as it goes: calls begun, arguments sent, calls ended."""
        text = self._block
        while True:
            if self._phase == "between":
                while self._at < len(text) and text[self._at] in SEPARATORS:
                    self._at += 1
                if self._at == len(text):
                    return
                found = _call_head(text, self._at, self.names if self.format.whole_answer else None)
                if found is None:
                    return  # could still be a call's head
                if not found or text[found[1]] != "{":  # no call syntax, or arguments as a JSON string
                    self._phase = "raw"
                    return
                name, start = found
                self._call = (name, _new_id())
                self._phase, self._args_start = "arguments", start
                self._sent = self._scanned = start
                self._depth, self._in_string, self._escape = 0, False, False
                out.append({"tool_calls": [{"index": len(self.calls), "id": self._call[1], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            if self._phase == "arguments":
                done = self._scan(text)
                self._send_arguments(text[self._sent:self._scanned], out)
                if not done:
                    return
                self._phase, self._at = "after", self._scanned
            if self._phase == "after":
                while self._at < len(text) and text[self._at] in " \t\r\n":
                    self._at += 1
                if self._at == len(text):
                    return
                self._end_call(text[self._args_start:self._scanned])
                if text[self._at] != "}":  # more keys after the arguments: the call stands as sent
                    self._phase = "raw"
                    return
                self._at += 1
                self._phase = "between"
                continue
            return  # raw: read whole at the block's end

    def _scan(self, text: str) -> bool:
        """Scan the arguments object on from _scanned; True once its closing brace is read."""
        while self._scanned < len(text):
            c = text[self._scanned]
            self._scanned += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return True
        return False

    def _send_arguments(self, fragment: str, out: list[dict[str, Any]]) -> None:
        if fragment:
            out.append({"tool_calls": [{"index": len(self.calls), "function": {"arguments": fragment}}]})
            self._sent += len(fragment)

    def _end_call(self, arguments: str) -> None:
        assert self._call is not None
        self.calls.append(ToolCall(self._call[0], arguments, self._call[1]))
        self._call = None
        self._block_calls += 1

    def _close(self, end: str, out: list[dict[str, Any]]) -> None:
        """The block ends (its end marker, or the answer's end): a call cut short ends as it is
        (its arguments as far as written: finish_reason says "length"); text that is no call
        syntax is parsed whole, and stays content when it holds no calls."""
        text, marker = self._block, self._marker
        if self._phase == "arguments":
            self._send_arguments(text[self._sent:], out)
            self._end_call(text[self._args_start:])
        elif self._phase == "after":
            self._end_call(text[self._args_start:self._scanned])
        rest = text[self._at:] if self._phase in ("between", "raw") else ""
        calls = parse_calls(rest, self.names if self.format.whole_answer else None) if rest.strip() else []
        self._marker, self._block, self._at, self._phase = "", "", 0, "between"
        if calls is None or not (calls or self._block_calls):
            if self._block_calls:
                self._content(rest, out)
            else:
                self._content((text if marker in ("{", "[") else marker + text) + end, out)
            return
        for call in calls:
            out.append({"tool_calls": [{"index": len(self.calls), "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": len(self.calls), "function": {"arguments": call.arguments}}]})
            self.calls.append(call)

    def _content(self, text: str, out: list[dict[str, Any]]) -> None:
        if not text:
            return
        if not text.strip():
            self._spaces += text
            return
        text, self._spaces = self._spaces + text, ""
        self._wrote = True
        if out and "content" in out[-1]:
            out[-1] = {"content": out[-1]["content"] + text}
        else:
            out.append({"content": text})


def message(answer: str, reason: str, request: ToolRequest) -> tuple[dict[str, Any], str]:
    """A whole answer -> the assistant message (content and tool_calls) and its finish_reason."""
    stream = CallStream(request)
    deltas = stream.push(answer) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    out: dict[str, Any] = {"role": "assistant", "content": content.strip() if stream.calls else content}
    if stream.calls:
        out["content"] = out["content"] or None
        out["tool_calls"] = [c.openai() for c in stream.calls]
        return out, ("tool_calls" if reason == "stop" else reason)
    return out, reason


def stream_reason(stream: CallStream, reason: str) -> str:
    return "tool_calls" if stream.calls and reason == "stop" else reason


def template_tools(request: ToolRequest | None) -> Sequence[dict[str, Any]] | None:
    return list(request.tools) if request is not None else None
