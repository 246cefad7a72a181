"""A stranger on the LAN against a real cluster (namespaces on a bridge, real `join` and
`chat` processes): it knows everything mDNS says, not the token.

- a rogue `join` that claims our cluster id and accepts every call is never used and never
  sees a call, let alone a hidden state;
- 200 connections that send headers and never finish a handshake do not stop the cluster;
- a peer frozen with SIGSTOP mid-answer is lost within the step deadline, and the answer
  completes through a re-plan;
- goodbye packets spoofed for a real peer do not hide it from the host.

(A recorded call replayed to the same or another peer: tests/unit/test_auth.py, over loopback.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastserve_edge.cluster.auth import cluster_id
from tests.integration.test_cluster import (  # noqa: F401  (lan is a fixture)
    QUESTION, ROOMY, STORY, TOKEN, chat_argv, env, lan, one_machine, start_peer, transfers,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


class Rogue:
    """`python -m tests.rogue VERB ...` in a namespace; its JSON lines collected as they come."""

    def __init__(self, machine, home: Path, *args: str):
        self.lines: list[dict] = []
        self.proc = machine.popen([sys.executable, "-m", "tests.rogue", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env(home), cwd=REPO)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._ready.wait(60), f"the rogue did not start: {self.proc.stderr.read() if self.proc.poll() else ''}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))
            if "ready" in self.lines[-1]:
                self._ready.set()
        self._ready.set()

    @property
    def calls(self) -> list[dict]:
        return [line for line in self.lines if "call" in line]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def host_chat(model: Path, prompt: str, tokens: int, *extra: str) -> list[str]:
    return chat_argv(model, prompt, tokens, "--token", TOKEN, "--max-memory", ROOMY, *extra)


def test_a_rogue_join_that_claims_our_cluster_is_never_used(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, QUESTION, 24, tmp_path / "single")
    real = start_peer(tmp_path / "a", max_memory=ROOMY, machine=lan[0])
    rogue = Rogue(lan[1], tmp_path / "rogue", "peer", lan[1].ip, cluster_id(TOKEN))
    run = lan[2].run(host_chat(smollm2_path, QUESTION, 24, "--min-stages", "2", "--wait", "5"),
                     env=env(tmp_path / "host"), check=False, timeout=300)
    rogue.stop()
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    said = " ".join(run.stderr.split())
    assert f"not using {rogue.lines[0]['ready']}" in said and "cannot prove the cluster token" in said
    assert list(transfers(run.stderr)) == [real.address]  # the host's layers went to the real peer only
    assert rogue.calls == []  # not one call got through: no Hello, no LoadStage, no hidden state


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_two_hundred_half_open_connections_do_not_stop_the_cluster(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, STORY, 48, tmp_path / "single")
    real = start_peer(tmp_path / "a", max_memory=ROOMY, machine=lan[0])
    threads_before = _threads(real.proc.pid)
    flood = Rogue(lan[1], tmp_path / "rogue", "flood", real.address, "200", "60")
    assert flood.lines[0]["ready"] >= 190  # the peer accepted the connections ...
    time.sleep(1.0)
    threads_during = _threads(real.proc.pid)
    run = lan[2].run(host_chat(smollm2_path, STORY, 48, "--min-stages", "2", "--peers", "1", "--wait", "20"),
                     env=env(tmp_path / "host"), check=False, timeout=300)
    flood.stop()
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected  # ... and served the host all the same
    assert list(transfers(run.stderr)) == [real.address]
    assert threads_during <= threads_before + 4  # a connection without the token holds no thread


def test_a_peer_frozen_mid_answer_is_lost_within_the_deadline_and_the_answer_completes(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, STORY, 64, tmp_path / "single")
    a = start_peer(tmp_path / "a", max_memory=ROOMY, machine=lan[0])
    b = start_peer(tmp_path / "b", max_memory=ROOMY, machine=lan[1])
    argv = host_chat(smollm2_path, STORY, 64, "--min-stages", "3", "--peers", "2", "--wait", "30")
    host = lan[2].popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path / "host"))
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(host.stderr), daemon=True).start()
    out = ""
    try:
        while len(out) < 8:
            piece = host.stdout.read(1)
            if not piece:
                break
            out += piece
        os.kill(b.proc.pid, signal.SIGSTOP)  # alive, connected, silent
        frozen = time.monotonic()
        out += host.stdout.read()
        host.wait(300)
        took = time.monotonic() - frozen
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    log = "".join(err)
    assert host.returncode == 0, log
    assert "stopped answering" in log and "re-planning" in log, log
    assert out == expected
    assert took < 30, f"the answer took {took:.0f} s after the peer froze"


def test_spoofed_goodbyes_do_not_hide_a_peer(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, QUESTION, 24, tmp_path / "single")
    real = start_peer(tmp_path / "a", max_memory=ROOMY, machine=lan[0])
    node_id = (tmp_path / "a" / "config" / "node-id").read_text().strip()
    spoofer = Rogue(lan[1], tmp_path / "rogue", "goodbye", lan[1].ip, node_id, "40")
    run = lan[2].run(host_chat(smollm2_path, QUESTION, 24, "--min-stages", "2", "--wait", "4"),
                     env=env(tmp_path / "host"), check=False, timeout=300)
    spoofer.stop()
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    assert list(transfers(run.stderr)) == [real.address]  # found and used despite the goodbyes
