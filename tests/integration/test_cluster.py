"""The cluster with real processes on a real LAN: three network namespaces on a bridge,
`fastserve join` in two of them, `fastserve chat` in the third, peers found over mDNS.

Memory caps make the model fit only when spread (or `--min-stages` forces a spread), and
every answer is compared with the same model's greedy answer on one machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import netns

pytestmark = pytest.mark.slow

FASTSERVE = str(Path(sys.executable).parent / "fastserve")
TOKEN = "cluster-test-token-0123456789"
QUESTION = "What is the capital of France?"
STORY = "Write a long story about a robot who learns to paint."
# SmolLM2-135M at ctx 256 (MiB caps): the embedding/tied head is 30 MB, a layer 2.6 MB with its KV.
# 60M each: host 12 layers, last peer 12, middle peer 24 -> only all three hold the 30 layers.
TIGHT = "60M"
# 100M each: any two machines hold the model (a lost peer can be replaced by a re-plan).
ROOMY = "100M"
TRANSFER = re.compile(r"\((\d+\.\d+\.\d+\.\d+:\d+)\): (\d+) tensors from its cache, (\d+) fetched")


def env(home: Path) -> dict[str, str]:
    e = {**os.environ, "FASTSERVE_HOME": str(home), "FASTSERVE_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    e.pop("FASTSERVE_LOCAL_ONLY", None)
    return e


@dataclass
class Peer:
    proc: subprocess.Popen
    home: Path
    address: str = ""
    log: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.log)


def start_peer(home: Path, *, token: str = TOKEN, max_memory: str | None = None,
               machine: netns.Machine | None = None) -> Peer:
    argv = [FASTSERVE, "join", "--token", token, "--port", "0"]
    if machine is None:
        argv += ["--no-announce", "--bind", "127.0.0.1"]
    if max_memory:
        argv += ["--max-memory", max_memory]
    spawn = machine.popen if machine is not None else subprocess.Popen
    proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(home))
    peer = Peer(proc, home)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            peer.log.append(line)
            found = re.search(r"listening on (\S+)", line)
            if found:
                peer.address = found.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(90) and peer.address, f"peer did not start:\n{peer.text()}"
    return peer


@pytest.fixture
def lan():
    """Three machines: lan[0] and lan[1] for peers, lan[2] for the host. Torn down always."""
    netns.require_netns()
    with netns.lan(3) as machines:
        yield machines


def chat_argv(model: Path, prompt: str, max_tokens: int, *extra: str) -> list[str]:
    return [FASTSERVE, "chat", str(model), "-p", prompt, "--temperature", "0", "--max-tokens", str(max_tokens),
            "--ctx", "256", *extra]


def host_argv(model: Path, prompt: str, max_tokens: int, *, min_stages: int, max_memory: str,
              token: str = TOKEN) -> list[str]:
    """The host waits (over mDNS) for both peers of its cluster."""
    return chat_argv(model, prompt, max_tokens, "--token", token, "--min-stages", str(min_stages),
                     "--max-memory", max_memory, "--peers", "2", "--wait", "30")


_local: dict[tuple, str] = {}


def one_machine(model: Path, prompt: str, max_tokens: int, home: Path, *extra: str) -> str:
    key = (prompt, max_tokens, *extra)
    if key not in _local:
        run = subprocess.run(chat_argv(model, prompt, max_tokens, "--local-only", *extra), capture_output=True,
                             text=True, env=env(home), timeout=300)
        assert run.returncode == 0, run.stderr
        _local[key] = run.stdout
    return _local[key]


def transfers(stderr: str) -> dict[str, tuple[int, int]]:
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in TRANSFER.finditer(stderr)}


def start_peers(lan, tmp_path: Path, max_memory: str) -> tuple[Peer, Peer]:
    return (start_peer(tmp_path / "a", max_memory=max_memory, machine=lan[0]),
            start_peer(tmp_path / "b", max_memory=max_memory, machine=lan[1]))


def test_spread_over_three_machines_answers_as_one_and_reuses_peer_caches(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, QUESTION, 24, tmp_path / "single")
    a, b = start_peers(lan, tmp_path, TIGHT)
    argv = host_argv(smollm2_path, QUESTION, 24, min_stages=1, max_memory=TIGHT)

    first = lan[2].run(argv, env=env(tmp_path / "host"), check=False, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected
    assert "Paris" in first.stdout
    sent = transfers(first.stderr)
    assert len(sent) == 2 and all(fetched > 0 for _, fetched in sent.values()), first.stderr
    for p, machine in ((a, lan[0]), (b, lan[1])):
        assert "holding layers" in p.text()
        assert p.address.startswith(machine.ip + ":")  # found over mDNS on its own LAN address
        assert not list(p.home.rglob("*.gguf")), "a peer must never need the model file"

    second = lan[2].run(argv, env=env(tmp_path / "host"), check=False, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout == expected
    again = transfers(second.stderr)
    assert len(again) == 2 and all(fetched == 0 and cached > 0 for cached, fetched in again.values()), second.stderr


def run_and_kill(host_machine: netns.Machine, argv: list[str], home: Path, victim: Peer, *,
                 after_chars: int = 8) -> subprocess.CompletedProcess:
    """Start the host, kill `victim` once the answer has begun, collect everything."""
    host = host_machine.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(home))
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(host.stderr), daemon=True).start()
    out = ""
    while len(out) < after_chars:
        piece = host.stdout.read(1)
        if not piece:
            break
        out += piece
    victim.proc.kill()
    out += host.stdout.read()
    host.wait(300)
    time.sleep(0.2)
    return subprocess.CompletedProcess(argv, host.returncode, out, "".join(err))


def test_a_peer_killed_mid_answer_still_gives_the_whole_answer(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, STORY, 64, tmp_path / "single")
    a, b = start_peers(lan, tmp_path, ROOMY)
    argv = host_argv(smollm2_path, STORY, 64, min_stages=3, max_memory=ROOMY)
    run = run_and_kill(lan[2], argv, tmp_path / "host", b)
    assert run.returncode == 0, run.stderr
    assert "stopped answering" in run.stderr and "re-planning" in run.stderr
    assert run.stdout == expected


def test_when_the_rest_cannot_hold_the_model_it_says_so_and_keeps_what_was_said(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, STORY, 64, tmp_path / "single")
    a, b = start_peers(lan, tmp_path, TIGHT)
    argv = host_argv(smollm2_path, STORY, 64, min_stages=1, max_memory=TIGHT)
    run = run_and_kill(lan[2], argv, tmp_path / "host", a)
    assert run.returncode == 1
    assert "more memory is needed" in run.stderr and "conversation is kept" in run.stderr
    assert run.stdout.strip() and expected.startswith(run.stdout.rstrip("\n"))


def test_another_cluster_is_not_used_and_a_client_without_the_token_is_refused(smollm2_path, tmp_path, lan):
    stranger = start_peer(tmp_path / "a", token="some-other-cluster-token-42", machine=lan[0])
    base = chat_argv(smollm2_path, QUESTION, 8, "--token", TOKEN, "--max-memory", ROOMY)
    found = lan[2].run(base + ["--peers", "1", "--wait", "5"], env=env(tmp_path / "host"), check=False)
    assert found.returncode == 1  # mDNS shows it, but its cluster id is not ours
    assert "another cluster" in found.stderr and "only 0 of 1 peers" in found.stderr
    named = lan[2].run(base + ["--peers", "1", "--wait", "0", "--peer", stranger.address],
                       env=env(tmp_path / "host"), check=False)
    assert named.returncode == 1  # called directly: neither end can prove the other's token over TLS
    assert "cannot prove the cluster token" in named.stderr and "only 0 of 1 peers" in named.stderr
    assert "holding layers" not in stranger.text()


def test_status_lists_the_machines_on_the_lan_and_which_are_ours(tmp_path, lan):
    ours = start_peer(tmp_path / "a", machine=lan[0])
    start_peer(tmp_path / "b", token="some-other-cluster-token-42", machine=lan[1])
    home = tmp_path / "host"
    (home / "config").mkdir(parents=True)
    (home / "config" / "cluster-token").write_text(TOKEN + "\n")
    (home / "config" / "cluster-token").chmod(0o600)
    listed = lan[2].run([FASTSERVE, "status", "--json", "--wait", "4"], env=env(home), check=False)
    assert listed.returncode == 0, listed.stderr
    nodes = {n["addresses"][0]: n for n in json.loads(listed.stdout)}
    assert set(nodes) == {lan[0].ip, lan[1].ip}
    assert nodes[lan[0].ip]["in_our_cluster"] and not nodes[lan[1].ip]["in_our_cluster"]
    assert nodes[lan[0].ip]["state"] == "idle" and nodes[lan[0].ip]["memory_bytes"] > 0
    assert f"{lan[0].ip}:{nodes[lan[0].ip]['port']}" == ours.address
    table = lan[2].run([FASTSERVE, "status", "--wait", "4"], env=env(home), check=False)
    assert table.returncode == 0 and "ours" in table.stdout and "other" in table.stdout


SERVE_QUESTIONS = [STORY, "Write a long story about a cat who sails the sea.",
                   "Describe a walk through a forest in autumn.", "Explain how bread is made, step by step."]
SERVE_KEY = "serve-test-key"


def serve_through_a_peer_loss(lan, tmp_path: Path, model: Path, layout: list[str]) -> tuple[str, str, dict]:
    """`fastserve serve --peers 2 LAYOUT...` in lan[2] with peers in lan[0] and lan[1]; four
    streaming clients at once (48 tokens each); the second peer is killed once they stream.
    -> (the clients' answers as JSON, the server's log, `status --json` after them)."""
    a, b = start_peers(lan, tmp_path, ROOMY)
    host = lan[2]
    server = host.popen([FASTSERVE, "serve", str(model), "--host", "127.0.0.1", "--port", "0",
                         "--api-key", SERVE_KEY, "--ctx", "256", "--max-sessions", "4", "--token", TOKEN,
                         *layout, "--peers", "2", "--wait", "30"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path / "host"))
    err: list[str] = []
    try:
        line = server.stdout.readline()
        threading.Thread(target=lambda: err.extend(server.stderr), daemon=True).start()
        found = re.search(r"(http://\S+)/v1", line)
        assert found, f"no URL from serve: {line!r}\n{''.join(err)}"
        url = found.group(1)
        clients = host.popen([sys.executable, str(Path(__file__).with_name("stream_clients.py")), url, SERVE_KEY,
                              "48", *SERVE_QUESTIONS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(tmp_path / "host"))
        assert clients.stderr.readline().strip() == "streaming", clients.stderr.read()
        b.proc.kill()
        out, client_err = clients.communicate(timeout=300)
        assert clients.returncode == 0, client_err
        status = json.loads(host.run([FASTSERVE, "status", "--url", url, "--api-key", SERVE_KEY, "--json"],
                                     env=env(tmp_path / "host")).stdout)
    finally:
        server.terminate()
        server.wait(60)
    return out, "".join(err), status


def test_serve_over_the_cluster_survives_a_peer_killed_while_four_clients_stream(smollm2_path, tmp_path, lan):
    """`fastserve serve --token --peers 2`: four streaming clients at once; one peer is killed
    mid-answer; the server re-plans on the two machines left and every answer completes,
    equal to that question's greedy answer on one machine."""
    expected = [one_machine(smollm2_path, q, 48, tmp_path / "single", "--repeat-penalty", "1.0")
                for q in SERVE_QUESTIONS]
    out, log, status = serve_through_a_peer_loss(lan, tmp_path, smollm2_path,
                                                 ["--min-stages", "3", "--max-memory", ROOMY])
    assert "stopped answering" in log and "re-planning" in log, log
    assert json.loads(out) == [e.rstrip("\n") for e in expected]
    assert len(status["stages"]) == 2 and status["sessions"] == []  # re-planned on two machines; all ended
    # no live session holds KV; what the stages still hold is the prompt cache's (the ended answers)
    assert status["kv_tokens"] == 0 and status["prompt_cache"]["sessions"] <= 4
    assert all((stage["kv_bytes"] > 0) == (status["prompt_cache"]["kv_tokens"] > 0) for stage in status["stages"])
