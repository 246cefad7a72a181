"""The decoder as stages. Only math: no files, no network, no planner.

A Stage holds layers [start, end) of a model, plus the token embedding if it is the first
and the final norm and LM head if it is the last. A model is a list of stages; running
them one after another gives the same logits as one stage holding every layer.

Layout follows Hugging Face (rotate-halves rope); the readers put GGUF weights in that
layout. Shapes: B batch, S new tokens, D model dim, H heads, Hkv kv heads, hd head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fastserve_edge.models.config import ModelConfig, RopeScaling
from fastserve_edge.engine.kernels import ExpertMatmuls
from fastserve_edge.engine.kv_cache import KV_DTYPE, KVCache
from fastserve_edge.errors import ModelFormatError

# the fields of a config that size a tensor (ModelConfig.weight_shape) or a kernel's loop
SIZES = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "n_experts",
         "n_experts_used", "expert_ffn_dim")


class Weights(Protocol):
    """What a stage needs to be built; engine/quant.py's RuntimeWeights is the real one.
    Every tensor it hands out has the shape `config` gives it (ModelFormatError otherwise)."""

    config: ModelConfig

    def has(self, name: str) -> bool: ...
    def vector(self, name: str) -> torch.Tensor: ...
    def linear(self, name: str, *, bias: bool = False) -> nn.Module: ...
    def fused(self, names: list[str], *, bias: bool = False) -> nn.Module: ...  # x -> tuple of outputs;
    # .swiglu(x): silu(gate) * up of a [gate, up] pair, or None where the caller should compute it
    def embedding(self) -> nn.Module: ...
    def head(self, tied: bool) -> nn.Module: ...

    kernels: object  # engine.kernels.Kernels (its one-token glue) or None: dense torch only


def llama3_freq_factors(s: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    """Divisors of each rope frequency [hd/2], as Llama 3.1 defines them (= GGUF rope_freqs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_context_length / s.low_freq_factor   # longer waves: fully scaled
    high_wavelen = s.original_context_length / s.high_freq_factor  # shorter waves: untouched
    smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    medium = 1.0 / ((1 - smooth) / s.factor + smooth)
    factors = torch.where(wavelen > low_wavelen, torch.full_like(inv_freq, s.factor), medium)
    return torch.where(wavelen < high_wavelen, torch.ones_like(inv_freq), factors)


def rope_table(cfg: ModelConfig, max_tokens: int, freq_factors: torch.Tensor | None,
               theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_tokens, hd] for rotate-halves rope (base theta, default cfg.rope_theta)."""
    theta = cfg.rope_theta if theta is None else theta
    inv_freq = 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.to(torch.float64)
    angles = torch.outer(torch.arange(max_tokens, dtype=torch.float64), inv_freq)  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def model_rope(cfg: ModelConfig, weights: Weights, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for a model's positions: its file's rope_freqs, else its config's scaling."""
    if weights.has("rope_freqs.weight"):
        factors = weights.vector("rope_freqs.weight")
    elif cfg.rope_scaling is not None:
        factors = llama3_freq_factors(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta)
    elif cfg.rope_linear_factor != 1.0:  # gemma3's global layers: every frequency / factor
        factors = torch.full((cfg.head_dim // 2,), cfg.rope_linear_factor, dtype=torch.float64)
    else:
        factors = None
    return rope_table(cfg, max_tokens, factors)


def local_rope(cfg: ModelConfig, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the sliding-window layers (gemma3: base rope_local_theta, never scaled)."""
    return rope_table(cfg, max_tokens, None, theta=cfg.rope_local_theta)


def window_mask(S: int, pos: int, n_keys: int, window: int) -> torch.Tensor | None:
    """[S, n_keys] True where query pos + i sees key end - n_keys + j (end = pos + S): causal,
    and no more than `window` positions back, its own included. None: it sees every key."""
    if S == 1 and n_keys <= window:
        return None
    q = torch.arange(pos, pos + S).unsqueeze(1)
    k = torch.arange(pos + S - n_keys, pos + S).unsqueeze(0)
    return (k <= q) & (k > q - window)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, S, hd]; cos/sin: [S, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, kernels=None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.eps = eps
        self.kernels = kernels  # engine.kernels.Kernels: its rmsnorm, one pass a row (torch's takes four)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * w, in fp32
        if self.kernels is not None and x.dtype == torch.float32 and x.is_contiguous():
            return self.kernels.rmsnorm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, *, window: int = 0):
        """window: > 0, a sliding-window layer's (gemma3): each query sees that many positions."""
        super().__init__()
        self.cfg = cfg
        self.window = window
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar is not None else None
        self.wqkv = w.fused([f"{prefix}.attn_q", f"{prefix}.attn_k", f"{prefix}.attn_v"], bias=cfg.attn_bias)
        self.wo = w.linear(f"{prefix}.attn_output")
        kernels = getattr(w, "kernels", None)  # a prompt's rope in place and its attention, in C
        self.kernels = kernels if getattr(kernels, "prefill_glue", False) and cfg.fits_c_block else None
        self.q_norm = RMSNorm(w.vector(f"{prefix}.attn_q_norm.weight"), cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(w.vector(f"{prefix}.attn_k_norm.weight"), cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache, layer: int, pos: int) -> torch.Tensor:
        q, k, v = self.wqkv(x)
        return self.wo(self._attend(q, k, v, cos, sin, cache, layer, pos))

    def forward_packed(self, x: torch.Tensor, sizes: list[int], cos: torch.Tensor, sin: torch.Tensor,
                       caches: list[KVCache], layer: int, positions: list[int]) -> torch.Tensor:
        """x: [1, sum(sizes), D], the new tokens of several sessions one after another; session r
        has sizes[r] of them at positions[r] of caches[r]. One projection for all, attention each."""
        q, k, v = self.wqkv(x)
        outs, start = [], 0
        for S, cache, pos in zip(sizes, caches, positions):
            rows = slice(start, start + S)
            start += S
            outs.append(self._attend(q[:, rows], k[:, rows], v[:, rows], cos[pos:pos + S], sin[pos:pos + S],
                                     cache, layer, pos))
        return self.wo(torch.cat(outs, dim=1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache, layer: int, pos: int) -> torch.Tensor:
        """q [B, S, H*hd], k/v [B, S, Hkv*hd] of tokens at pos.. -> attention output [B, S, H*hd]."""
        B, S, _ = q.shape
        hd = self.cfg.head_dim
        q = q.view(B, S, self.cfg.n_heads, hd)
        k = k.view(B, S, self.cfg.n_kv_heads, hd)
        v = v.view(B, S, self.cfg.n_kv_heads, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        in_c = self.kernels is not None and B == 1 and q.dtype == k.dtype == torch.float32
        if in_c:
            self.kernels.rope_rows(q[0], cos, sin)  # q, k: fresh outputs of the projection (or norm)
            self.kernels.rope_rows(k[0], cos, sin)
            if cache.dtype == torch.float16 and hd % 16 == 0:  # attend.c over the cache as it is
                k_cache, v_cache = cache.layer(layer, pos + S)
                k_cache[:, pos:pos + S] = k[0].transpose(0, 1)
                v_cache[:, pos:pos + S] = v[0].transpose(0, 1)
                return self.kernels.attend_rows(q[0], k_cache, v_cache, pos).view(B, S, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H(kv), S, hd]
        if not in_c:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(layer, pos, k, v)  # [B, Hkv, pos+S, hd]; a sliding layer: its window's
        if self.window:
            mask, causal = window_mask(S, pos, keys.shape[2], self.window), False
        elif S == 1:
            mask, causal = None, False
        elif pos == 0:
            mask, causal = None, True
        else:  # new tokens after a cached prefix: query i sees keys 0 .. pos+i
            mask = torch.ones(S, pos + S, dtype=torch.bool).tril(diagonal=pos)
            causal = False
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=self.cfg.n_heads != self.cfg.n_kv_heads)
        return out.transpose(1, 2).reshape(B, S, self.cfg.n_heads * hd)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); with gelu, GeGLU (gemma3): gelu_tanh in place of silu.
    expert: one expert of a mixture (blk.N.ffn_gate.E)."""

    def __init__(self, w: Weights, prefix: str, expert: int | None = None, *, gelu: bool = False):
        super().__init__()
        e = "" if expert is None else f".{expert}"
        self.gate_up = w.fused([f"{prefix}.ffn_gate{e}", f"{prefix}.ffn_up{e}"])
        self.down = w.linear(f"{prefix}.ffn_down{e}")
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu:
            return self._geglu(x)
        hidden = self.gate_up.swiglu(x)  # prefill of quantized weights: a slice at a time
        if hidden is not None:
            return self.down(hidden)
        gate, up = self.gate_up(x)
        hidden = F.silu(gate, inplace=True).mul_(up)  # in gate's columns of the fused output: the
        del gate, up                                   # quantized kernels read its rows where they are
        return self.down(hidden)

    def _geglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.geglu_hidden(x))

    def geglu_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(gate(x)) * up(x): what down multiplies (a tensor-parallel slice: its columns)."""
        gate, up = self.gate_up(x)  # the quantized swiglu kernel computes silu: not used here
        return F.gelu(gate, approximate="tanh").mul_(up)


class MixtureOfExperts(nn.Module):
    """The FFN of a mixture-of-experts block (Qwen3-MoE, Mixtral): a router scores the experts
    for each row, the n_experts_used best run (their softmax weights renormalized to sum to 1
    with norm_topk) and their outputs are summed by those weights. Only the chosen experts'
    weights are read; the rows that chose the same expert go through it in one pass."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("router", w.vector(f"{prefix}.ffn_gate_inp.weight"), persistent=False)  # [E, D] fp32
        self.experts = nn.ModuleList(FeedForward(w, prefix, e) for e in range(cfg.n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, experts [N, k]) for each row, best first."""
        probs = torch.softmax(x.float() @ self.router.T, dim=-1)
        weights, chosen = probs.topk(self.cfg.n_experts_used, dim=-1)
        if self.cfg.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        weights, chosen = self.route(rows)
        if rows.shape[0] == 1 and self._kernels is not None:
            return self._one_row(rows, weights, chosen).reshape(shape)
        parts = [(hit, self.run_expert(e, rows, hit, weights[hit, slot, None]))
                 for e, hit, slot in expert_rows(chosen)]
        return sum_experts(rows.shape[0], rows.shape[1], parts).reshape(shape)

    @functools.cached_property
    def _kernels(self) -> ExpertMatmuls | None:
        """The experts in the kernels' one-call form (kernels.ExpertMatmuls), where every expert
        is quantized SwiGLU without biases and the chosen ones fit one call; else None (each row
        then goes through the modules)."""
        gate_ups, downs = [], []
        for ff in self.experts:
            down = _one_call(ff.down)
            if ff.gelu or ff.gate_up.multi is None or ff.gate_up.bias is not None or down is None:
                return None
            gate_ups.append(ff.gate_up.multi)
            downs.append(down)
        experts = ExpertMatmuls(downs[0].kernels, gate_ups, downs)
        return experts if experts.fits(self.cfg.n_experts_used) else None

    def _one_row(self, rows: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """A decode step's one row: the chosen experts' gates and ups in one kernel call, their
        downs in another, with the arithmetic of run_expert and sum_experts (the same bits,
        without the modules' dispatch, which was a third of a mixture's decode step at two threads)."""
        experts, slots = chosen[0].sort()
        order = experts.numpy()
        gate_up = self._kernels.gate_up(order, rows)  # [k, 2 width], expert order
        width = gate_up.shape[1] // 2
        hidden = F.silu(gate_up[:, :width], inplace=True).mul_(gate_up[:, width:])  # each row as its own call's
        outputs = self._kernels.down(order, hidden)
        # all k rows added into row 0 in expert order: index_add_ adds its rows one after another
        hit = torch.zeros(len(outputs), dtype=torch.long)
        return sum_experts(1, rows.shape[1], [(hit, outputs * weights[0, slots, None])])

    def run_expert(self, e: int, rows: torch.Tensor, hit: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Expert e's output for rows[hit], scaled by its router weight [len(hit), 1]."""
        return self.experts[e](rows[hit].unsqueeze(0))[0] * weight


def expert_rows(chosen: torch.Tensor):
    """(expert, the rows that chose it, where in their choice) for every expert chosen, in
    expert order (the order transformers sums them in, and every machine of a group too)."""
    for e in chosen.unique().tolist():
        hit, slot = (chosen == e).nonzero(as_tuple=True)
        yield e, hit, slot


def sum_experts(n_rows: int, dim: int, parts) -> torch.Tensor:
    """The mixture's output [n_rows, dim]: the weighted expert outputs (hit, y) added in the
    order given (expert order): one machine and a group add the same numbers in the same order."""
    out = torch.zeros(n_rows, dim)
    for hit, y in parts:
        out.index_add_(0, hit, y)
    return out


def _one_call(linear: nn.Module):
    """A quantized linear's kernel form (QuantLinear.one_call); None for dense weights or a bias."""
    one_call = getattr(linear, "one_call", None)
    return one_call() if one_call is not None else None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: Weights, index: int):
        super().__init__()
        prefix = f"blk.{index}"
        kernels = getattr(w, "kernels", None)
        self.attn_norm = RMSNorm(w.vector(f"{prefix}.attn_norm.weight"), cfg.norm_eps, kernels)
        self.attn = Attention(cfg, w, prefix, window=cfg.window(index))
        self.ffn_norm = RMSNorm(w.vector(f"{prefix}.ffn_norm.weight"), cfg.norm_eps, kernels)
        self.ffn = MixtureOfExperts(cfg, w, prefix) if cfg.moe else FeedForward(w, prefix, gelu=cfg.gelu_ffn)
        # gemma3: the attention's and the FFN's outputs are normed too, before the residual add
        self.post_attn_norm = self.post_ffn_norm = None
        if cfg.post_norms:
            self.post_attn_norm = RMSNorm(w.vector(f"{prefix}.post_attention_norm.weight"), cfg.norm_eps, kernels)
            self.post_ffn_norm = RMSNorm(w.vector(f"{prefix}.post_ffw_norm.weight"), cfg.norm_eps, kernels)
        self.cfg = cfg
        self.program = None
        # One token at a time the glue between matmuls costs as much as they do: a C path
        # (kernels/decode.c) takes one row through the whole block when every weight is quantized.
        # A mixture's FFN has no C block (the router picks its matrices): its attention is one
        # C call (attention_program), its experts two more (MixtureOfExperts._one_row).
        self.attention_program = None
        fused = (self.attn.wqkv,) if cfg.moe else (self.attn.wqkv, self.ffn.gate_up)
        self.glue = getattr(w, "kernels", None) if all(getattr(f, "multi", None) is not None for f in fused) else None
        if not cfg.fits_c_block:  # gemma3's norms, GeGLU, window and scale are not in decode.c: torch only
            self.glue = None
        if self.glue is None:
            return
        # ... and when wo and down are quantized too, the whole block is one C call
        single = [_one_call(m) for m in (self.attn.wo, None if cfg.moe else self.ffn.down)]
        if single[0] is None or (not cfg.moe and single[1] is None):
            return
        attn = self.attn
        spec = dict(dim=cfg.dim, n_heads=cfg.n_heads, n_kv=cfg.n_kv_heads, head_dim=cfg.head_dim, eps=cfg.norm_eps,
                    attn_norm=self.attn_norm.weight, ffn_norm=self.ffn_norm.weight,
                    q_norm=attn.q_norm.weight if attn.q_norm is not None else None,
                    k_norm=attn.k_norm.weight if attn.k_norm is not None else None, qkv_bias=attn.wqkv.bias,
                    qkv=attn.wqkv.multi, wo=single[0])
        if cfg.moe:
            self.attention_program = self.glue.block(ffn=0, **spec)
        else:
            self.program = self.glue.block(ffn=self.ffn.gate_up.sizes[0], gate_up=self.ffn.gate_up.multi, down=single[1],
                                           **spec)

    def forward(self, x, cos, sin, cache, layer, pos):
        if self.post_attn_norm is not None:
            return self._sandwich(x, self.attn(self.attn_norm(x), cos, sin, cache, layer, pos))
        if self.glue is not None and x.shape[0] == 1 and x.shape[1] == 1:
            return self.forward_one(x, cos, sin, cache, layer, pos)
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, pos)
        x += self.ffn(self.ffn_norm(x))  # x is this block's own now: no second [S, D] buffer
        return x

    def forward_packed(self, x, sizes, cos, sin, caches, layer, positions):
        """x: [1, sum(sizes), D], several sessions' new tokens (Attention.forward_packed)."""
        if self.post_attn_norm is not None:
            return self._sandwich(x, self.attn.forward_packed(self.attn_norm(x), sizes, cos, sin, caches, layer,
                                                              positions))
        x = x + self.attn.forward_packed(self.attn_norm(x), sizes, cos, sin, caches, layer, positions)
        x += self.ffn(self.ffn_norm(x))
        return x

    def _sandwich(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """gemma3's rest of the block, after attention: each branch's output normed before its add."""
        x = x + self.post_attn_norm(attended)
        x += self.post_ffn_norm(self.ffn(self.ffn_norm(x)))
        return x

    def forward_one(self, x, cos, sin, cache: KVCache, layer: int, pos: int) -> torch.Tensor:
        """x: [1, 1, D] -> [1, 1, D]; the same math as forward(), in fewer, larger calls."""
        c, g = self.cfg, self.glue
        if self.program is not None or self.attention_program is not None:
            row = x.reshape(-1).clone()  # updated in place; x may be the caller's
            k_cache, v_cache = cache.layer(layer, pos + 1)
            if self.program is None:  # a mixture: its attention in C, then the chosen experts
                normed = self.attention_program.attend(row, k_cache, v_cache, pos, cos[0], sin[0])
                return (row + self.ffn(normed)).reshape(1, 1, -1)
            self.program(row, k_cache, v_cache, pos, cos[0], sin[0])
            return row.reshape(1, 1, -1)
        row = x.reshape(1, -1)
        row = row + self.attn.wo.forward(attend_row(self.attn, g, self.attn_norm, row, cos, sin, cache, layer, pos))
        if c.moe:
            return (row + self.ffn(g.rmsnorm(row, self.ffn_norm.weight, self.ffn_norm.eps))).reshape(1, 1, -1)
        gate_up = self.ffn.gate_up.project(g.rmsnorm(row, self.ffn_norm.weight, self.ffn_norm.eps))
        row = row + self.ffn.down.forward(g.swiglu(gate_up))
        return row.reshape(1, 1, -1)


def attend_row(attn: Attention, g, norm: RMSNorm, row: torch.Tensor, cos, sin, cache: KVCache, layer: int,
               pos: int) -> torch.Tensor:
    """One token's attention through the C glue, before wo: row [1, D] at pos -> the heads'
    outputs [1, heads * head_dim] (attn's own heads: a tensor-parallel slice has some)."""
    c = attn.cfg
    qkv = attn.wqkv.project(g.rmsnorm(row, norm.weight, norm.eps))
    if attn.q_norm is not None:  # qwen3: RMSNorm over each head of q and k, before rope
        q_k = qkv[0, : (c.n_heads + c.n_kv_heads) * c.head_dim]
        g.rmsnorm(q_k[: c.n_heads * c.head_dim], attn.q_norm.weight, attn.q_norm.eps,
                  out=q_k[: c.n_heads * c.head_dim])
        g.rmsnorm(q_k[c.n_heads * c.head_dim:], attn.k_norm.weight, attn.k_norm.eps,
                  out=q_k[c.n_heads * c.head_dim:])
    k_cache, v_cache = cache.layer(layer, pos + 1)
    heads = g.attend_one(qkv, cos[0], sin[0], k_cache, v_cache, pos, c.n_heads, c.n_kv_heads, c.head_dim)
    return heads.reshape(1, -1)
class ScaledEmbedding(nn.Module):
    """gemma3: embedding rows times sqrt(dim), the scale in fp32 (the hidden's dtype, as HF
    rounds it to its own; llama.cpp multiplies by sqrtf(n_embd) too)."""

    def __init__(self, embedding: nn.Module, dim: int):
        super().__init__()
        self.embedding = embedding
        self.scale = torch.tensor(math.sqrt(dim), dtype=torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids) * self.scale


class Stage(nn.Module):
    """Layers [start, end) of a model; input ids if first, else hidden; output logits if last.

    The first stage may hold no layers at all (start == end == 0): a cluster host whose
    peers hold every layer still embeds the tokens."""

    def __init__(self, cfg: ModelConfig, weights: Weights, start: int, end: int, *, max_tokens: int,
                 embeds: bool | None = None):
        """embeds: this stage turns ids into hidden states (default: when it holds layer 0;
        a peer holding layer 0 gets hidden states from the host, which embeds)."""
        super().__init__()
        assert 0 <= start <= end <= cfg.n_layers and (start < end or start == 0), f"bad layer range [{start}, {end})"
        assert max_tokens >= 1, f"max_tokens {max_tokens}"
        # the C block is sized by cfg, each matrix by its tensor: the weights were checked
        # against their own config, which must be this one
        differ = [f for f in SIZES if getattr(cfg, f) != getattr(weights.config, f)]
        if differ:
            raise ModelFormatError(f"the stage's config and its weights' disagree on {', '.join(differ)}: "
                                   "the host sent a config that is not the model's; re-plan from the model file")
        self.cfg, self.start, self.end, self.max_tokens = cfg, start, end, max_tokens
        self.is_first, self.is_last = (start == 0 if embeds is None else embeds), end == cfg.n_layers
        self.embed = weights.embedding() if self.is_first else None
        if self.embed is not None and cfg.scale_embeddings:
            self.embed = ScaledEmbedding(self.embed, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, weights, i) for i in range(start, end))
        self.norm = RMSNorm(weights.vector("output_norm.weight"), cfg.norm_eps) if self.is_last else None
        self.head = weights.head(cfg.tie_embeddings) if self.is_last else None
        # rows per head call in _head_each: the integer kernel gives every row its own bits below
        # every format's GEMM threshold (quant.DENSE_PREFILL_ROWS_OF: 32 and up); torch's GEMM of
        # a dense head does not
        self.head_rows = 16 if self.head is not None and _one_call(self.head) is not None else 1
        cos, sin = model_rope(cfg, weights, max_tokens)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # per layer: its rope tables, (cos, sin) or a sliding-window layer's own (gemma3)
        local = local_rope(cfg, max_tokens) if cfg.sliding_window else (cos, sin)
        self.ropes = [local if cfg.window(i) else (cos, sin) for i in range(start, end)]

    def new_cache(self, dtype: torch.dtype = KV_DTYPE) -> KVCache:
        return KVCache(self.end - self.start, self.cfg.n_kv_heads, self.cfg.head_dim, self.max_tokens, dtype=dtype,
                       windows=[self.cfg.window(i) for i in range(self.start, self.end)])

    def forward(self, x: torch.Tensor, cache: KVCache, pos: int, *, all_logits: bool = False,
                normed: bool = False) -> torch.Tensor:
        """x: ids [B, S] (first stage) or hidden [B, S, D]. Returns hidden [B, S, D], or
        logits [B, vocab] of the last position ([B, S, vocab] with all_logits) if last, or
        with normed the hidden states after the final norm [B, S, D] (embeddings)."""
        self._check_input(x, 2 if self.is_first else 3, [pos], [x.shape[1] if x.dim() > 1 else 0])
        h = self.embed(x) if self.is_first else x.float()
        S = h.shape[1]
        for layer, block in enumerate(self.blocks):
            cos, sin = self.ropes[layer]
            h = block.forward(h, cos[pos:pos + S], sin[pos:pos + S], cache, layer, pos)  # no hooks: skip Module.__call__
        if not self.is_last:
            return h
        if normed:
            return self.norm(h)
        if not all_logits:
            h = h[:, -1]
        return self.head(self.norm(h))

    def forward_packed(self, xs: list[torch.Tensor], caches: list[KVCache], positions: list[int]) -> list[torch.Tensor]:
        """Several sessions' prefills as one forward: xs[r] ids [S_r] (first stage) or hidden
        [S_r, D], at positions[r] of caches[r]. Every linear runs once over all their rows (a
        quantized weight is dequantized once for every prompt, one GEMM); attention runs per
        session. Returns hidden [S_r, D] per session, or if last the logits [vocab] of each
        one's last position. Each equals forward() of that prompt alone, bit for bit, when the
        linears take the same path alone as together: every S_r >= quant.DENSE_PREFILL_ROWS."""
        sizes = [x.shape[0] for x in xs]
        assert len(xs) == len(caches) == len(positions) >= 1 and min(sizes) >= 1
        for x, pos in zip(xs, positions):
            self._check_input(x, 1 if self.is_first else 2, [pos], [x.shape[0]])
        h = torch.cat([self.embed(x.view(1, -1))[0] if self.is_first else x.float() for x in xs]).unsqueeze(0)
        for layer, block in enumerate(self.blocks):
            h = block.forward_packed(h, sizes, *self.ropes[layer], caches, layer, positions)
        parts = list(h[0].split(sizes))
        if not self.is_last:
            return parts
        return list(self._head_each(self.norm(torch.stack([part[-1] for part in parts]))))

    def _check_input(self, x: torch.Tensor, dims: int, positions: list[int], lengths: list[int]) -> None:
        """ValueError unless x has `dims` dims (ids; hidden states: one more, of width dim) and
        the tokens at each position fit the stage's max_tokens (its rope table and KV cache).
        Ids out of the vocabulary: the embedding's IndexError."""
        if x.dim() != dims or (not self.is_first and x.shape[-1] != self.cfg.dim):
            raise ValueError(f"stage input {tuple(x.shape)}: expected {dims} dims"
                             + ("" if self.is_first else f", the last of {self.cfg.dim}"))
        for pos, n in zip(positions, lengths):
            if pos < 0 or n < 1 or pos + n > self.max_tokens:
                raise ValueError(f"{n} tokens at position {pos} do not fit this stage's {self.max_tokens} positions")

    def _head_each(self, h: torch.Tensor) -> torch.Tensor:
        """h: [R, D] normed rows of R sessions -> logits [R, vocab], each row the bits the head
        gives it alone (head_rows rows per call)."""
        n = self.head_rows
        return torch.cat([self.head(h[i:i + n]) for i in range(0, h.shape[0], n)])

    def forward_batch(self, x: torch.Tensor, caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """One new token for each of M sessions, session r at positions[r] of caches[r].
        x: ids [M] (first stage) or hidden [M, D]. Returns hidden [M, D], or logits [M, vocab]
        if last. Row r equals forward() of that token alone, bit for bit: with every block in
        C the projections run as one M-row product (each weight read once per step, not once
        per session); otherwise the sessions run one after another."""
        M = x.shape[0]
        assert M == len(caches) == len(positions) >= 1
        self._check_input(x, 1 if self.is_first else 2, positions, [1] * M)
        if self.cfg.moe:
            return self._forward_batch_moe(x, caches, positions)
        if any(block.program is None for block in self.blocks):
            rows = [self.forward(x[r:r + 1].unsqueeze(1), caches[r], positions[r]) for r in range(M)]
            return torch.cat([row.reshape(1, -1) for row in rows])
        h = self.embed(x.view(M, 1)).reshape(M, -1) if self.is_first else x.float()
        h = h.contiguous().clone()  # updated in place; x may be the caller's
        for layer, block in enumerate(self.blocks):
            kv = [cache.layer(layer, pos + 1) for cache, pos in zip(caches, positions)]
            block.program.batch(h, kv, positions, self.cos, self.sin)
        if not self.is_last:
            return h
        return self._head_each(self.norm(h))

    def _attention_row(self, block: Block, row: torch.Tensor, cache: KVCache, layer: int, pos: int) -> torch.Tensor:
        """row [1, D] + its attention, as forward_one computes it (the C glue when quantized)."""
        cos, sin = self.cos[pos:pos + 1], self.sin[pos:pos + 1]
        if block.glue is None:
            return row + block.attn(block.attn_norm(row.unsqueeze(0)), cos, sin, cache, layer, pos)[0]
        return row + block.attn.wo.forward(attend_row(block.attn, block.glue, block.attn_norm, row, cos, sin, cache,
                                                      layer, pos))

    def _forward_batch_moe(self, x: torch.Tensor, caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """forward_batch of a mixture of experts: attention one session at a time, then every
        session's row through the experts together (the rows that chose an expert share its pass)."""
        M = x.shape[0]
        h = self.embed(x.view(M, 1)).reshape(M, -1) if self.is_first else x.float().reshape(M, -1)
        for layer, block in enumerate(self.blocks):
            h = torch.cat([self._attention_row(block, h[r:r + 1], caches[r], layer, p) for r, p in enumerate(positions)])
            h += block.ffn(block.ffn_norm(h))
        if not self.is_last:
            return h
        return self._head_each(self.norm(h))
