"""`fastserve serve` over the namespace LAN: the host in one namespace, `fastserve join` in two
others, and through it one strict JSON-schema request (the answer validated with `jsonschema`)
and one forced tool call, with the official `openai` client. A constrained session is sampled
on the host from the logits the last peer sends (engine/generate.py), so this is the path a
single machine never takes.

The model is tiny and random (a Hermes tool template on 6 layers): the grammar, not the
weights, gives the answers their shape, and --min-stages 3 spreads it over all three machines.
The client runs inside the host's namespace (nothing there is reachable from outside)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import models_fixtures as mf
from tests.integration.test_cluster import FASTSERVE, TOKEN, env, lan, start_peers
from tests.integration.test_serve_structured import HERMES_TEMPLATE, SCHEMAS, TOOLS

__all__ = ["lan"]  # the fixture, used by name
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEY = "cluster-serve-key"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                           "rain": {"type": "boolean"}},
          "required": ["city", "days", "rain"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-tools") / "hermes-tools.gguf"
    return mf.write_tiny_gguf(path, "qwen2", vocab_size=8192, n_layers=6, context_length=1024, seed=7,
                              chat_template=HERMES_TEMPLATE.strip())


def client_main(url: str) -> None:
    """Run inside the host's namespace (`python -c`): both requests; their answers as JSON on stdout."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    ask = [{"role": "user", "content": "What is the weather in Rome?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    # room for the whitespace a random model may write between JSON tokens (constrain.WHITESPACE bounds each run)
    structured = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=400,
                                                response_format=fmt)
    tool = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=60, tools=TOOLS,
                                          tool_choice="required", parallel_tool_calls=False)
    chunks = list(client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=60,
                                                 tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                                 stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    status = client.get("/status", cast_to=object)  # /v1/status: the machines serving
    print(json.dumps({
        "structured": [structured.choices[0].message.content, structured.choices[0].finish_reason],
        "calls": [[c.function.name, c.function.arguments] for c in tool.choices[0].message.tool_calls or []],
        "reason": tool.choices[0].finish_reason,
        "streamed": [deltas[0].function.name if deltas else None,
                     "".join(d.function.arguments or "" for d in deltas), len(deltas)],
        "machines": len(status.get("machines", [])),
    }))


def test_structured_output_and_a_tool_call_through_two_peers(tool_model, tmp_path, lan):
    import jsonschema

    a, b = start_peers(lan, tmp_path, "")
    argv = [FASTSERVE, "serve", str(tool_model), "--host", "127.0.0.1", "--port", "0", "--api-key", KEY,
            "--ctx", "512", "--max-sessions", "2", "--token", TOKEN, "--peers", "2", "--min-stages", "3",
            "--wait", "30"]
    server = lan[2].popen(argv, env=env(tmp_path / "host"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    line = server.stdout.readline()  # "serving NAME on http://HOST:PORT/v1"
    found = re.search(r"(http://\S+)/v1", line)
    assert found, f"no URL from serve: {line!r} {server.stderr.read() if server.poll() is not None else ''}"
    try:
        run = lan[2].run([sys.executable, "-c", f"from {__name__} import client_main; client_main({found.group(1)!r})"],
                         env=env(tmp_path / "client"), cwd=REPO, check=False, timeout=300)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert run.returncode == 0, run.stderr + err
    answer = json.loads(run.stdout.splitlines()[-1])
    content, reason = answer["structured"]
    assert reason == "stop", content
    jsonschema.validate(json.loads(content), SCHEMA)
    assert answer["reason"] == "tool_calls" and len(answer["calls"]) == 1
    (name, arguments), = answer["calls"]
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    # streamed: the same call (greedy), its arguments in fragments after the head
    assert answer["streamed"][:2] == [name, arguments] and answer["streamed"][2] > 2
    assert answer["machines"] == 3
    for peer in (a, b):
        assert "holding layers" in peer.text()
    assert "Traceback" not in err, err
