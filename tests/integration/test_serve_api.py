"""`fastserve serve` as its clients see it: a real server process on loopback with the real
SmolLM2 model, driven by the official `openai` package and by raw HTTP for the error cases."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tests.conftest import TEST_HOME

pytestmark = pytest.mark.slow

FASTSERVE = str(Path(sys.executable).parent / "fastserve")
KEY = "test-key-123"
CTX = "512"          # small: a prompt over the context is cheap to send
THREADS = "1"        # server and `fastserve chat` run the same kernels; 2 cores are shared
QUESTION = "What is the capital of France?"


def env() -> dict[str, str]:
    return {**os.environ, "FASTSERVE_HOME": str(TEST_HOME), "NO_COLOR": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def model(smollm2_path) -> str:
    return "smollm2-135m" if not os.environ.get("FASTSERVE_TEST_SMOLLM2") else str(smollm2_path)


@contextmanager
def running_server(model: str, *flags: str) -> Iterator[str]:
    """`fastserve serve` on a free loopback port; yields its base URL; SIGTERM must end it cleanly."""
    proc = subprocess.Popen(
        [FASTSERVE, "serve", model, "--port", "0", "--api-key", KEY, "--ctx", CTX, "--threads", THREADS,
         *(() if "--token" in flags else ("--local-only",)), *flags],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the one line on stdout: "serving NAME on http://HOST:PORT/v1"
        match = re.search(r"(http://\S+)/v1", line)
        assert match, f"no URL from serve: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, "--max-sessions", "4") as url:
        yield url


@pytest.fixture(scope="module")
def model_id(server) -> str:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY).models.list().data[0].id


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(server: str, method: str, path: str, body: bytes | None = None, *, key: str | None = KEY,
        content_type: str = "application/json") -> tuple[int, bytes]:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def metrics(server: str) -> dict[str, float]:
    status, text = raw(server, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def cli_answer(model: str, text: str, max_tokens: int) -> str:
    result = subprocess.run(
        [FASTSERVE, "chat", model, "-p", text, "--local-only", "--temperature", "0", "--repeat-penalty", "1.0",
         "--max-tokens", str(max_tokens), "--ctx", CTX, "--threads", THREADS],
        env=env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def chat(client: openai.OpenAI, model_id: str, text: str, **kwargs):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}],
                                          temperature=0, **kwargs)


def test_models_health_and_metrics_are_served(server, client, model_id):
    assert [m.id for m in client.models.list().data] == [model_id]
    assert client.models.retrieve(model_id).id == model_id
    status, body = raw(server, "GET", "/health", key=None)  # health needs no key
    assert status == 200 and json.loads(body)["status"] == "ok"
    m = metrics(server)
    for name in ("fastserve_tokens_generated_total", "fastserve_queue_length", "fastserve_active_sessions",
                 "fastserve_time_to_first_token_seconds_count", "fastserve_time_per_output_token_seconds_count"):
        assert name in m


def test_greedy_answer_equals_fastserve_chat_streaming_or_not(model, client, model_id):
    expected = cli_answer(model, QUESTION, 40)
    assert "Paris" in expected
    whole = chat(client, model_id, QUESTION, max_tokens=40)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0

    chunks = list(chat(client, model_id, QUESTION, max_tokens=40, stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_next_turn_of_a_conversation_reuses_the_kv_of_the_last_and_answers_the_same(model, server, client,
                                                                                        model_id):
    """The prompt cache: a client sends the whole conversation every turn; the server
    prefills only what it has not seen (usage.prompt_tokens_details.cached_tokens, as OpenAI
    reports it), and the answer is the one a server with --prompt-cache 0 gives."""
    first = chat(client, model_id, "Name a large city in Japan.", max_tokens=24)
    history = [{"role": "user", "content": "Name a large city in Japan."},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And one in Italy?"}]
    before = metrics(server)
    second = client.chat.completions.create(model=model_id, messages=history, temperature=0, max_tokens=24)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens  # at least all of turn 1's prompt
    m = metrics(server)
    assert m["fastserve_prompt_tokens_cached_total"] - before["fastserve_prompt_tokens_cached_total"] == cached
    assert m["fastserve_prompt_cache_sessions"] >= 1 and m["fastserve_prompt_cache_tokens"] > 0
    with running_server(model, "--prompt-cache", "0") as url:
        plain = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        again = plain.chat.completions.create(model=model_id, messages=history, temperature=0, max_tokens=24)
        assert again.usage.prompt_tokens_details.cached_tokens == 0
        assert metrics(url)["fastserve_prompt_cache_sessions"] == 0
    assert second.choices[0].message.content == again.choices[0].message.content
    bad = subprocess.run([FASTSERVE, "serve", "--local-only", "--prompt-cache", "-1"], env=env(), capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "--prompt-cache must be at least 0" in bad.stderr, bad.stderr


def test_stop_strings_and_max_tokens(client, model_id):
    full = chat(client, model_id, QUESTION, max_tokens=40).choices[0].message.content
    cut = full.index("Paris")
    stopped = chat(client, model_id, QUESTION, max_tokens=40, stop=["Paris", "zzz"])
    assert stopped.choices[0].message.content == full[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, model_id, QUESTION, max_tokens=40,
                                                                       stop="Paris", stream=True))
    assert streamed == full[:cut]
    short = chat(client, model_id, QUESTION, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_completions_endpoint_stream_and_not(client, model_id):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=12)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.choices[0].text.strip()
    parts = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


QUESTIONS = [QUESTION, "Name a fruit that is yellow.", "What is 2 plus 2?", "Say hello in Spanish."]


async def stream_all(server: str, model_id: str, questions: list[str], max_tokens: int) -> list[str]:
    """Every question as its own streaming client, all at once (the async openai client)."""
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(q: str) -> str:
        stream = await aclient.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=max_tokens,
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        return await asyncio.gather(*(one(q) for q in questions))
    finally:
        await aclient.close()


EIGHT = QUESTIONS + ["What color is the sky?", "Name a large animal.", "What is the opposite of hot?",
                     "Count from one to five."]


def test_eight_concurrent_streams_each_get_their_single_user_answer(server, client, model_id):
    """8 clients at once against --max-sessions 4: four run, four queue, all complete."""
    alone = [chat(client, model_id, q, max_tokens=24).choices[0].message.content for q in EIGHT]
    before = metrics(server)
    assert asyncio.run(stream_all(server, model_id, EIGHT, 24)) == alone
    m = metrics(server)
    assert m["fastserve_active_sessions"] == 0 and m["fastserve_queue_length"] == 0
    # continuous batching: decode steps carried several sessions each (one forward for all)
    steps = m["fastserve_decode_steps_total"] - before["fastserve_decode_steps_total"]
    rows = m["fastserve_decode_rows_total"] - before["fastserve_decode_rows_total"]
    assert steps > 0 and rows / steps > 1.5, (steps, rows)


def test_kv_memory_bounds_the_sessions_and_the_rest_queue(model, client, model_id):
    """--kv-memory with room for about one context: four clients at once, whose prompts (~160
    tokens each) do not all fit in it, never hold more KV than that; some wait for a step
    (queue), and every answer is still its single-user answer."""
    questions = ["Please answer briefly and plainly. " * 20 + q for q in QUESTIONS]
    alone = [chat(client, model_id, q, max_tokens=24).choices[0].message.content for q in questions]
    with running_server(model, "--max-sessions", "4", "--kv-memory", "24M") as url:
        budget = metrics(url)["fastserve_kv_budget_tokens"]
        assert int(CTX) <= budget < 2 * int(CTX)  # 24 MB over 23 KB per token, halved for the caches' doubling
        answers = asyncio.run(stream_all(url, model_id, questions, 24))
        after = metrics(url)
        assert answers == alone
        # the server's own high-water mark and count of waits (sampling the gauges from here
        # saw a queue only when a request happened to arrive between two steps)
        assert 0 < after["fastserve_kv_tokens_peak"] <= budget
        assert after["fastserve_session_waits_total"] >= 1
    bad = subprocess.run([FASTSERVE, "serve", "--local-only", "--kv-memory", "0"], env=env(), capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "--kv-memory" in bad.stderr and "Traceback" not in bad.stderr
    small = subprocess.run([FASTSERVE, "serve", model, "--local-only", "--kv-memory", "1M", "--ctx", CTX], env=env(),
                           capture_output=True, text=True, timeout=120)
    assert small.returncode == 1 and "less than one context" in small.stderr, small.stderr


def test_status_shows_sessions_and_per_stage_time(server, model_id):
    """`fastserve status --url` while a stream runs: the session is listed, the stage has time."""
    sock = _send(server, {"model": model_id, "stream": True, **LONG_ASK})
    try:
        seen = b""
        while seen.count(b"data: ") < 2:
            seen += sock.recv(65536)
        result = subprocess.run([FASTSERVE, "status", "--url", server, "--api-key", KEY, "--json"], env=env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert [s["state"] for s in status["sessions"]] == ["running"]
        assert status["sessions"][0]["generated"] >= 1
        (stage,) = status["stages"]
        assert stage["machine"] == "this machine" and stage["tokens"] > 0 and stage["seconds"] > 0
        assert stage["kv_bytes"] > 0 and stage["kv_budget_bytes"] >= stage["kv_bytes"]
        table = subprocess.run([FASTSERVE, "status", "--url", server, "--api-key", KEY], env=env(),
                               capture_output=True, text=True, timeout=60)
        assert table.returncode == 0 and "tokens/s" in table.stdout and "running" in table.stdout, table.stdout
    finally:
        sock.close()
    m = metrics(server)
    assert m['fastserve_stage_seconds_total{stage="0",layers="0-30",machine="this machine"}'] > 0
    wrong = subprocess.run([FASTSERVE, "status", "--url", server, "--api-key", "wrong"], env=env(),
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "401" in wrong.stderr and "Traceback" not in wrong.stderr


def test_mlfq_with_fewer_slots_than_clients_queues_and_everyone_completes(model, client, model_id):
    """--max-sessions 2 and 4 clients: some wait (queue length > 0); whatever MLFQ preempts keeps
    its KV, and every answer is still its single-user answer. (Whether a preemption happens
    depends on the machine's speed against the 0.25 s quantum: the count is only reported.)"""
    alone = [chat(client, model_id, q, max_tokens=24).choices[0].message.content for q in QUESTIONS]
    with running_server(model, "--max-sessions", "2", "--scheduler", "mlfq") as url:
        peak_queue = 0

        async def run() -> list[str]:
            nonlocal peak_queue
            task = asyncio.ensure_future(stream_all(url, model_id, QUESTIONS, 24))
            while not task.done():
                peak_queue = max(peak_queue, (await asyncio.to_thread(metrics, url))["fastserve_queue_length"])
                await asyncio.sleep(0.01)
            return await task

        assert asyncio.run(run()) == alone
        assert peak_queue >= 1
        m = metrics(url)
        assert "fastserve_preemptions_total" in m and "fastserve_evictions_total" in m
        assert m["fastserve_active_sessions"] == 0 and m['fastserve_sessions_finished_total{reason="stop"}'] \
            + m.get('fastserve_sessions_finished_total{reason="length"}', 0) == 4

        # SIGTERM with a long stream open: the stream gets an error event and the server exits now
        sock = _send(url, {"model": model_id, "stream": True, **LONG_ASK})
        seen = b""
        while seen.count(b"data: ") < 2:
            seen += sock.recv(65536)
        stopping_at = time.monotonic()
    while chunk := sock.recv(65536):
        seen += chunk
    sock.close()
    assert time.monotonic() - stopping_at < 10
    assert b'"message": "the server is shutting down"' in seen


LONG_ASK = {"max_tokens": 400, "temperature": 0.8, "seed": 1,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}


def _send(server: str, payload: dict) -> socket.socket:
    host, port = server.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _wait_for(server: str, ok, what: str) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while not ok(m := metrics(server)):
        assert time.monotonic() < deadline, f"{what}: {m}"
        time.sleep(0.02)
    return m


def _cancelled(m: dict[str, float]) -> float:
    return m.get('fastserve_sessions_finished_total{reason="cancelled"}', 0)


def test_disconnect_mid_stream_stops_generation_and_frees_the_session(server, model_id):
    cancelled = _cancelled(metrics(server))
    sock = _send(server, {"model": model_id, "stream": True, **LONG_ASK})
    seen = b""
    while seen.count(b"data: ") < 4:
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
    assert b" 200 " in seen.split(b"\r\n", 1)[0]
    tokens_at_close = metrics(server)["fastserve_tokens_generated_total"]
    sock.close()

    m = _wait_for(server, lambda m: m["fastserve_active_sessions"] == 0 and _cancelled(m) == cancelled + 1,
                  "the session was not cancelled")
    time.sleep(0.3)
    after = metrics(server)["fastserve_tokens_generated_total"]
    assert after == m["fastserve_tokens_generated_total"]  # nothing more is generated
    assert after - tokens_at_close < 100                    # far from the 400 asked for
    assert m["fastserve_queue_length"] == 0


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_session(server, model_id):
    cancelled = _cancelled(metrics(server))
    sock = _send(server, {"model": model_id, **LONG_ASK})
    _wait_for(server, lambda m: m["fastserve_active_sessions"] == 1, "the session never started")
    sock.close()
    _wait_for(server, lambda m: m["fastserve_active_sessions"] == 0 and _cancelled(m) == cancelled + 1,
              "the session was not cancelled")


def _error(status: int, body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_error_cases_return_openai_errors_and_the_server_stays_up(server, model_id):
    chat_path = "/v1/chat/completions"

    def post(payload: dict, **kwargs) -> tuple[int, bytes]:
        return raw(server, "POST", chat_path, json.dumps(payload).encode(), **kwargs)

    ok = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (post({**ok, "model": "gpt-4"}), 404, "model_not_found"),
        (raw(server, "POST", chat_path, b'{"model": "x", "messages": ['), 400, "invalid_json"),
        (post({**ok, "temperature": "hot"}), 400, "invalid_type"),
        (post({**ok, "max_tokens": "5"}), 400, "invalid_type"),
        (post({**ok, "stream": "yes"}), 400, "invalid_type"),
        (post({**ok, "messages": "hi"}), 400, "invalid_type"),
        (post({**ok, "stop": 5}), 400, "invalid_type"),
        (post({**ok, "temperature": 3}), 400, "invalid_value"),
        (post({**ok, "top_p": 0}), 400, "invalid_value"),
        (post({**ok, "max_tokens": 0}), 400, "invalid_value"),
        (post({**ok, "messages": [{"role": "robot", "content": "hi"}]}), 400, "invalid_value"),
        (post({**ok, "messages": [{"role": "user", "content": "word " * 2000}]}), 400, "context_length_exceeded"),
        (raw(server, "POST", "/v1/completions", json.dumps({"model": model_id, "prompt": "word " * 2000}).encode()),
         400, "context_length_exceeded"),
        (post({**ok, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}), 413, "request_too_large"),
        (post(ok, key=None), 401, "invalid_api_key"),
        (post(ok, key="wrong"), 401, "invalid_api_key"),
        (raw(server, "GET", "/v1/models", key=None), 401, "invalid_api_key"),
        (raw(server, "GET", "/v1/nothing"), 404, "unknown_url"),
        (raw(server, "GET", chat_path), 405, "method_not_allowed"),
        (post({**ok, "messages": []}), 400, "invalid_value"),
        (post({**ok, "n": 9}), 400, "invalid_value"),
        (post({**ok, "seed": 2**70}), 400, "invalid_value"),
        (raw(server, "POST", "/v1/completions", json.dumps({"model": model_id, "prompt": ""}).encode()),
         400, "invalid_value"),
    ]
    for (status, body), want_status, want_code in cases:
        assert status == want_status, (want_code, body)
        assert _error(status, body)["code"] == want_code

    # the official client maps them to its exception classes
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        good.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], temperature=-1)

    assert post(ok)[0] == 200  # still serving
    m = metrics(server)
    assert m['fastserve_requests_total{endpoint="/v1/chat/completions",status="400"}'] >= 10
    assert m["fastserve_active_sessions"] == 0


