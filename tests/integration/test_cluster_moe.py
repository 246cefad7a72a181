"""A mixture-of-experts model over the namespace LAN: memory caps let it fit only across all
three machines (every expert counts as memory), and the greedy answer is one machine's."""

from __future__ import annotations

import pytest

from tests import moe_fixtures as moe
from tests.integration.test_cluster import QUESTION, env, host_argv, lan, one_machine, start_peers, transfers

__all__ = ["lan"]  # the fixture, used by name
pytestmark = pytest.mark.slow

# 6 layers of 32 experts (256 wide, 512 inner) in Q8_0: 13.4 MB a layer. 32 MiB holds two
# layers (and the embedding or the head) but not three: only all three machines hold the six.
CAP = "32M"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    folder = moe.write_hf_folder(root / "hf", "qwen3moe", seed=21, vocab_size=2048, n_layers=6, dim=256,
                                 n_experts=32, used=4, expert_ffn=512)
    return moe.write_gguf(root / "tiny-moe.gguf", folder, "qwen3moe", tensor_type="Q8_0")


def test_a_mixture_of_experts_spread_over_three_machines_answers_as_one(moe_model, tmp_path, lan):
    expected = one_machine(moe_model, QUESTION, 16, tmp_path / "single")
    a, b = start_peers(lan, tmp_path, CAP)
    run = lan[2].run(host_argv(moe_model, QUESTION, 16, min_stages=1, max_memory=CAP), env=env(tmp_path / "host"),
                     check=False, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    sent = transfers(run.stderr)
    assert len(sent) == 2 and all(fetched > 0 for _, fetched in sent.values()), run.stderr  # both peers hold layers
    for peer in (a, b):
        assert "holding layers" in peer.text()


def test_a_mixture_in_the_tensor_layout_sends_each_machine_its_experts_and_answers_as_one(moe_model, tmp_path, lan):
    """--layout tensor: every machine holds a slice of the attention and a third of the experts
    of every layer (expert parallelism); the answer is one machine's."""
    expected = one_machine(moe_model, QUESTION, 16, tmp_path / "single")
    a, b = start_peers(lan, tmp_path, "64M")
    argv = [*host_argv(moe_model, QUESTION, 16, min_stages=1, max_memory="64M"), "--layout", "tensor"]
    run = lan[2].run(argv, env=env(tmp_path / "host"), check=False, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    assert "tensor-parallel over 3 machines" in run.stderr
    sent = transfers(run.stderr)
    assert len(sent) == 2 and all(fetched > 0 for _, fetched in sent.values()), run.stderr
    for peer in (a, b):
        assert "of every layer" in peer.text()
