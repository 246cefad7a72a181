"""`fastserve serve`'s ollama routes as ollama's clients see them: a real server process on
loopback with the real SmolLM2 model, driven by the official `ollama` package (and by raw
HTTP where the client would hide the wire)."""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pydantic
import pytest

from tests import models_fixtures as mf

from tests.integration.test_serve_api import KEY, QUESTION, model, raw, running_server  # noqa: F401 (model: a fixture)

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": QUESTION}]
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, "--max-sessions", "2") as url:
        yield url


@pytest.fixture(scope="module")
def name(server) -> str:
    models = ollama.Client(host=server, headers={"Authorization": f"Bearer {KEY}"}).list().models
    assert len(models) == 1
    return models[0].model


@pytest.fixture
def client(server) -> ollama.Client:
    return ollama.Client(host=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def post(server: str, path: str, body: dict) -> tuple[int, dict]:
    status, data = raw(server, "POST", path, json.dumps(body).encode())
    return status, json.loads(data)


def test_chat_streaming_or_not_gives_one_answer_with_ollama_fields(client, name):
    whole = client.chat(model=name, messages=MESSAGES, options=GREEDY)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.model == name
    assert whole.message.role == "assistant" and "Paris" in whole.message.content
    assert whole.prompt_eval_count > 0 and 0 < whole.eval_count <= 24
    for ns in (whole.total_duration, whole.prompt_eval_duration, whole.eval_duration):
        assert isinstance(ns, int) and 0 <= ns <= whole.total_duration
    assert whole.created_at.endswith("Z")

    parts = list(client.chat(model=name, messages=MESSAGES, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason == whole.done_reason and parts[-1].eval_count == whole.eval_count


def test_generate_streaming_or_not_with_system_and_raw(client, name):
    whole = client.generate(model=name, prompt=QUESTION, options=GREEDY)
    assert whole.done and "Paris" in whole.response and whole.eval_count > 0
    parts = list(client.generate(model=name, prompt=QUESTION, options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    # generate is one user turn of /api/chat, system prompt included
    system = "You answer in one word."
    framed = client.generate(model=name, prompt=QUESTION, system=system, options=GREEDY)
    chat = client.chat(model=name, messages=[{"role": "system", "content": system}, *MESSAGES], options=GREEDY)
    assert framed.response == chat.message.content
    plain = client.generate(model=name, prompt="The three primary colors are", raw=True,
                            options={"temperature": 0, "num_predict": 8})
    assert plain.eval_count == 8 and plain.done_reason == "length" and plain.response.strip()
    loaded = client.generate(model=name)  # no prompt: ollama's "load the model"
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_options_seed_num_predict_and_stop(client, name):
    sampled = {"temperature": 0.9, "seed": 1234, "num_predict": 16}
    first = client.generate(model=name, prompt="Tell me a story.", options=sampled).response
    assert client.generate(model=name, prompt="Tell me a story.", options=sampled).response == first
    short = client.chat(model=name, messages=MESSAGES, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    full = client.chat(model=name, messages=MESSAGES, options=GREEDY).message.content
    cut = full.index("Paris")
    stopped = client.chat(model=name, messages=MESSAGES, options=GREEDY | {"stop": ["Paris"]})
    assert stopped.message.content == full[:cut] and stopped.done_reason == "stop"
    streamed = client.chat(model=name, messages=MESSAGES, options=GREEDY | {"stop": ["Paris"]}, stream=True)
    assert "".join(p.message.content for p in streamed) == full[:cut]
    # num_ctx above the server's --ctx is cut to it; load-time options are accepted and ignored
    same = client.chat(model=name, messages=MESSAGES, options=GREEDY | {"num_ctx": 8192, "num_gpu": 0})
    assert same.message.content == full


def test_greedy_chat_equals_the_openai_route(server, client, name):
    ours = client.chat(model=name, messages=MESSAGES, options=GREEDY).message.content
    oai = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
    model_id = oai.models.list().data[0].id
    theirs = oai.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=24)
    assert ours == theirs.choices[0].message.content
    assert name == model_id + ":latest"
    assert client.chat(model=model_id, messages=MESSAGES, options=GREEDY).message.content == ours  # untagged too


def test_tags_show_ps_version(server, client, name, smollm2_path, smollm2_source):
    [listed] = client.list().models
    assert listed.size == smollm2_path.stat().st_size and len(listed.digest) == 64
    assert listed.modified_at.timestamp() == pytest.approx(smollm2_path.stat().st_mtime, abs=1e-3)
    d = listed.details
    assert (d.format, d.family, d.quantization_level) == ("gguf", "llama", smollm2_source.quantization)
    assert d.parameter_size == f"{smollm2_source.n_params / 1e6:.2f}M"  # ollama's spelling, e.g. "134.52M"
    shown = client.show(name)
    assert shown.details == d and shown.capabilities == ["completion"]
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.block_count"] == 30
    assert "im_start" in shown.template and "num_ctx 512" in shown.parameters
    [running] = client.ps().models
    assert running.model == name and running.context_length == 512
    status, body = raw(server, "GET", "/api/version")
    assert status == 200 and body and json.loads(body)["version"].count(".") == 2


def test_errors_in_ollama_shape(server, client, name):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope:latest", messages=MESSAGES)
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=name, messages=MESSAGES, options={"temperature": "hot"})
    assert err.value.status_code == 400 and "options.temperature" in err.value.error
    unauthorized = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as err:
        unauthorized.list()
    assert err.value.status_code == 401
    bad = [({"model": name, "messages": MESSAGES, "options": {"top_k": 1.5}}, "options.top_k"),
           ({"model": name, "messages": MESSAGES, "options": {"num_predict": True}}, "options.num_predict"),
           ({"model": name, "messages": MESSAGES, "options": {"stop": [1]}}, "options.stop"),
           ({"model": name, "messages": MESSAGES, "options": {"warp_drive": 1}}, "warp_drive"),
           ({"model": name, "messages": MESSAGES, "options": {"mirostat": 2}}, "mirostat"),
           ({"model": name, "messages": MESSAGES, "options": []}, "options"),
           ({"model": name, "messages": MESSAGES, "format": "yaml"}, "'format' must be \"json\" or a JSON schema"),
           ({"model": name, "messages": MESSAGES, "format": {"type": "strin"}}, "'format' cannot be used: Invalid type: strin"),
           ({"model": name, "messages": MESSAGES, "format": 3}, "'format' must be"),
           ({"model": name, "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0]"),
           ({"model": name, "prompt": "hi", "tools": [WEATHER]}, "tools are /api/chat's"),
           ({"model": name, "messages": "hi"}, "messages"),
           ({"model": name, "messages": MESSAGES, "stream": "yes"}, "stream"),
           ({"messages": MESSAGES}, "model"),
           ({"model": name, "prompt": "hi", "template": "{{ .Prompt }}"}, "template"),
           ({"model": name, "prompt": "hi", "context": [1, 2]}, "context"),
           ({"model": name, "prompt": "hi", "raw": True, "system": "s"}, "system")]
    for body, what in bad:
        status, answer = post(server, "/api/generate" if "prompt" in body else "/api/chat", body)
        assert status == 400 and set(answer) == {"error"} and what in answer["error"], (body, answer)
    status, answer = post(server, "/api/chat", {"model": name, "messages": [{"role": "user", "content": "x " * 600}],
                                                "stream": False})
    assert status == 400 and "context" in answer["error"]
    status, answer = raw(server, "POST", "/api/chat", b"{not json")
    assert status == 400 and "error" in json.loads(answer)
    status, answer = raw(server, "POST", "/api/chat", b"[" * 100 + b"]" * 100)
    assert status == 400 and isinstance(json.loads(answer)["error"], str)
    status, answer = raw(server, "POST", "/api/pull", b'{"model": "llama3"}')
    assert status == 501 and "fastserve pull" in json.loads(answer)["error"]


class City(pydantic.BaseModel):
    """ollama's documented way: format=Model.model_json_schema() (no other keys: the model is small)."""
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population_millions: float


def test_format_json_and_a_schema_constrain_the_answer_streaming_or_not(client, name):
    whole = client.chat(model=name, messages=[{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}],
                        format="json", options={"temperature": 0, "num_predict": 160})
    assert whole.done_reason == "stop" and isinstance(json.loads(whole.message.content), dict)
    schema = City.model_json_schema()
    asked = [{"role": "user", "content": "Name the capital of France."}]
    answer = client.chat(model=name, messages=asked, format=schema, options={"temperature": 0, "num_predict": 120})
    jsonschema.validate(json.loads(answer.message.content), schema)
    City.model_validate_json(answer.message.content)
    parts = list(client.chat(model=name, messages=asked, format=schema, stream=True,
                             options={"temperature": 0, "num_predict": 120}))
    streamed = "".join(p.message.content for p in parts)
    City.model_validate_json(streamed)
    assert parts[-1].done
    # from here on each answer takes the previous one's KV over (the prompt cache), as the
    # stream did: the same arithmetic, so the same text (a whole prefill may differ in last bits)
    again = client.chat(model=name, messages=asked, format=schema, options={"temperature": 0, "num_predict": 120})
    assert again.message.content == streamed
    generated = client.generate(model=name, prompt="Name the capital of France.", format=schema,
                                options={"temperature": 0, "num_predict": 120})
    assert generated.response == streamed  # generate is one user turn of chat


def test_tools_on_a_template_without_tool_support_are_a_400(client, name):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=name, messages=MESSAGES, tools=[WEATHER])
    assert err.value.status_code == 400 and "no tool support" in err.value.error
    assert client.chat(model=name, messages=MESSAGES, tools=[], options={"num_predict": 2}).done  # none: fine


# -- tools: the app in this process, a Hermes tool template, a model that answers with calls -------

# Qwen 2.5's tool template, shortened (test_serve_structured's)
from tests.integration.test_serve_structured import HERMES_TEMPLATE, TIME, WEATHER  # noqa: E402

CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
         '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')


@pytest.fixture(scope="module")
def hermes(tmp_path_factory):
    """A tiny model with Hermes' tool template, scripted to answer CALLS (its weights could not)."""
    from fastserve_edge.models import open_model
    from tests.integration import test_serve_hostile as hostile

    path = tmp_path_factory.mktemp("tools") / "hermes-tools.gguf"
    mf.write_tiny_gguf(path, "qwen2", vocab_size=8192, context_length=1024, seed=7,
                       chat_template=HERMES_TEMPLATE.strip())
    source = open_model(path)
    tokenizer = source.tokenizer()
    pipeline = hostile.ScriptedPipeline(source.config, tokenizer.encode(CALLS), tokenizer.eos_id)
    with hostile.in_thread(pipeline, tokenizer, max_sessions=2) as (host, port):
        yield ollama.Client(host=f"http://{host}:{port}", headers={"Authorization": f"Bearer {hostile.KEY}"}, timeout=60), \
            tokenizer, hostile.MODEL


def test_tool_calls_come_back_in_ollamas_shape(hermes):
    client, _, model_name = hermes
    ask = {"model": model_name, "messages": [{"role": "user", "content": "Weather in Rome, and the time?"}],
           "tools": [WEATHER, TIME], "options": {"temperature": 0}}
    whole = client.chat(**ask)
    assert whole.message.content == "Let me check." and whole.done_reason == "stop"
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
        [("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"tz": "CET"})]
    # streaming: the content as it comes, each call in a piece of its own once it has ended
    parts = list(client.chat(**ask, stream=True))
    assert "".join(p.message.content for p in parts).strip() == "Let me check."
    with_calls = [p for p in parts if p.message.tool_calls]
    assert [len(p.message.tool_calls) for p in with_calls] == [1, 1] and not any(p.done for p in with_calls)
    assert [c.function for p in with_calls for c in p.message.tool_calls] == [c.function for c in whole.message.tool_calls]
    assert parts[-1].done and parts[-1].done_reason == "stop"
    # on the wire: arguments are an object, not JSON text
    shown = client.show(model_name)
    assert "tools" in shown.capabilities


def test_tools_and_tool_results_are_rendered_through_the_template(hermes):
    client, tokenizer, model_name = hermes
    history = [{"role": "user", "content": "Weather in Oslo for 2 days?"},
               {"role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]},
               {"role": "tool", "content": "rain, 4 C", "tool_name": "get_weather"}]
    answer = client.chat(model=model_name, messages=history, tools=[WEATHER], options={"num_predict": 1})
    # the same conversation in OpenAI's shape, through the same template: the same prompt
    openai_history = [history[0],
                      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                          "name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]},
                      {"role": "tool", "content": "rain, 4 C", "name": "get_weather"}]
    # the client sends the tool as its Tool model keeps it (it drops keywords it does not model, e.g. minimum)
    sent = ollama.Tool.model_validate(WEATHER).model_dump(exclude_none=True, by_alias=True)
    expected = tokenizer.encode_chat(openai_history, tools=[sent])
    assert answer.prompt_eval_count == len(expected)
    prompt = tokenizer.decode(expected, skip_special=False)
    assert '"arguments": {"city": "Oslo", "days": 2}' in prompt and "<tool_response>\nrain, 4 C" in prompt
    assert '"description": "The weather in a city over the next days"' in prompt  # the tool reached the template
    without = client.chat(model=model_name, messages=history[:1], options={"num_predict": 1})
    assert without.prompt_eval_count < answer.prompt_eval_count


# -- hostile bodies: the app in this process over a scripted model (test_serve_hostile's) ---------


@pytest.fixture(scope="module")
def scripted(smollm2_source):
    from tests.integration import test_serve_hostile as hostile

    tokenizer = smollm2_source.tokenizer()
    pipeline = hostile.ScriptedPipeline(smollm2_source.config, tokenizer.encode(" Paris, of course."),
                                        tokenizer.eos_id)
    with hostile.in_thread(pipeline, tokenizer, max_sessions=4) as address:
        yield address


@pytest.mark.parametrize("path,schema", [("/api/chat", "OllamaChatRequest"), ("/api/generate", "OllamaGenerateRequest"),
                                         ("/api/show", "OllamaShowRequest")])
def test_ollama_routes_never_5xx_on_any_body(scripted, path, schema):
    """Bodies from openapi.py's schemas and mutations of them: an answer, or a 4xx in ollama's shape."""
    from hypothesis import given

    from fastserve_edge.serving.openapi import document
    from tests.integration import test_serve_hostile as hostile

    @hostile.PROPERTY
    @given(hostile.bodies(schema, document(hostile.MODEL)))
    def property(case):
        body, _ = case
        status, headers, answer = hostile.request(scripted, "POST", path, body)
        assert status < 500, answer
        if status >= 400:
            error = json.loads(answer)
            assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"], error
        elif headers.get("Content-Type", "").startswith("application/x-ndjson"):
            lines = [json.loads(line) for line in answer.splitlines()]
            assert all("error" not in x for x in lines) and [x["done"] for x in lines][-1] is True, lines
        else:
            json.loads(answer)

    property()
    hostile.assert_served(scripted)