# -- logprobs, n, ignore_eos, embeddings, tokenize, refused fields -------------------------------------


def _check_greedy_entry(token: str, logprob: float, top: list[tuple[str, float]], k: int) -> None:
    """One token of a greedy answer: a log-probability, the best of its k top ones."""
    assert logprob <= 0 and len(top) == k
    assert all(lp <= 0 for _, lp in top) and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert sum(math.exp(lp) for _, lp in top) <= 1 + 1e-5
    assert top[0][0] == token and top[0][1] == pytest.approx(logprob, abs=1e-6)


def test_chat_logprobs_stream_and_not(client, model_id):
    whole = chat(client, model_id, QUESTION, max_tokens=10, logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    content = choice.logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        _check_greedy_entry(entry.token, entry.logprob, [(t.token, t.logprob) for t in entry.top_logprobs], 3)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or entry.token.startswith("bytes:")
        assert all(len(t.bytes) > 0 for t in entry.top_logprobs)
    assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content
    assert chat(client, model_id, QUESTION, max_tokens=10).choices[0].logprobs is None  # only when asked

    chunks = list(chat(client, model_id, QUESTION, max_tokens=10, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-3)
    for c in chunks:  # a chunk's logprobs are those of the tokens whose text it carries
        if c.choices and c.choices[0].logprobs:
            assert "".join(e.token for e in c.choices[0].logprobs.content) == c.choices[0].delta.content

    none = chat(client, model_id, QUESTION, max_tokens=3, logprobs=True)  # no top_logprobs: the pick alone
    assert [e.top_logprobs for e in none.choices[0].logprobs.content] == [[], [], []]


def test_completion_logprobs_in_the_legacy_shape_stream_and_not(client, model_id):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=8, logprobs=2)
    choice = whole.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == len(prompt)  # counted from the prompt's start, as OpenAI's
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        _check_greedy_entry(token, logprob, sorted(top.items(), key=lambda kv: -kv[1]), 2)

    parts = list(client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=8, logprobs=2,
                                           stream=True))
    tokens = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    offsets = [o for p in parts if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def _creative(client: openai.OpenAI, model_id: str, **kwargs):
    return client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        temperature=1.0, top_p=1.0, max_tokens=12, seed=7, **kwargs)


