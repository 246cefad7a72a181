"""The cluster commands' own behaviour, without a network: the token, and join's errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

FASTSERVE = str(Path(sys.executable).parent / "fastserve")


def run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTSERVE_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("FASTSERVE_TOKEN", None)
    return subprocess.run([FASTSERVE, *args], capture_output=True, text=True, env=env, timeout=120)


def test_token_is_created_once_kept_private_and_printed_as_the_join_line(tmp_path):
    first = run(tmp_path, "token")
    assert first.returncode == 0, first.stderr
    line = first.stdout.strip()
    assert line.startswith("fastserve join --token ") and "created" in first.stderr
    again = run(tmp_path, "token")
    assert again.stdout.strip() == line and "created" not in again.stderr
    mode = stat.S_IMODE((tmp_path / "config" / "cluster-token").stat().st_mode)
    assert mode == 0o600


def test_join_without_a_token_says_where_to_get_one(tmp_path):
    r = run(tmp_path, "join", "--no-announce", "--bind", "127.0.0.1", "--port", "0")
    assert r.returncode == 1 and "fastserve token" in r.stderr and "Traceback" not in r.stderr


def test_join_refuses_a_short_or_guessable_token_and_bad_flags(tmp_path):
    short = run(tmp_path, "join", "--token", "abc", "--no-announce", "--bind", "127.0.0.1")
    assert short.returncode == 1 and "token" in short.stderr and "Traceback" not in short.stderr
    weak = run(tmp_path, "join", "--token", "x" * 24, "--no-announce", "--bind", "127.0.0.1")
    assert weak.returncode == 1 and "too easy to guess" in " ".join(weak.stderr.split())
    good = "5f0c2a9e71d84b3a96e0c4f2b18d7a65"
    port = run(tmp_path, "join", "--token", good, "--port", "70000")
    assert port.returncode == 1 and "--port" in port.stderr
    memory = run(tmp_path, "join", "--token", good, "--max-memory", "lots", "--no-announce", "--bind", "127.0.0.1")
    assert memory.returncode == 1 and "512M" in memory.stderr


def test_chat_flags_out_of_range_are_refused_before_anything_starts(tmp_path):
    r = run(tmp_path, "chat", "--min-stages", "0", "-p", "hi")
    assert r.returncode == 1 and "--min-stages" in r.stderr


def test_every_command_has_working_help(tmp_path):
    for command in ("pull", "models", "chat", "bench", "join", "status", "token", "serve"):
        r = run(tmp_path, command, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, (command, r.stderr[-500:])
