"""`fastserve serve` against clients that try to crash or exhaust it (issue 21).

Most tests run the real app (api.create_app) through the real listener (api.serving, what
`fastserve serve` runs) in a thread of this process, on loopback, with the real SmolLM2
tokenizer and chat template and a scripted Pipeline stand-in that answers a few tokens at
once: hostile bodies reach the real validation and tokenizer, and valid ones finish in
milliseconds. The TLS test runs the real `fastserve serve` with the real model.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fastserve_edge.serving import webui
from fastserve_edge.serving.api import Limits, ServeConfig, create_app, serving, tls_context
from fastserve_edge.serving.openapi import MAX_DEPTH, document
from tests.integration.test_serve_api import FASTSERVE, env

pytestmark = pytest.mark.slow

KEY = "hostile-test-key"
MODEL = "smollm2-test"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


class ScriptedPipeline:
    """The calls EngineLoop makes of a Pipeline: every session answers `reply`, then EOS.
    With `gate` cleared, a step waits in the worker as a slow model's would."""

    stages: list = []
    meters: list = []

    def __init__(self, config, reply: list[int], eos: int, ctx: int = 2048):
        self.config, self.ctx = config, ctx
        self.reply = reply + [eos]
        self.answered: dict[str, int] = {}  # session -> tokens given
        self.gate = threading.Event()
        self.gate.set()

    def _next(self, session: str) -> int:
        assert self.gate.wait(60), "the test never opened the gate"
        n = self.answered.get(session, 0)
        self.answered[session] = n + 1
        return self.reply[min(n, len(self.reply) - 1)]

    def next_token(self, session, ids, pos, sampler, context) -> int:
        return self._next(session)

    def first_tokens(self, prefills) -> list[int]:
        return [self._next(p.session) for p in prefills]

    def next_tokens(self, steps) -> list[int]:
        return [self._next(s.session) for s in steps]

    def drop(self, session: str) -> None:
        self.answered.pop(session, None)

    def fork(self, source: str, copies) -> bool:
        return False  # no KV to copy: n answers each prefill

    holds_head = False  # no hidden states: /v1/embeddings answers 400


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    return smollm2_source.tokenizer()


@pytest.fixture
def pipeline(smollm2_source, tokenizer) -> ScriptedPipeline:
    return ScriptedPipeline(smollm2_source.config, tokenizer.encode(" Paris, of course."), tokenizer.eos_id)


@contextmanager
def in_thread(pipeline, tokenizer, *, limits: Limits = Limits(), max_sessions: int = 2,
              ssl_context: ssl.SSLContext | None = None) -> Iterator[tuple[str, int]]:
    """api.serving() on 127.0.0.1 in its own thread and event loop; yields (host, port)."""
    ready, box = threading.Event(), {}

    async def main() -> None:
        app = create_app(pipeline, tokenizer, ServeConfig(MODEL, api_key=KEY), max_sessions=max_sessions,
                         prompt_cache=0, limits=limits)
        stop = asyncio.Event()
        box["stop"] = (asyncio.get_running_loop(), stop)
        async with serving(app, "127.0.0.1", 0, ssl_context=ssl_context) as address:
            box["address"] = address
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as err:  # noqa: BLE001 (re-raised in the test's thread)
            box["error"] = err
            ready.set()

    thread = threading.Thread(target=run, name="serve-under-test", daemon=True)
    thread.start()
    assert ready.wait(30)
    if "error" in box:
        raise box["error"]
    try:
        yield box["address"]
    finally:
        pipeline.gate.set()
        loop, stop = box["stop"]
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        if "error" in box:
            raise box["error"]


