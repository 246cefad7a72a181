"""Structured output and function calling in `fastserve serve`, through the official `openai`
client: response_format (json_object, json_schema), a GBNF `grammar`, and tools with
tool_choice required / named on a tiny random-weight model whose chat template speaks Hermes
tool calls (the grammar forces the shape, so the weights need not know it)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests import models_fixtures as mf
from tests.integration.test_serve_api import KEY, raw, running_server

pytestmark = pytest.mark.slow

# Qwen 2.5's tool template, shortened: tools in the system turn, calls as <tool_call> blocks,
# tool results as <tool_response> in a user turn
HERMES_TEMPLATE = """
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call functions. Their signatures are within <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each call, return <tool_call>\\n{"name": <name>, "arguments": <args>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for call in message.tool_calls | default([]) %}
{{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' + (call.function.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- elif message.role != 'system' %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city over the next days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["tz"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


# -- SmolLM2 (its template has no tools) --------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with running_server(str(smollm2_path), "--max-sessions", "2") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        yield url, client, client.models.list().data[0].id


def ask(client, model_id, text, **kwargs):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}],
                                          temperature=0, **kwargs)


def test_json_object_answer_parses(smol):
    _, client, model_id = smol
    answer = ask(client, model_id, "Describe a cat as a JSON object with its name and age.", max_tokens=160,
                 response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_json_schema_strict_answer_validates(smol):
    _, client, model_id = smol
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    answer = ask(client, model_id, "Name the capital of France.", max_tokens=120, response_format=fmt)
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    chunks = list(ask(client, model_id, "Name the capital of France.", max_tokens=120, response_format=fmt,
                      stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    # the stream took the first answer's KV over (the prompt cache: the same model, not always the
    # same last bits as a whole prefill); an answer that takes the stream's over is its arithmetic
    again = ask(client, model_id, "Name the capital of France.", max_tokens=120, response_format=fmt)
    assert text == again.choices[0].message.content


def test_gbnf_grammar_forces_one_of_its_options_and_a_bad_one_is_a_400(smol):
    url, client, model_id = smol
    for question in ("Is Paris in France?", "Is the sun cold?", "Write a poem about the sea."):
        answer = ask(client, model_id, question, max_tokens=8, extra_body={"grammar": 'root ::= "yes" | "no"'})
        assert answer.choices[0].message.content in ("yes", "no")
        assert answer.choices[0].finish_reason == "stop"
    lark = ask(client, model_id, "Pick a number.", max_tokens=8, extra_body={"grammar": 'start: /[0-9]{2}/'})
    assert len(lark.choices[0].message.content) == 2 and lark.choices[0].message.content.isdigit()
    for bad, param in ([{"grammar": "root ::= missing"}, "grammar"],
                       [{"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
                        "response_format.json_schema.schema"],
                       [{"response_format": {"type": "yaml"}}, "response_format.type"]):
        body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], **bad}
        status, out = raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and json.loads(out)["error"]["param"] == param, out


def test_a_template_without_tools_gets_a_400_and_tool_messages_are_accepted(smol):
    _, client, model_id = smol
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, model_id, "What is the weather in Paris?", tools=TOOLS, max_tokens=8)
    assert "no tool support" in str(err.value) and err.value.body["param"] == "tools"
    history = [{"role": "user", "content": "What time is it in UTC?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    answer = client.chat.completions.create(model=model_id, messages=history, temperature=0, max_tokens=8)
    assert answer.choices[0].message.content


# -- a tiny model whose template speaks Hermes tool calls ----------------------------------------


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "hermes-tools.gguf"
    mf.write_tiny_gguf(path, "qwen2", vocab_size=8192, context_length=1024, seed=7,
                       chat_template=HERMES_TEMPLATE.strip())
    with running_server(str(path), "--max-sessions", "2") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        yield client, client.models.list().data[0].id


def _check_call(name: str, arguments: str, allowed=SCHEMAS) -> None:
    assert name in allowed
    jsonschema.validate(json.loads(arguments), allowed[name])


def test_tool_choice_required_returns_a_valid_call_streaming_or_not(tool_model):
    client, model_id = tool_model
    answer = ask(client, model_id, "What is the weather in Rome?", tools=TOOLS, tool_choice="required",
                 parallel_tool_calls=False, max_tokens=120)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    _check_call(call.function.name, call.function.arguments)

    chunks = list(ask(client, model_id, "What is the weather in Rome?", tools=TOOLS, tool_choice="required",
                      parallel_tool_calls=False, max_tokens=120, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.arguments == "" and {d.index for d in deltas} == {0}
    # as OpenAI streams them: the arguments in several fragments, as the model writes them
    assert len(deltas) > 3 and all(d.id is None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert deltas[0].function.name == call.function.name and arguments == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()

    # the official client's stream helper puts the fragments back together into the same call
    with client.chat.completions.stream(model=model_id, messages=[{"role": "user", "content": "What is the weather "
                                                                  "in Rome?"}], temperature=0, tools=TOOLS,
                                        tool_choice="required", parallel_tool_calls=False, max_tokens=120) as events:
        fragments = [e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"]
        final = events.get_final_completion()
    assert fragments == [d.function.arguments for d in deltas]  # the head's "" too
    assert "".join(fragments) == call.function.arguments
    (joined,) = final.choices[0].message.tool_calls
    assert (joined.id.startswith("call_"), joined.function.name, joined.function.arguments) == \
        (True, call.function.name, call.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_named_tool_choice_calls_that_function(tool_model):
    client, model_id = tool_model
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        reply = ask(client, model_id, "Hello there", tools=TOOLS, tool_choice=named, max_tokens=120, stream=stream)
        if stream:
            deltas = [d for c in reply if c.choices for d in (c.choices[0].delta.tool_calls or [])]
            name, arguments = deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas)
        else:
            (call,) = reply.choices[0].message.tool_calls
            name, arguments = call.function.name, call.function.arguments
        assert name == "get_time"
        _check_call(name, arguments)


def test_tool_results_in_the_history_are_rendered_and_answered(tool_model):
    client, model_id = tool_model
    history = [{"role": "user", "content": "Weather in Oslo for 2 days?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_9", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_9", "content": "rain, 4 C"}]
    answer = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=4)
    assert answer.choices[0].message.tool_calls is None and answer.usage.prompt_tokens > 20
    forced = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, temperature=0,
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    _check_call(forced.choices[0].message.tool_calls[0].function.name,
                forced.choices[0].message.tool_calls[0].function.arguments)
