import pytest
import torch

from fastserve_edge.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_repeat_penalty,
    filter_logits,
)
from fastserve_edge.errors import ConfigError


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))(logits) == 1


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # pure: input untouched


def test_repeat_penalty_changes_greedy_choice():
    logits = torch.tensor([3.0, 2.0])
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0))
    assert sampler(logits, history=[0]) == 1
    assert sampler(logits, history=[]) == 0


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0, min_p=0.0))
    assert kept.tolist() == [False, True, False, True]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(filter_logits(probs.log(), top_k=0, top_p=0.8, min_p=0.0))
    assert kept.tolist() == [True, True, False, False]


def test_min_p_drops_tokens_far_below_the_best():
    probs = torch.tensor([0.6, 0.3, 0.08, 0.02])
    kept = torch.isfinite(filter_logits(probs.log(), top_k=0, top_p=1.0, min_p=0.1))
    assert kept.tolist() == [True, True, True, False]


def test_filters_always_keep_the_best_token():
    logits = torch.tensor([10.0, -10.0, -10.0])
    kept = torch.isfinite(filter_logits(logits, top_k=1, top_p=0.01, min_p=0.99))
    assert kept.tolist() == [True, False, False]


def test_same_seed_same_draws_different_seed_differs():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=7)
    a, b = Sampler(params), Sampler(params)
    draws_a = [a(logits) for _ in range(20)]
    assert draws_a == [b(logits) for _ in range(20)]
    c = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=8))
    assert draws_a != [c(logits) for _ in range(20)]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, 0.0, -1e9])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=1))
    draws = [s(logits) for _ in range(400)]
    assert 2 not in draws
    assert 150 < draws.count(0) < 250


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.0), dict(repeat_penalty=0)],
)
def test_out_of_range_parameters_are_clear_errors(kwargs):
    with pytest.raises(ConfigError, match="must be"):
        SamplingParams(**kwargs)


def test_logprobs_are_the_models_log_softmax_and_the_pick_is_the_best_under_greedy():
    from fastserve_edge.engine.sampling import token_logprobs

    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0), logprobs=2)
    assert sampler(logits) == 1 and sampler.host_only
    expected = torch.log_softmax(logits, -1)
    assert sampler.last.token == 1 and sampler.last.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in sampler.last.top] == [1, 2]
    assert [lp for _, lp in sampler.last.top] == pytest.approx([float(expected[1]), float(expected[2])])
    hot = Sampler(SamplingParams(temperature=1.5, top_k=1, repeat_penalty=1.0), logprobs=0)
    hot(logits)  # temperature and filters do not change what is reported
    assert hot.last.logprob == pytest.approx(float(expected[1])) and hot.last.top == ()
    assert token_logprobs(logits, 3, 10).top[-1][0] == 3  # asking for more than the vocabulary: all of it
    assert not Sampler(SamplingParams()).host_only and Sampler(SamplingParams()).last is None


def test_banned_tokens_are_never_drawn():
    logits = torch.tensor([0.0, 9.0, 8.0])
    assert Sampler(SamplingParams(temperature=0), banned=frozenset({1})).host_only
    assert Sampler(SamplingParams(temperature=0), banned=frozenset({1}))(logits) == 2
    draws = Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=3), banned=frozenset({1}))
    assert 1 not in {draws(logits) for _ in range(50)}