def test_n_answers_share_one_prefill_and_a_seed_reproduces_them(server, client, model_id):
    _creative(client, model_id, n=3)  # the prompt cache now holds this prompt: every run below starts alike
    before = metrics(server)
    first = _creative(client, model_id, n=3)
    cached = metrics(server)["fastserve_prompt_tokens_cached_total"] - before["fastserve_prompt_tokens_cached_total"]
    prompt = first.usage.prompt_tokens
    assert cached >= 3 * (prompt - 1)  # the two others copied the first's prompt KV: no prefill of their own
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1, texts  # seed + i: different answers
    again = _creative(client, model_id, n=3)
    assert [c.message.content for c in again.choices] == texts
    assert again.usage.prompt_tokens == prompt  # the prompt counts once

    chunks = list(_creative(client, model_id, n=3, stream=True))
    streamed = ["", "", ""]
    finished = [None, None, None]
    for c in chunks:
        (choice,) = c.choices
        streamed[choice.index] += choice.delta.content or ""
        finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert streamed == texts and all(finished)


def test_ignore_eos_runs_past_the_end_of_the_answer_to_max_tokens(client, model_id):
    ask = "Reply with just the word yes."
    plain = chat(client, model_id, ask, max_tokens=40)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    more = chat(client, model_id, ask, max_tokens=40, extra_body={"ignore_eos": True})
    assert more.choices[0].finish_reason == "length" and more.usage.completion_tokens == 40
    assert more.choices[0].message.content.startswith(plain.choices[0].message.content)