def request(address, method: str, path: str, body: bytes | None = None, *, key: str | None = KEY,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post(address, path: str, payload, **kwargs) -> tuple[int, dict[str, str], bytes]:
    return request(address, "POST", path, json.dumps(payload).encode(), **kwargs)


def error_of(status: int, body: bytes) -> dict:
    """OpenAI's error body, checked for shape."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def assert_served(address) -> None:
    status, _, body = request(address, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


# -- slow and silent connections ------------------------------------------------------------------


def test_slowloris_connections_are_cut_and_a_normal_request_is_answered_meanwhile(pipeline, tokenizer):
    limits = Limits(idle_timeout=1.0, max_connections=64)
    with in_thread(pipeline, tokenizer, limits=limits) as address:
        opened = time.monotonic()
        trickling = [socket.create_connection(address) for _ in range(12)]
        silent = [socket.create_connection(address) for _ in range(12)]
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        cut_after: dict[socket.socket, float] = {}
        for s in silent:
            s.settimeout(5)

        answered_at = None
        i = 0
        while len(cut_after) < len(trickling) and time.monotonic() - opened < 6:
            for s in trickling:  # one byte each, every 50 ms: a head that never ends
                if s in cut_after:
                    continue
                try:
                    s.send(head[i:i + 1])
                except OSError:  # reset or broken pipe: the server closed it
                    cut_after[s] = time.monotonic() - opened
            i += 1
            if answered_at is None and i == 4:  # all of them open: a real client still gets in
                assert_served(address)
                status, _, _ = post(address, CHAT, OK_CHAT)
                assert status == 200
                answered_at = time.monotonic() - opened
            time.sleep(0.05)
        for s in silent:
            try:
                assert s.recv(1024) == b""  # closed without a word
            except ConnectionResetError:
                pass
            cut_after[s] = time.monotonic() - opened
        for s in trickling + silent:
            s.close()

    assert answered_at is not None and answered_at < limits.idle_timeout
    assert len(cut_after) == len(trickling) + len(silent)
    assert max(cut_after.values()) < limits.idle_timeout + 2.0, sorted(cut_after.values())


def test_a_body_that_trickles_gets_408_in_bounded_time(pipeline, tokenizer):
    with in_thread(pipeline, tokenizer, limits=Limits(idle_timeout=1.0)) as address:
        s = socket.create_connection(address, timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: 5000\r\n\r\n".encode())
        started, seen = time.monotonic(), b""
        s.setblocking(False)
        while b"\r\n\r\n" not in seen or not seen.rstrip().endswith(b"}"):
            assert time.monotonic() - started < 4, seen
            s.send(b" ")
            time.sleep(0.05)
            try:
                seen += s.recv(65536)
            except BlockingIOError:
                pass
        s.close()
        head, _, body = seen.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert error_of(408, body)["code"] == "request_timeout"
        assert_served(address)


def test_connections_past_the_cap_get_503_and_room_comes_back(pipeline, tokenizer):
    with in_thread(pipeline, tokenizer, limits=Limits(max_connections=4, idle_timeout=30)) as address:
        held = [socket.create_connection(address) for _ in range(4)]
        time.sleep(0.2)
        status, headers, body = request(address, "GET", "/health")
        assert status == 503 and headers["Retry-After"].isdigit()
        assert error_of(status, body)["code"] == "too_many_connections"
        for s in held:
            s.close()
        deadline = time.monotonic() + 5
        while (status := request(address, "GET", "/health")[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200


# -- the queue ---------------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after_and_serves_again_after(pipeline, tokenizer):
    pipeline.gate.clear()  # the first step waits: one session runs, the rest queue
    with in_thread(pipeline, tokenizer, limits=Limits(max_queue=2), max_sessions=1) as address, \
            ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(post, address, CHAT, OK_CHAT) for _ in range(3)]  # 1 runs + 2 queue
        deadline = time.monotonic() + 10
        while json.loads(request(address, "GET", "/health")[2])["queue_length"] < 2:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.02)

        status, headers, body = post(address, CHAT, OK_CHAT)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert error_of(status, body)["code"] == "rate_limit_exceeded"
        status, _, _ = post(address, COMPLETIONS, {"model": MODEL, "prompt": "The sky is"})
        assert status == 429
        client = openai.OpenAI(base_url=f"http://{address[0]}:{address[1]}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])

        pipeline.gate.set()
        assert [f.result(timeout=30)[0] for f in waiting] == [200, 200, 200]
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == " Paris, of course."


def test_max_queue_and_the_other_limits_are_checked_before_a_model_loads():
    from cli.main import app

    for flags, what in [(["--max-queue", "-1"], "--max-queue"), (["--max-connections", "0"], "--max-connections"),
                        (["--idle-timeout", "0"], "--idle-timeout")]:
        result = CliRunner().invoke(app, ["serve", "no-such-model", "--local-only", *flags])
        assert result.exit_code == 1 and what in result.output, result.output


# -- hostile bodies -----------------------------------------------------------------------------


def test_deep_nesting_and_malformed_bodies_get_400_not_500(pipeline, tokenizer):
    deep = MAX_DEPTH + 8
    cases = [
        b"[" * 100_000,
        b'{"model": "x", "messages": ' + b"[" * 100_000,
        b"{" + b'"a":{' * 100_000,
        json.dumps({**OK_CHAT, "messages": [{"role": "user", "content": json.loads("[" * deep + "]" * deep)}]}).encode(),
        json.dumps({**OK_CHAT, "temperature": float("nan")}).encode(),
        json.dumps({**OK_CHAT, "max_tokens": float("inf")}).encode(),
        b'{"model": "' + MODEL.encode() + b'", "max_tokens": ' + b"9" * 5000 + b', "messages": []}',
        b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "' + MODEL.encode() + b'", "prompt": "\\udfff and more"}',
        b"\xff\xfe not utf-8",
        b"", b"[]", b'"text"', b"1", b"null", b"true",
        json.dumps({**OK_CHAT, "stream_options": 0}).encode(),
        json.dumps({**OK_CHAT, "stream_options": []}).encode(),
    ]
    with in_thread(pipeline, tokenizer) as address:
        for body in cases:
            for path in (CHAT, COMPLETIONS):
                status, _, answer = request(address, "POST", path, body)
                assert status == 400, (body[:80], path, answer)
                error_of(status, answer)
        status, _, answer = request(address, "POST", CHAT, b"[" * 100_000)
        assert "nests" in error_of(status, answer)["message"]
        assert_served(address)


# -- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_describes_every_route_the_server_has(pipeline, tokenizer):
    with in_thread(pipeline, tokenizer) as address:
        status, _, body = request(address, "GET", "/openapi.json")
        assert status == 200
        spec = json.loads(body)
        assert request(address, "GET", "/openapi.json", key=None)[0] == 401
    assert spec["openapi"].startswith("3.1") and spec == document(MODEL)
    app = create_app(pipeline, tokenizer, ServeConfig(MODEL))
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.method != "HEAD"}
    described = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert routes == described


# -- property-based: every route, bodies from the schema and outside it ---------------------------


def from_schema(schema: dict, spec: dict) -> st.SearchStrategy:
    """Values valid under the (small) JSON Schema subset openapi.py uses."""
    if "$ref" in schema:
        return from_schema(spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], spec)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, spec) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema["type"]
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), allow_nan=False, allow_infinity=False,
                         exclude_min="exclusiveMinimum" in schema)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if kind == "array":
        return st.lists(from_schema(schema["items"], spec), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    assert kind == "object", schema
    properties = schema.get("properties", {})
    required = {k: from_schema(properties[k], spec) for k in schema.get("required", ())}
    optional = {k: from_schema(v, spec) for k, v in properties.items() if k not in required}
    extra = st.dictionaries(st.text(max_size=8).map(lambda k: "x_" + k), json_values(), max_size=2)
    return st.tuples(st.fixed_dictionaries(required, optional=optional), extra).map(lambda t: {**t[1], **t[0]})


def json_values() -> st.SearchStrategy:
    leaves = (st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
              | st.sampled_from(["", "\u0000", "é" * 30, "\U0001f600", "<|im_end|>", "{{ 7*7 }}", MODEL]))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def bodies(schema_name: str, spec: dict) -> st.SearchStrategy:
    """-> (raw body, valid under the schema?)"""
    valid = from_schema({"$ref": f"#/components/schemas/{schema_name}"}, spec)
    fields = list(spec["components"]["schemas"][schema_name]["properties"])

    def change(body: dict, name: str, value, drop: bool) -> dict:
        body = dict(body)
        if drop:
            body.pop(name, None)
        else:
            body[name] = value
        return body

    mutated = st.builds(change, valid, st.sampled_from(fields), json_values(), st.booleans())
    return st.one_of(
        valid.map(lambda b: (json.dumps(b).encode(), True)),
        mutated.map(lambda b: (json.dumps(b).encode(), False)),
        json_values().map(lambda v: (json.dumps(v).encode(), False)),
        st.binary(max_size=64).map(lambda b: (b, False)),
    )


PROPERTY = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def check_answer(status: int, headers: dict[str, str], body: bytes, valid: bool) -> None:
    assert status < 500, body
    if status >= 400:
        error = error_of(status, body)
        # what no schema can say: the chat template refuses the conversation, the prompt is too long
        assert not valid or error["code"] in ("invalid_value", "context_length_exceeded"), error
    elif headers.get("Content-Type", "").startswith("text/event-stream"):
        assert body.rstrip().endswith(b"data: [DONE]"), body
    else:
        assert json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def shared_server(smollm2_source, tokenizer):
    pipeline = ScriptedPipeline(smollm2_source.config, tokenizer.encode(" Paris, of course."), tokenizer.eos_id)
    with in_thread(pipeline, tokenizer, max_sessions=4) as address:
        yield address


@pytest.mark.parametrize("path,schema", [(CHAT, "ChatCompletionRequest"), (COMPLETIONS, "CompletionRequest")])
def test_generation_routes_never_5xx_on_any_body(shared_server, path, schema):
    spec = document(MODEL)

    @PROPERTY
    @given(bodies(schema, spec))
    def property(case):
        raw, valid = case
        status, headers, body = request(shared_server, "POST", path, raw)
        check_answer(status, headers, body, valid)

    property()
    assert_served(shared_server)


PATHS = ["/v1/models", "/health", "/metrics", "/v1/status", "/openapi.json"]


def test_every_other_route_never_5xx_on_any_path_method_key_or_body(shared_server):
    segment = st.text(max_size=30).map(lambda s: urllib.parse.quote(s, safe="-._~%/"))  # stray '%'s included

    @PROPERTY
    @given(st.one_of(st.sampled_from(PATHS), segment.map(lambda s: f"/v1/models/{s}"), st.just(f"/v1/models/{MODEL}"),
                     segment.map(lambda s: f"/{s}")),
           st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
           st.sampled_from([KEY, None, "wrong", ""]),
           st.one_of(st.none(), json_values().map(lambda v: json.dumps(v).encode())))
    def property(path, method, key, raw):
        status, headers, body = request(shared_server, method, path, raw, key=key)
        assert status < 500, (path, method, body)
        if status >= 400:
            error_of(status, body)
        elif path == "/metrics":
            assert b"fastserve_requests_total" in body
        elif path in webui.FILES:  # the web page's own files (no key: they hold no data)
            assert headers["Content-Type"] == webui.FILES[path][1]
        else:
            json.loads(body)
        if key != KEY and path != "/health" and method == "GET" and path in PATHS:
            assert status == 401

    property()
    assert_served(shared_server)


# -- TLS --------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), as a CA of its own."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastserve test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_serve_over_tls_answers_the_openai_client_and_refuses_plain_http(tmp_path, model):
    cert, key = self_signed(tmp_path)
    proc = subprocess.Popen([FASTSERVE, "serve", model, "--port", "0", "--api-key", KEY, "--ctx", "512",
                             "--threads", "1", "--local-only", "--tls-cert", str(cert), "--tls-key", str(key)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"https://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(match.group(1))
        trusting = ssl.create_default_context(cafile=str(cert))
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=trusting))
        model_id = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                                temperature=0, max_tokens=3)
        assert answer.usage.completion_tokens >= 1

        with pytest.raises((http.client.HTTPException, ConnectionError)):
            request(("127.0.0.1", port), "GET", "/health")  # plain HTTP to the TLS port
        untrusting = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.APIConnectionError):  # a client without the CA refuses the server
            untrusting.models.list()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def model(smollm2_path) -> str:
    return str(smollm2_path)


def test_tls_context_is_tls12_at_least_and_bad_files_say_what_to_do(tmp_path):
    cert, key = self_signed(tmp_path)
    assert tls_context(cert, key).minimum_version == ssl.TLSVersion.TLSv1_2
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    from cli.main import app

    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)], "no such file"),
        (["--tls-cert", str(other_cert), "--tls-key", str(key)], "does not belong to the certificate"),
        (["--tls-cert", str(junk), "--tls-key", str(key)], "PEM"),
        (["--tls-cert", str(cert)], "--tls-key"),
        # TLS does not lift the API key requirement off a non-loopback address
        (["--tls-cert", str(cert), "--tls-key", str(key), "--host", "0.0.0.0"], "--api-key"),
    ]
    for flags, what in cases:
        result = CliRunner().invoke(app, ["serve", "no-such-model", "--local-only", "--port", "0", *flags])
        assert result.exit_code == 1 and what in result.output, (flags, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_a_stream_nobody_reads_is_cut_off_and_its_session_cancelled(smollm2_source, tokenizer):
    """A client that asks for a long stream and never reads: once the socket buffers are full,
    the server's writes wait; after idle_timeout it drops the connection and the session."""
    long = ScriptedPipeline(smollm2_source.config, tokenizer.encode(" word" * 30_000), tokenizer.eos_id,
                            ctx=32_768)
    with in_thread(long, tokenizer, limits=Limits(idle_timeout=1.0)) as address:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        s.connect(address)
        body = json.dumps({**OK_CHAT, "stream": True, "max_tokens": 30_000}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        started = time.monotonic()

        def finished() -> dict[str, float]:
            text = request(address, "GET", "/metrics")[2].decode()
            return {m[1]: float(m[2]) for m in re.finditer(r'fastserve_sessions_finished_total\{reason="(\w+)"\} (\S+)',
                                                           text)}

        while not finished():
            assert time.monotonic() - started < 30, "the session never ended"
            time.sleep(0.1)
        assert finished() == {"cancelled": 1.0}
        assert long.answered == {}  # its KV was dropped
        s.close()
        assert_served(address)
