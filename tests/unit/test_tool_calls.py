"""Tool calls parsed back from the three syntaxes models write (serving/tool_calls.py), whole
and streamed piece by piece; and where a constrained session is sampled (engine/generate.py)."""

from __future__ import annotations

import json

import pytest
import torch

from fastserve_edge.engine.generate import DecodeStep, Pipeline
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.serving import tool_calls as tc
from fastserve_edge.serving.constrain import StructureError

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(fmt: tc.ToolFormat, choice: str = "auto") -> tc.ToolRequest:
    return tc.ToolRequest((WEATHER, tc._tool(TIME, 1)), choice, None, True, fmt)


def streamed(text: str, req: tc.ToolRequest, size: int) -> tuple[str, list[tuple[str, str]], tc.CallStream]:
    """Push `text` in pieces of `size` characters; -> (content, [(name, arguments)], stream)."""
    stream = tc.CallStream(req)
    deltas = []
    for i in range(0, len(text), size):
        deltas += stream.push(text[i:i + size])
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            if "id" in call:
                assert call["type"] == "function" and call["id"].startswith("call_")
                calls[call["index"]] = [call["function"]["name"], ""]
            calls[call["index"]][1] += call["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)], stream


CASES = [
    # (format, answer, content, calls)
    (tc.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    (tc.HERMES, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me look.",
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    (tc.HERMES, "Just text, with a < sign and <tool_ in it.", "Just text, with a < sign and <tool_ in it.", []),
    (tc.HERMES, "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    (tc.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    (tc.LLAMA3, '<|python_tag|>{"name": "get_time", "parameters": {}}', "", [("get_time", {})]),
    (tc.LLAMA3, '{"answer": 42}', '{"answer": 42}', []),  # JSON that is no call of these tools stays content
    (tc.LLAMA3, '{"name": "rm_rf", "parameters": {}}', '{"name": "rm_rf", "parameters": {}}', []),
    (tc.LLAMA3, 'It is {"name": "get_time"}', 'It is {"name": "get_time"}', []),  # only as the whole answer
    (tc.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}}, '
                 '{"name": "get_time", "arguments": {}}]', "",
     [("get_weather", {"city": "Lima"}), ("get_time", {})]),
    (tc.MISTRAL, 'Sure. [TOOL_CALLS][{"name": "get_time", "arguments": "{}"}]', "Sure. ", [("get_time", {})]),
]


@pytest.mark.parametrize("fmt, answer, content, calls", CASES)
def test_each_format_parses_whole_and_in_pieces(fmt, answer, content, calls):
    req = request(fmt)
    message, reason = tc.message(answer, "stop", req)
    assert reason == ("tool_calls" if calls else "stop")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])] \
        == calls
    assert (message["content"] or "") == (content.strip() if calls else content)
    for size in (1, 3, 7, len(answer)):
        text, got, stream = streamed(answer, req, size)
        assert [(name, json.loads(args)) for name, args in got] == calls
        assert text.strip() == content.strip()
        assert tc.stream_reason(stream, "stop") == reason
        assert tc.stream_reason(stream, "length") == "length"


def _argument_fragments(deltas: list[dict]) -> list[str]:
    return [call["function"]["arguments"] for d in deltas for call in d.get("tool_calls", []) if "id" not in call]


@pytest.mark.parametrize("fmt, answer", [
    (tc.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome \\"}{\\" [x]", "n": [1, {"a": 2}]}}'
                '\n</tool_call>'),
    (tc.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}}, '
                 '{"name": "get_time", "arguments": {}}]'),
    (tc.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
])
def test_arguments_stream_in_fragments_as_they_are_written(fmt, answer):
    """OpenAI's shape: the head with arguments "", then the arguments in pieces, as they come;
    the pieces are the model's text, and add up to the call a whole answer gives."""
    stream = tc.CallStream(request(fmt))
    deltas, heads_at = [], []
    for i, c in enumerate(answer):
        got = stream.push(c)
        heads_at += [i for d in got for call in d.get("tool_calls", []) if "id" in call]
        deltas += got
    deltas += stream.finish()
    whole, _ = tc.message(answer, "stop", request(fmt))
    n = len(whole["tool_calls"])
    fragments = _argument_fragments(deltas)
    assert len(fragments) > 2 * n  # not one piece per call
    assert all(len(f) == 1 for f in fragments)  # one character pushed, one character out
    first = answer.index('"arguments"' if fmt is not tc.LLAMA3 else '"parameters"')
    assert heads_at[0] < answer.index("}")  # the head went out before the arguments ended
    assert heads_at[0] > first
    by_index: dict[int, str] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            by_index[call["index"]] = by_index.get(call["index"], "") + call["function"]["arguments"]
    assert [by_index[i] for i in range(n)] == [c["function"]["arguments"] for c in whole["tool_calls"]]
    assert [c.arguments for c in stream.calls] == [by_index[i] for i in range(n)]
    assert not "".join(d.get("content", "") for d in deltas).strip()