def _unit(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def test_embeddings_are_unit_mean_pooled_hidden_states(server, client, model_id):
    cat, quarks = "The cat sat on the mat.", "Quantum chromodynamics describes how quarks bind."
    one = client.embeddings.create(model=model_id, input=cat)  # the client asks for base64 by default
    (item,) = one.data
    assert item.index == 0 and len(item.embedding) == 576  # SmolLM2-135M's width
    assert _unit(item.embedding) == pytest.approx(1.0, abs=1e-4)
    assert one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens

    batch = client.embeddings.create(model=model_id, input=[cat, quarks, cat], encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    a, b, a2 = (d.embedding for d in batch.data)
    assert a == pytest.approx(item.embedding, abs=1e-5) and a2 == pytest.approx(a, abs=1e-6)
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-2
    assert sum(x * y for x, y in zip(a, b)) < 0.999

    status, body = raw(server, "POST", "/tokenize", json.dumps({"content": cat, "add_special": True}).encode())
    ids = json.loads(body)["tokens"]
    by_ids = client.embeddings.create(model=model_id, input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(a, abs=1e-5)
    for bad in ({"model": model_id, "input": ""}, {"model": model_id, "input": [[10**9]]},
                {"model": model_id, "input": cat, "dimensions": 8}, {"model": model_id}):
        status, body = raw(server, "POST", "/v1/embeddings", json.dumps(bad).encode())
        assert status == 400, body


def test_tokenize_and_detokenize_round_trip(server):
    text = "Hello world, héllo 😀!<|im_end|>"
    status, body = raw(server, "POST", "/tokenize", json.dumps({"content": text}).encode())
    assert status == 200
    tokens = json.loads(body)["tokens"]
    assert all(isinstance(t, int) for t in tokens) and len(tokens) < len(text)
    status, body = raw(server, "POST", "/detokenize", json.dumps({"tokens": tokens}).encode())
    assert status == 200 and json.loads(body)["content"] == text
    status, body = raw(server, "POST", "/tokenize", json.dumps({"content": text, "with_pieces": True}).encode())
    pieces = json.loads(body)["tokens"]
    assert [p["id"] for p in pieces] == tokens
    assert b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                    for p in pieces).decode() == text
    assert raw(server, "POST", "/detokenize", json.dumps({"tokens": [-1]}).encode())[0] == 400
    assert raw(server, "POST", "/tokenize", json.dumps({"content": 5}).encode())[0] == 400
    assert raw(server, "POST", "/tokenize", b"{}", key=None)[0] == 401


def test_fields_that_would_change_the_answer_and_are_not_implemented_get_400(server, client, model_id):
    ok = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    done = {"model": model_id, "prompt": "Hi", "max_tokens": 1}
    refused = [("/v1/chat/completions", {**ok, "logit_bias": {"42": 5}}, "logit_bias"),
               ("/v1/chat/completions", {**ok, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
               ("/v1/chat/completions", {**ok, "presence_penalty": 0.5}, "presence_penalty"),
               ("/v1/chat/completions", {**ok, "frequency_penalty": 1}, "frequency_penalty"),
               ("/v1/chat/completions", {**ok, "modalities": ["text", "audio"]}, "modalities"),
               ("/v1/completions", {**done, "suffix": "end"}, "suffix"),
               ("/v1/completions", {**done, "echo": True}, "echo"),
               ("/v1/completions", {**done, "best_of": 3}, "best_of")]
    for path, payload, field in refused:
        status, body = raw(server, "POST", path, json.dumps(payload).encode())
        error = _error(status, body)
        assert status == 400 and error["param"] == field and error["code"] == "unsupported_parameter", body
        assert field in error["message"] and "not supported" in error["message"]
    wrong = [({**ok, "top_logprobs": 2}, "top_logprobs"),
             ({**ok, "logprobs": True, "top_logprobs": 21}, "top_logprobs")]
    for payload, field in wrong:
        status, body = raw(server, "POST", "/v1/chat/completions", json.dumps(payload).encode())
        assert status == 400 and _error(status, body)["param"] == field
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=model_id, messages=ok["messages"], logit_bias={"42": 5}, max_tokens=1)
    # what changes nothing, or is the neutral value, is served
    for path, payload in [("/v1/chat/completions", {**ok, "user": "u1", "logit_bias": {}, "presence_penalty": 0,
                                                     "metadata": {"a": "b"}, "store": False}),
                          ("/v1/completions", {**done, "echo": False, "best_of": 1, "suffix": None})]:
        status, body = raw(server, "POST", path, json.dumps(payload).encode())
        assert status == 200, body


def test_non_loopback_bind_without_api_key_is_refused():
    result = subprocess.run([FASTSERVE, "serve", "--host", "0.0.0.0", "--port", "0"], env=env(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "--api-key" in result.stderr and "--insecure" in result.stderr
    assert "serving" not in result.stdout


class _CharTokenizer:
    """Token id = one character: enough to drive TextStream without a model."""

    def stream_decoder(self, *, skip_special: bool = True):
        from fastserve_edge.models.tokenizer import StreamDecoder

        return StreamDecoder(lambda ids: "".join(map(chr, ids)))


def _released(text: str, stops: tuple[str, ...]) -> list[str]:
    from fastserve_edge.serving.api import TextStream

    stream, out = TextStream(_CharTokenizer(), stops), []
    for ch in text:
        out.append(stream.push(ord(ch)))
        if stream.stopped:
            return out
    return out + [stream.flush()]


def test_stop_strings_are_held_back_until_they_cannot_match():
    # "l" is held (it may start "lo w"), released when "ll" shows the first one cannot; "lo", "lo " held
    assert _released("say hello world", ("lo w",)) == ["s", "a", "y", " ", "h", "e", "", "l", "", "", ""]
    assert "".join(_released("a lot of lo", ("lo w",))) == "a lot of lo"  # a held tail is released at the end
    assert "".join(_released("plain", ())) == "plain"
