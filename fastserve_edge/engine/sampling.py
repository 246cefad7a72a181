"""Sampling: small pure functions over logits, plus a Sampler that owns its RNG.

Order follows llama.cpp's default chain: repetition penalty -> top-k -> top-p -> min-p ->
temperature -> draw. Temperature 0 is argmax, which makes golden tests possible. A Sampler
with a Constraint (a grammar: serving/constrain.py) masks the tokens it forbids first, so
that every step of the chain sees only allowed tokens.

Log-probabilities (the API's `logprobs`) are the model's: log-softmax of the logits the
sampler is given, before the penalty, the filters, the temperature and any banned token, as
OpenAI reports them (llama.cpp's server reports the final sampling distribution instead;
that one is 0 for every token but the pick at temperature 0, which says nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fastserve_edge.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7   # 0 = greedy
    top_k: int = 40            # 0 = off
    top_p: float = 0.95        # 1.0 = off
    min_p: float = 0.05        # 0.0 = off; drop tokens below min_p * p(best)
    repeat_penalty: float = 1.1  # 1.0 = off; llama.cpp/CTRL-style divide-or-multiply
    repeat_last_n: int = 64    # window of recent tokens the penalty looks at
    seed: int | None = None    # None = a fresh random seed per answer

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "--top-k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1] (1 = off)"),
            (0 <= self.min_p < 1, "--min-p must be in [0, 1) (0 = off)"),
            (self.repeat_penalty > 0, "--repeat-penalty must be > 0 (1 = off)"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def apply_repeat_penalty(logits: torch.Tensor, recent: Sequence[int], penalty: float) -> torch.Tensor:
    """logits: [V]. Positive logits of recent tokens are divided by penalty, negative multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """logits: [V] -> same shape with excluded tokens at -inf. Always keeps the best token."""
    logits = logits.float()
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the ones before it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability and the `top` most likely tokens' (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """logits: [V] as the model gave them -> log p(token) and the `top` best (id, log p)."""
    logp = torch.log_softmax(logits.float(), -1)
    best = torch.topk(logp, min(top, logp.numel())) if top > 0 else None
    pairs = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
    return TokenLogprobs(token, float(logp[token]), pairs)


def logits_to_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits / max(temperature, 1e-5)).softmax(-1)


class Constraint(Protocol):
    """What a session may say next (a grammar's state). The sampler masks with it; whoever
    keeps the session's answer feeds it each token it delivers (Sampler.accept), so a token
    sampled and then discarded (a step lost to a re-plan) never advances it."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [V] -> [V], forbidden tokens at -inf."""
        ...

    def accept(self, token: int) -> None: ...


class Sampler:
    """Draws one token at a time from logits; reproducible for a given seed.

    logprobs: None (off), or how many top tokens to report besides the pick; each call then
    leaves the pick's TokenLogprobs in `last`. banned: token ids never drawn (llama.cpp's
    ignore_eos bans the end-of-generation tokens so). constraint: a grammar's mask (None: any
    token). Any of them needs the logits here: `host_only` says that a peer holding the head
    must not sample for this sampler."""

    def __init__(self, params: SamplingParams, constraint: Constraint | None = None, *, logprobs: int | None = None,
                 banned: frozenset[int] = frozenset()):
        self.params = params
        self.constraint = constraint
        self.logprobs = logprobs
        self.banned = torch.tensor(sorted(banned), dtype=torch.long)
        self.last: TokenLogprobs | None = None
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    @property
    def host_only(self) -> bool:
        return self.logprobs is not None or self.banned.numel() > 0 or self.constraint is not None

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """logits: [V] of the next position; history: token ids so far (prompt + answer)."""
        token = self._draw(logits, history)
        if self.logprobs is not None:
            self.last = token_logprobs(logits, token, self.logprobs)
        return token

    def _draw(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        p = self.params
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        window = list(history[-p.repeat_last_n:]) if p.repeat_last_n else []
        logits = apply_repeat_penalty(logits.float(), window, p.repeat_penalty)
        if self.banned.numel():
            logits = logits.index_fill(0, self.banned, float("-inf"))
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = filter_logits(logits, p.top_k, p.top_p, p.min_p)
        probs = logits_to_probs(logits, p.temperature)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, token: int) -> None:
        """The token this sampler drew was delivered: advance the constraint past it."""
        if self.constraint is not None:
            self.constraint.accept(token)
