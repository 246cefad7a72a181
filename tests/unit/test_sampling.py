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