def test_a_call_cut_short_keeps_what_was_written_and_stream_calls_hold_only_ended_calls():
    stream = tc.CallStream(request(tc.HERMES))
    deltas = stream.push('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert _argument_fragments(deltas) == ['{"city": "Pa'] and stream.calls == []
    deltas = stream.finish()
    assert _argument_fragments(deltas) == [] and [c.arguments for c in stream.calls] == ['{"city": "Pa']
    assert tc.stream_reason(stream, "length") == "length"
    # a head that turns out to be no call's is content, as a whole answer's would be
    text, calls, _ = streamed('<tool_call>\n{"name": "get_weather" "x"}\n</tool_call>', request(tc.HERMES), 1)
    assert calls == [] and text == '<tool_call>\n{"name": "get_weather" "x"}\n</tool_call>'


def test_the_format_comes_from_the_template():
    assert tc.ToolFormat.of("{% for t in tools %}<tool_call>{% endfor %}") is tc.HERMES
    assert tc.ToolFormat.of("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS] [TOOL_CALLS]") is tc.MISTRAL
    assert tc.ToolFormat.of("{{ tools }} <|python_tag|>") is tc.LLAMA3


class _Template:
    template_takes_tools = True
    chat_template = "{{ tools }}<tool_call>"


@pytest.mark.parametrize("body, param", [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_tool_fields_name_their_parameter(body, param):
    with pytest.raises(StructureError) as err:
        tc.parse_request(body, _Template())
    assert err.value.param == param


def test_a_template_without_tools_refuses_them_and_none_needs_no_support():
    class Plain(_Template):
        template_takes_tools = False

    with pytest.raises(StructureError, match="no tool support") as err:
        tc.parse_request({"tools": [WEATHER]}, Plain())
    assert err.value.code == "tools_not_supported"
    assert tc.parse_request({"tools": [WEATHER], "tool_choice": "none"}, Plain()) is None
    req = tc.parse_request({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                           _Template())
    assert req.forced and req.forced_name == "get_weather" and req.format is tc.HERMES


def test_history_tool_calls_reach_the_template_with_object_arguments():
    fields = tc.message_fields({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]}, 1)
    assert fields["tool_calls"] == [{"id": "call_1", "type": "function",
                                     "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]
    assert tc.message_fields({"role": "tool", "content": "12:00", "tool_call_id": "call_1"}, 2) == \
        {"tool_call_id": "call_1"}
    with pytest.raises(StructureError):
        tc.message_fields({"role": "user", "tool_calls": []}, 0)


# -- where a constrained session samples ---------------------------------------------------------


class _OnlyAllow:
    """A Constraint allowing one token."""

    def __init__(self, token: int):
        self.token, self.accepted = token, []

    def mask(self, logits):
        out = torch.full_like(logits, float("-inf"))
        out[self.token] = logits[self.token]
        return out

    def accept(self, token):
        self.accepted.append(token)


class _PeerLast:
    """A last stage that can sample by itself, as a peer's RemoteStage: it answers a sampling
    step with token 1 and a logits step with logits that favour token 0."""

    start, end = 0, 1

    def __init__(self):
        self.sampled = self.forwarded = 0

    def forward(self, session, x, pos, *, all_logits=False):
        self.forwarded += 1
        return torch.tensor([[5.0, 1.0, 0.0, 0.0]])

    def forward_sample(self, session, x, pos, sampler, context):
        self.sampled += 1
        return 1

    def drop(self, session):
        pass


def test_a_constrained_session_samples_on_the_host_from_the_last_peers_logits():
    last = _PeerLast()
    pipe = Pipeline(config=None, stages=[last], ctx=64)  # type: ignore[arg-type]
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    assert pipe.next_token("a", [3], 0, Sampler(greedy), [3]) == 1 and last.sampled == 1
    held = Sampler(greedy, _OnlyAllow(2))
    assert pipe.next_token("b", [3], 0, held, [3]) == 2 and last.forwarded == 1
    steps = [DecodeStep("a", 1, 1, Sampler(greedy), [3, 1]), DecodeStep("b", 2, 1, held, [3, 2])]
    assert pipe.next_tokens(steps) == [1, 2]
    held.accept(2)
    assert held.constraint.accepted == [2]
