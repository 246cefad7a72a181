"""`fastserve chat --url`: the chat talking to a real `fastserve serve` process on loopback
(the real SmolLM2 model) instead of loading the model itself."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import openai
import pexpect
import pytest

from fastserve_edge.errors import FastServeError
from fastserve_edge.serving.client import RemoteChat
from tests.integration.test_serve_api import FASTSERVE, KEY, QUESTION, cli_answer, env, raw, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(smollm2_path) -> str:
    import os

    return "smollm2-135m" if not os.environ.get("FASTSERVE_TEST_SMOLLM2") else str(smollm2_path)


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, "--max-sessions", "2") as url:
        yield url


def chat_url(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FASTSERVE, "chat", *args], env=env(), capture_output=True, text=True, timeout=120,
                          check=False)


def test_answer_equals_the_servers_and_the_local_greedy_answer(model, server):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
    model_id = client.models.list().data[0].id
    expected = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=16).choices[0].message.content
    assert "Paris" in expected
    result = chat_url("--url", server, "--api-key", KEY, "-p", QUESTION, "--temperature", "0",
                      "--max-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "prompt tokens" in result.stderr and " generated · first token" in result.stderr
    assert result.stdout[:-1] == cli_answer(model, QUESTION, 16)
    # the URL as `serve` prints it (…/v1), the model named, the message on stdin
    named = subprocess.run([FASTSERVE, "chat", model_id, "--url", server + "/v1", "--temperature", "0",
                            "--max-tokens", "16"], input=QUESTION, env={**env(), "FASTSERVE_API_KEY": KEY},
                           capture_output=True, text=True, timeout=120, check=False)
    assert named.returncode == 0, named.stderr
    assert named.stdout == expected + "\n"


def test_history_reset_and_a_closed_stream_frees_the_session(server):
    chat = RemoteChat(server, api_key=KEY, temperature=0, max_tokens=4, system="Answer briefly.")
    first = "".join(chat.ask(QUESTION))
    assert chat.messages == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}]
    assert chat.last.stats.generated_tokens == 4 and chat.last.stats.prompt_tokens > 0
    assert chat.last.stats.ttft_s > 0 and chat.last.stats.stop_reason == "length"
    second = "".join(chat.ask("And of Italy?"))
    assert len(chat.messages) == 4 and chat.messages[3]["content"] == second
    chat.reset()
    assert chat.messages == []
    assert "".join(chat.ask(QUESTION)) == first  # a fresh conversation again

    long = RemoteChat(server, api_key=KEY, temperature=0, max_tokens=400)
    stream = long.ask("Write a long story about a dragon.")
    next(stream)
    stream.close()  # what Ctrl-C does
    assert long.messages[-1]["role"] == "assistant" and long.last.stats.stop_reason == "cancelled"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = json.loads(raw(server, "GET", "/health", key=None)[1])
        if health["active_sessions"] == 0:
            break
        time.sleep(0.1)
    assert health["active_sessions"] == 0


def test_a_conversation_over_the_servers_context_loses_its_oldest_turns(server):
    notices: list[str] = []
    chat = RemoteChat(server, api_key=KEY, temperature=0, max_tokens=4, notice=notices.append)
    chat.messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Yes."},
                     {"role": "user", "content": "more " * 300}, {"role": "assistant", "content": "Fine."}]
    assert "".join(chat.ask(QUESTION))
    assert chat.last.dropped_messages == 2 and "dropped the 2 oldest" in notices[0]
    assert [m["content"] for m in chat.messages[:2]] == ["more " * 300, "Fine."]
    with pytest.raises(FastServeError, match="context holds 512"):  # one message alone too long: the server's word
        "".join(RemoteChat(server, api_key=KEY).ask("word " * 600))


def test_interactive_chat_with_reset_and_ctrl_c(server):
    stats = re.compile(r"(\d+) prompt tokens.* · (\d+) generated")
    child = pexpect.spawn(FASTSERVE, ["chat", "--url", server, "--api-key", KEY, "--temperature", "0",
                                      "--max-tokens", "12"], env={**env(), "TERM": "xterm"}, encoding="utf-8",
                          timeout=60, dimensions=(50, 200))
    child.expect_exact(">>> ")

    def ask(text: str) -> int:
        child.sendline(text)
        child.expect(stats)
        prompt_tokens = int(child.match.group(1))
        child.expect_exact(">>> ")
        return prompt_tokens

    first = ask(QUESTION)
    assert ask("And of Italy?") > first  # the history went with the question
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect_exact(">>> ")
    assert ask(QUESTION) == first
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0

    long = pexpect.spawn(FASTSERVE, ["chat", "--url", server, "--api-key", KEY, "--max-tokens", "400", "--seed", "1"],
                         env={**env(), "TERM": "xterm"}, encoding="utf-8", timeout=60, dimensions=(50, 200))
    long.expect_exact(">>> ")
    request = "Write a very long story about a dragon who learns to cook."
    long.sendline(request)
    long.expect_exact(request)
    long.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
    long.sendintr()
    long.expect("stopped")
    long.expect(stats)
    assert 0 < int(long.match.group(2)) < 400
    long.expect_exact(">>> ")
    long.sendeof()
    long.expect(pexpect.EOF)


def test_server_errors_carry_the_servers_message(server):
    result = chat_url("--url", server, "--api-key", "wrong", "-p", QUESTION)
    assert result.returncode == 1
    assert "the API key is wrong" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(FastServeError, match="does not exist here"):
        "".join(RemoteChat(server, api_key=KEY, model="no-such-model").ask(QUESTION))


def test_nothing_listening_says_to_start_serve():
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = chat_url("--url", f"http://127.0.0.1:{port}", "-p", QUESTION)
    assert result.returncode == 1
    assert f"no fastserve serve answers at http://127.0.0.1:{port}" in result.stderr
    assert "start it with `fastserve serve`" in result.stderr and "Traceback" not in result.stderr


def test_flags_for_the_server_are_refused_with_url():
    result = chat_url("--url", "http://127.0.0.1:1", "-p", QUESTION, "--top-k", "5", "--ctx", "256")
    assert result.returncode == 1
    assert "--top-k, --ctx apply to the server" in result.stderr
    alone = chat_url("-p", QUESTION, "--api-key", KEY)  # a key means a server: without --url it is a mistake
    assert alone.returncode == 1 and "together with --url" in alone.stderr
