"""The tensor-parallel layout with real processes on the namespace LAN: `fastserve join` in
two namespaces, `fastserve chat --layout tensor` in a third. Every machine holds a slice of
every layer, fetched once from the host (a warm start sends nothing), and the answer is one
machine's; a peer killed mid-answer costs a re-plan and the answer goes on."""

from __future__ import annotations

import pytest

import json

from tests.integration.test_cluster import (  # noqa: F401 - lan: the three-machine LAN fixture
    QUESTION, ROOMY, SERVE_QUESTIONS, STORY, TOKEN, chat_argv, env, lan, one_machine, run_and_kill,
    serve_through_a_peer_loss, start_peers, transfers,
)

pytestmark = pytest.mark.slow


def tensor_argv(model, prompt, max_tokens, *extra):
    return chat_argv(model, prompt, max_tokens, "--token", TOKEN, "--layout", "tensor",
                     "--peers", "2", "--wait", "30", *extra)


def test_a_tensor_parallel_group_of_three_answers_as_one_machine_and_reuses_its_slices(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, QUESTION, 24, tmp_path / "single")
    a, b = start_peers(lan, tmp_path, ROOMY)
    argv = tensor_argv(smollm2_path, QUESTION, 24)
    first = lan[2].run(argv, env=env(tmp_path / "host"), check=False, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "tensor-parallel over 3 machines" in first.stderr
    assert first.stdout == expected
    sent = transfers(first.stderr)
    assert len(sent) == 2 and all(fetched > 0 for _, fetched in sent.values()), first.stderr
    for p in (a, b):
        assert "of every layer" in p.text(), p.text()
        assert not list(p.home.rglob("*.gguf")), "a peer must never need the model file"
    second = lan[2].run(argv, env=env(tmp_path / "host"), check=False, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout == expected
    again = transfers(second.stderr)
    assert len(again) == 2 and all(fetched == 0 and cached > 0 for cached, fetched in again.values()), second.stderr


def test_a_peer_killed_mid_answer_in_the_tensor_layout_still_gives_the_whole_answer(smollm2_path, tmp_path, lan):
    expected = one_machine(smollm2_path, STORY, 64, tmp_path / "single")
    a, b = start_peers(lan, tmp_path, ROOMY)
    run = run_and_kill(lan[2], tensor_argv(smollm2_path, STORY, 64), tmp_path / "host", b)
    assert run.returncode == 0, run.stderr
    assert "data path failed" in run.stderr and "re-planning" in run.stderr, run.stderr
    assert run.stdout == expected


def test_serve_over_a_tensor_parallel_group_streams_four_answers_through_a_peer_loss(smollm2_path, tmp_path, lan):
    """`fastserve serve --layout tensor`: four streaming clients at once share each step of the
    group (batched decode); one peer is killed mid-answer; the server re-plans with the two
    machines left and every answer completes, equal to one machine's greedy answer."""
    expected = [one_machine(smollm2_path, q, 48, tmp_path / "single", "--repeat-penalty", "1.0")
                for q in SERVE_QUESTIONS]
    out, log, _ = serve_through_a_peer_loss(lan, tmp_path, smollm2_path, ["--layout", "tensor"])
    assert "tensor-parallel over 3 machines" in log and "re-planning" in log, log
    assert json.loads(out) == [e.rstrip("\n") for e in expected]
