"""Tensor parallelism: every machine of a group holds a slice of every layer and works on
every token at once, so each added machine adds its memory bandwidth to one chat.

What a machine holds (`Slices`, proportional to each machine's measured speed; any number of
machines):
- attention: whole KV heads with their query heads (a group), and those heads' KV cache;
  with more machines than KV heads the extra machines hold no heads and take their share of
  the FFN, wo, down and vocabulary instead;
- FFN: gate and up columns; wo and down: rows of their output (the model's dim);
- the LM head: rows of the vocabulary;
- replicated: the norms. The group's first machine (the host) also holds the embedding and
  sends each step's rows.
- a mixture of experts (expert parallelism): whole experts instead of FFN columns, in
  proportion to speed; the router is replicated and runs on every machine, so each knows which
  rows go to which expert. Each machine runs its experts on the rows that chose them and one
  all-gather a layer brings every weighted expert output to every machine, which adds them in
  expert order, as one machine does (three all-gathers a layer, all bit for bit one machine's).
Every matrix is split by output rows, so every output element is computed whole from the
whole input on one machine, and four all-gathers a layer (decode.c fs_tp_block_batch, over
mesh.c's sealed TCP mesh) make the answer bit for bit one machine's (the exact design).

A step, from the first machine to the others over the mesh: a fixed header (kind, rows,
flags), then the rows (slot, position, whether it wants logits) and their hidden states.
Decode rows run every layer in one C call (fs_tp_forward); blocks decode.c has no program for
(a mixture, gemma3's windows, post-norms and GeGLU) run the same slices through torch a row at
a time, as one machine runs each session's row (torch_layers); one session's prompt runs through
the same torch modules and kernels as one machine's Stage.forward (the GEMM path from 48
rows), sliced, with the same four all-gathers: both are bit for bit one machine's. Each
machine answers with the best `TOP_CANDIDATES` logits of its vocabulary rows for every row
that wants them (or all of them when asked); the first machine samples from those.

Why exact rather than partial sums (Megatron / distributed-llama: o and down split by input
columns, two all-reduces a layer): measured on the namespace LAN (bench/tensor.py, 1 Gbit/s,
Llama-3.2-1B shape), the four all-gathers cost 3.5 ms of a 46 ms token (68 exchanges of
~0.05 ms, 458 KB out); halving them would gain at most ~4%, and the answers would no longer be
one machine's. The cost that matters on small models is the exchanges' latency (SmolLM2:
124 exchanges, 2.7 ms of a 12 ms token), which is why the planner keeps such models on one
machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fastserve_edge.models.config import ModelConfig
from fastserve_edge.engine.kernels import ExchangeError, Mesh, TensorBlockProgram, tp_forward
from fastserve_edge.engine.kv_cache import KVCache
from fastserve_edge.engine.model import (Attention, FeedForward, MixtureOfExperts, RMSNorm, ScaledEmbedding, _one_call,
                                         attend_row, expert_rows, local_rope, model_rope, sum_experts)
from fastserve_edge.engine.quant import DenseLinear, QuantLinear, RuntimeWeights
from fastserve_edge.errors import ConfigError, ModelFormatError
from fastserve_edge.models.tensors import ModelSource, RawTensor, check_layout

ROW_GROUP = 32        # FFN columns, output rows and vocabulary rows go to machines in multiples of this
TOP_CANDIDATES = 64   # logits per machine and row sent back for sampling (greedy needs the first)
PREFILL_ROWS = 512    # prompt rows per step: bounds each machine's activations
MAX_SLOTS = 256       # sessions whose KV a machine of a group holds at once
STEP, DROP, STOP = 1, 2, 3  # a step's kind
ALL_LOGITS = 2               # a step's flag: every vocabulary row back, not the best TOP_CANDIDATES


def apportion(units: int, weights: Sequence[float], *, at_least: int = 1) -> list[int]:
    """`units` split in proportion to `weights` (largest remainder; ties to the lower rank),
    every share at least `at_least`. ValueError when that cannot be."""
    n = len(weights)
    if n < 1 or units < at_least * n or any(not w > 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"cannot split {units} units over {n} machines (at least {at_least} each)")
    spare = units - at_least * n
    total = sum(weights)
    exact = [spare * w / total for w in weights]
    shares = [math.floor(e) for e in exact]
    order = sorted(range(n), key=lambda r: (-(exact[r] - shares[r]), r))
    for r in order[:spare - sum(shares)]:
        shares[r] += 1
    return [s + at_least for s in shares]


def _spans(sizes: Sequence[int], scale: int = 1, limit: int | None = None) -> tuple[int, ...]:
    at = [0]
    for s in sizes:
        at.append(at[-1] + s * scale)
    if limit is not None:
        at = [min(a, limit) for a in at]
    return tuple(at)


@dataclass(frozen=True)
class Slices:
    """Who holds what in a tensor-parallel group of `ranks` machines; each *_at has ranks + 1
    bounds, machine r holding [at[r], at[r + 1])."""

    kv_at: tuple[int, ...]     # KV heads (with their query heads)
    dim_at: tuple[int, ...]    # rows of wo and down
    ffn_at: tuple[int, ...]    # FFN columns; a mixture of experts: whole experts
    vocab_at: tuple[int, ...]  # rows of the LM head

    @property
    def ranks(self) -> int:
        return len(self.kv_at) - 1

    @classmethod
    def split(cls, cfg: ModelConfig, speeds: Sequence[float]) -> Slices:
        """Shares proportional to `speeds` (one per machine, the first the host's)."""
        n = len(speeds)
        units = {name: -(-size // ROW_GROUP) for name, size in
                 (("dim", cfg.dim), ("ffn", cfg.ffn_dim), ("vocab", cfg.vocab_size))}
        if cfg.moe:
            units["ffn"] = cfg.n_experts
        if min(units.values()) < n:
            raise ConfigError(f"{n} machines are more than this model's dim {cfg.dim} / ffn {cfg.ffn_dim} / "
                              f"{cfg.n_experts} experts can be split into (groups of {ROW_GROUP}): use fewer "
                              "machines or a pipeline")
        kv = apportion(cfg.n_kv_heads, speeds, at_least=0) if n > 1 else [cfg.n_kv_heads]
        ffn_at = (_spans(apportion(units["ffn"], speeds)) if cfg.moe else
                  _spans(apportion(units["ffn"], speeds), ROW_GROUP, cfg.ffn_dim))
        return cls(kv_at=_spans(kv), dim_at=_spans(apportion(units["dim"], speeds), ROW_GROUP, cfg.dim),
                   ffn_at=ffn_at, vocab_at=_spans(apportion(units["vocab"], speeds), ROW_GROUP, cfg.vocab_size))

    def holds(self, cfg: ModelConfig, name: str, rank: int) -> bool:
        """Whether machine `rank` holds any of tensor `name`: not another machine's expert, nor
        the attention of a machine without heads (more machines than KV heads)."""
        e = _expert_of(cfg, name)
        if e is not None:
            return self.ffn_at[rank] <= e < self.ffn_at[rank + 1]
        span = self.rows_of(cfg, name, rank)
        return span is None or span[1] > span[0]

    def rows_of(self, cfg: ModelConfig, name: str, rank: int) -> tuple[int, int] | None:
        """The rows of tensor `name` machine `rank` holds, or None for the whole tensor."""
        parts = name.split(".")
        group = cfg.n_heads // cfg.n_kv_heads
        a, b = self.kv_at[rank], self.kv_at[rank + 1]
        if _expert_of(cfg, name) is not None:
            return None  # an expert is held whole (or not at all: holds)
        if len(parts) >= 3 and parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                return a * group * cfg.head_dim, b * group * cfg.head_dim
            if kind in ("attn_k", "attn_v"):
                return a * cfg.head_dim, b * cfg.head_dim
            if kind in ("attn_output", "ffn_down"):
                return self.dim_at[rank], self.dim_at[rank + 1]
            if kind in ("ffn_gate", "ffn_up"):
                return self.ffn_at[rank], self.ffn_at[rank + 1]
            return None
        if name == "output.weight":
            return self.vocab_at[rank], self.vocab_at[rank + 1]
        return None


    def key(self, rank: int) -> str:
        """What names machine `rank`'s slice in a shard cache: the same spans, the same key."""
        text = json.dumps([rank, self.kv_at, self.dim_at, self.ffn_at, self.vocab_at])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def checked(cls, cfg: ModelConfig, kv_at, dim_at, ffn_at, vocab_at) -> Slices:
        """Spans from the network: ValueError unless each covers its dimension in order, and a
        machine of the group holds at least one FFN column and one row of dim and vocabulary."""
        spans = [tuple(int(v) for v in at) for at in (kv_at, dim_at, ffn_at, vocab_at)]
        n = len(spans[0]) - 1
        if not 1 <= n <= 64 or any(len(at) != n + 1 for at in spans):
            raise ValueError(f"spans for 1 to 64 machines, all of one length: got {[len(at) for at in spans]}")
        totals = (cfg.n_kv_heads, cfg.dim, cfg.n_experts if cfg.moe else cfg.ffn_dim, cfg.vocab_size)
        for name, at, total, least in zip(("kv", "dim", "ffn", "vocab"), spans, totals, (0, 1, 1, 1)):
            if at[0] != 0 or at[-1] != total or any(at[r + 1] - at[r] < least for r in range(n)):
                raise ValueError(f"{name} spans {list(at)[:8]} do not cover 0..{total} in order")
        return cls(*spans)

    def cut(self, cfg: ModelConfig, raw: RawTensor, rank: int, *, head: bool = False) -> RawTensor:
        """Machine `rank`'s rows of a tensor (in the head part, a tied embedding's vocabulary rows)."""
        span = self.rows_of(cfg, raw.name, rank)
        if span is None and head and raw.name == "token_embd.weight":
            span = self.vocab_at[rank], self.vocab_at[rank + 1]
        return raw if span is None else _take(raw, *span)


class SliceWeights(RuntimeWeights):
    """RuntimeWeights that hands out one machine's rows of each sliced tensor. sliced: the
    source already holds only those rows (a peer sent its slice); otherwise whole tensors are
    checked against the config and cut here."""

    def __init__(self, source: ModelSource, slices: Slices, rank: int, *, sliced: bool = False, **kw):
        super().__init__(source, **kw)
        self.slices, self.rank, self.sliced = slices, rank, sliced

    def rows(self, name: str) -> tuple[int, int] | None:
        return self.slices.rows_of(self.config, name, self.rank)

    def _raw(self, name: str) -> RawTensor:
        span = self.rows(name)
        if span is None or not self.sliced:
            raw = super()._raw(name)
            return raw if span is None else _take(raw, *span)
        return self._sent(name, span)

    def _sent(self, name: str, span: tuple[int, int]) -> RawTensor:
        """A slice as a peer received it, checked before any kernel sees it: its rows, the
        model's row width, and data laid out as that shape says."""
        raw = self.source.tensor(name)
        whole = self.config.weight_shape(name)
        want = (span[1] - span[0], *whole[1:]) if whole is not None else None
        if want is not None and tuple(raw.shape) != want:
            raise ModelFormatError(f"slice {name} has shape {list(raw.shape)}, this machine's share is {list(want)}: "
                                   "the host sent another plan's slice; re-plan")
        try:
            check_layout(raw)
        except ValueError as err:
            raise ModelFormatError(f"slice {name}: {err}; the part the host sent is corrupt: re-plan") from None
        return raw

    def head_slice(self) -> torch.nn.Module:
        """This machine's vocabulary rows of the LM head (of the embedding, when tied)."""
        span = self.slices.vocab_at[self.rank], self.slices.vocab_at[self.rank + 1]
        if self.config.tie_embeddings:
            raw = (self._sent("token_embd.weight", span) if self.sliced
                   else _take(RuntimeWeights._raw(self, "token_embd.weight"), *span))
        else:
            raw = self._raw("output.weight")
        q = self._quant(raw)
        return QuantLinear(q) if q is not None else DenseLinear(raw.to_float(self.dtype), None)


def _expert_of(cfg: ModelConfig, name: str) -> int | None:
    """The expert a tensor belongs to (blk.N.ffn_gate.E.weight), None for any other tensor."""
    parts = name.split(".")
    if cfg.moe and len(parts) == 5 and parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
        return int(parts[3]) if parts[3].isdigit() else None
    return None


def _take(raw: RawTensor, a: int, b: int) -> RawTensor:
    """Rows a..b of a matrix; elements a..b of a vector (a bias: one row of float bytes in a file)."""
    if len(raw.shape) == 1 and isinstance(raw.data, np.ndarray):
        width = raw.nbytes // raw.shape[0]
        flat = raw.data.reshape(1, -1).view(np.uint8)
        return RawTensor(raw.name, raw.qtype, (b - a,), flat[:, a * width:b * width])
    return RawTensor(raw.name, raw.qtype, (b - a, *raw.shape[1:]), raw.data[a:b])


class SliceBlock(torch.nn.Module):
    """One layer's slice as torch modules, built as engine/model.py's Block builds its own (the
    prompt path runs them; fs_tp_block_batch runs their kernels for decode)."""

    def __init__(self, cfg: ModelConfig, mine: ModelConfig | None, w: SliceWeights, index: int):
        super().__init__()
        prefix = f"blk.{index}"
        kernels = w.kernels
        self.attn_norm = RMSNorm(w.vector(f"{prefix}.attn_norm.weight"), cfg.norm_eps, kernels)
        self.ffn_norm = RMSNorm(w.vector(f"{prefix}.ffn_norm.weight"), cfg.norm_eps, kernels)
        self.attn = Attention(mine, w, prefix, window=cfg.window(index)) if mine is not None else None  # its wo: below
        self.post_attn_norm = self.post_ffn_norm = None
        if cfg.post_norms:  # gemma3: each branch's whole output normed before its add
            self.post_attn_norm = RMSNorm(w.vector(f"{prefix}.post_attention_norm.weight"), cfg.norm_eps, kernels)
            self.post_ffn_norm = RMSNorm(w.vector(f"{prefix}.post_ffw_norm.weight"), cfg.norm_eps, kernels)
        self.wo = self.attn.wo if self.attn is not None else w.linear(f"{prefix}.attn_output")
        self.glue = kernels if cfg.fits_c_block and getattr(self.attn.wqkv if self.attn is not None else None, "multi",
                                                             None) is not None else None
        if cfg.moe:  # this machine's experts, whole; the router, whole
            first, end = w.slices.ffn_at[w.rank], w.slices.ffn_at[w.rank + 1]
            self.ffn = _Experts(cfg, w, prefix, range(first, end))
        else:
            self.ffn = FeedForward(w, prefix, gelu=cfg.gelu_ffn)

    def post(self, norm: RMSNorm | None, out: torch.Tensor) -> torch.Tensor:
        """A branch's output as the residual adds it (gemma3's post-norms; else as it is)."""
        return norm(out) if norm is not None else out


class _Experts(MixtureOfExperts):
    """A machine's experts of a mixture (the others are other machines'), with the whole router."""

    def __init__(self, cfg: ModelConfig, w: SliceWeights, prefix: str, mine: range):
        torch.nn.Module.__init__(self)
        self.cfg, self.mine = cfg, mine
        self.register_buffer("router", w.vector(f"{prefix}.ffn_gate_inp.weight"), persistent=False)
        self.experts = torch.nn.ModuleDict({str(e): FeedForward(w, prefix, e) for e in mine})

    def run_expert(self, e: int, rows: torch.Tensor, hit: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.experts[str(e)](rows[hit].unsqueeze(0))[0] * weight


class TensorSlice:
    """One machine's slice of every layer, its KV caches by slot, and the step it runs with the
    group. The host's slice (rank 0) also embeds; every slice ends with its LM-head rows."""

    def __init__(self, weights: SliceWeights, *, max_tokens: int, timeout_ms: int = 30_000):
        cfg, s, r = weights.config, weights.slices, weights.rank
        self.cfg, self.slices, self.rank, self.max_tokens = cfg, s, r, max_tokens
        self.timeout_ms = timeout_ms  # an exchange that makes no progress this long fails
        self.kernels = kernels = weights.kernels
        if kernels is None or not kernels.tensor_parallel:
            raise ConfigError("tensor parallelism needs this machine's compiled kernels (a C compiler)")
        group = cfg.n_heads // cfg.n_kv_heads
        self.n_kv = s.kv_at[r + 1] - s.kv_at[r]
        heads_at = [kv * group * cfg.head_dim for kv in s.kv_at]
        ffn = s.ffn_at[r + 1] - s.ffn_at[r]
        self.programs: list[TensorBlockProgram] = []
        self.blocks: list[SliceBlock] = []
        mine = replace(cfg, n_heads=self.n_kv * group, n_kv_heads=self.n_kv) if self.n_kv else None
        for i in range(cfg.n_layers):
            block = SliceBlock(cfg, mine, weights, i)
            self.blocks.append(block)
            if cfg.moe or not cfg.fits_c_block:  # no C block (torch_layers): a mixture, gemma3
                if self.n_kv and getattr(block.attn.wqkv, "multi", None) is None:
                    raise ConfigError("tensor parallelism needs every matrix of a block quantized (GGUF blocks)")
                continue
            qkv = None
            if block.attn is not None:
                qkv, bias = block.attn.wqkv.multi, block.attn.wqkv.bias
            else:
                bias = None
            gate_up = block.ffn.gate_up.multi
            wo, down = (_one_call(m) for m in (block.wo, block.ffn.down))
            if (self.n_kv and qkv is None) or gate_up is None or wo is None or down is None:
                raise ConfigError("tensor parallelism needs every matrix of a block quantized (GGUF blocks)")
            attn = block.attn
            self.programs.append(TensorBlockProgram(
                kernels, dim=cfg.dim, n_heads=self.n_kv * group, n_kv=self.n_kv, head_dim=cfg.head_dim, ffn=ffn,
                eps=cfg.norm_eps, attn_norm=block.attn_norm.weight, ffn_norm=block.ffn_norm.weight,
                q_norm=attn.q_norm.weight if attn is not None and attn.q_norm is not None else None,
                k_norm=attn.k_norm.weight if attn is not None and attn.k_norm is not None else None, qkv_bias=bias, qkv=qkv, wo=wo, gate_up=gate_up, down=down, rank=r,
                heads_at=heads_at, dim_at=list(s.dim_at), ffn_at=list(s.ffn_at), timeout_ms=timeout_ms))
        self.norm = RMSNorm(weights.vector("output_norm.weight"), cfg.norm_eps)
        self.head = weights.head_slice()
        self.embed = weights.embedding() if r == 0 else None
        if self.embed is not None and cfg.scale_embeddings:
            self.embed = ScaledEmbedding(self.embed, cfg.dim)
        self.cos, self.sin = model_rope(cfg, weights, max_tokens)
        local = local_rope(cfg, max_tokens) if cfg.sliding_window else (self.cos, self.sin)
        self.ropes = [local if cfg.window(i) else (self.cos, self.sin) for i in range(cfg.n_layers)]
        self.caches: dict[int, KVCache] = {}
        self.heads_at = heads_at

    def cache(self, slot: int) -> KVCache:
        cache = self.caches.get(slot)
        if cache is None:
            cache = self.caches[slot] = KVCache(self.cfg.n_layers, self.n_kv, self.cfg.head_dim, self.max_tokens,
                                                windows=[self.cfg.window(i) for i in range(self.cfg.n_layers)])
        return cache

    def run(self, mesh: Mesh | None, x: torch.Tensor, slots: Sequence[int], positions: Sequence[int]) -> None:
        """A step's rows through every layer, in place: one session's prompt (one slot, several
        consecutive rows) by `prompt`, anything else (decode rows) by `layers`. Every machine
        of the group sees the same rows and takes the same path."""
        first = positions[0]
        if len(slots) > 1 and len(set(slots)) == 1 and list(positions) == list(range(first, first + len(slots))):
            self.prompt(mesh, x, slots[0], first)
        elif self.cfg.moe or not self.cfg.fits_c_block:
            self.torch_layers(mesh, x, slots, positions)
        else:
            self.layers(mesh, x, slots, positions)

    def layers(self, mesh: Mesh | None, x: torch.Tensor, slots: Sequence[int], positions: Sequence[int]) -> None:
        """x [M, dim] through every layer, in place; row r at positions[r] of slot slots[r]'s
        cache (rows of one slot at consecutive positions: a prompt). A machine without heads
        keeps no cache."""
        if any(not 0 <= p < self.max_tokens for p in positions):
            raise ValueError(f"positions {list(positions)} outside this group's {self.max_tokens}")
        ends: dict[int, int] = {}
        for slot, pos in zip(slots, positions):
            ends[slot] = max(ends.get(slot, 0), pos + 1)
            if self.n_kv:
                self.cache(slot)
        kv = None
        if self.n_kv:
            kv = []
            for layer in range(self.cfg.n_layers):
                views = {slot: self.caches[slot].layer(layer, end) for slot, end in ends.items()}
                kv.append([views[slot] for slot in slots])
        with torch.inference_mode():
            tp_forward(self.programs, mesh, x, kv, list(positions), self.cos, self.sin)

    def prompt(self, mesh: Mesh | None, x: torch.Tensor, slot: int, pos: int) -> None:
        """One session's S prompt rows x [S, dim] at pos.., in place, through the same modules
        and kernels as one machine's Stage.forward (the GEMM path from DENSE_PREFILL_ROWS rows
        up; attention in C), with the four all-gathers a layer between them."""
        S = x.shape[0]
        if pos < 0 or pos + S > self.max_tokens:
            raise ValueError(f"{S} rows at {pos} outside this group's {self.max_tokens} positions")
        cache = self.cache(slot) if self.n_kv else None
        s, wait = self.slices, self.timeout_ms
        gather = (lambda t, at: mesh.allgather_rows(t, at, wait)) if mesh is not None else (lambda t, at: t)
        h = x.unsqueeze(0)
        with torch.inference_mode():
            for layer, block in enumerate(self.blocks):
                cos, sin = (t[pos:pos + S] for t in self.ropes[layer])
                if block.attn is not None:
                    q, k, v = block.attn.wqkv(block.attn_norm(h))
                    heads = block.attn._attend(q, k, v, cos, sin, cache, layer, pos)[0]
                else:
                    heads = torch.empty(S, 0)
                heads = gather(heads.contiguous(), self.heads_at)
                h = h + block.post(block.post_attn_norm, gather(block.wo(heads).contiguous(), list(s.dim_at))).unsqueeze(0)
                if self.cfg.moe:
                    h += self._experts(gather, block, block.ffn_norm(h)[0]).unsqueeze(0)
                    continue
                h += block.post(block.post_ffn_norm, self._ffn(gather, block, block.ffn_norm(h))[0]).unsqueeze(0)
            x.copy_(h[0])

    def _ffn(self, gather, block: SliceBlock, f: torch.Tensor) -> torch.Tensor:
        """The FFN of normed rows f [1, S, dim] (one machine's FeedForward, its columns here):
        the activation's columns gathered, then down's rows gathered -> [1, S, dim]."""
        s = self.slices
        if block.ffn.gelu:
            act = block.ffn.geglu_hidden(f)
        else:
            act = block.ffn.gate_up.swiglu(f)
            if act is None:
                gate, up = block.ffn.gate_up(f)
                act = torch.nn.functional.silu(gate).mul_(up)
        act = gather(act[0].contiguous(), list(s.ffn_at))
        return gather(block.ffn.down(act).contiguous(), list(s.dim_at)).unsqueeze(0)

    def torch_layers(self, mesh: Mesh | None, x: torch.Tensor, slots: Sequence[int], positions: Sequence[int]) -> None:
        """Decode rows x [M, dim] through every layer, in place, for blocks decode.c has no
        program for (a mixture, gemma3): each row's attention on this machine's heads as one
        machine's decode runs it (attend_row, the C glue; gemma3: torch's), the heads and wo's
        rows gathered, then the experts (_experts) or the FFN a row at a time (_ffn), as one
        machine takes each session's row alone."""
        if any(not 0 <= p < self.max_tokens for p in positions):
            raise ValueError(f"positions {list(positions)} outside this group's {self.max_tokens}")
        s, wait = self.slices, self.timeout_ms
        gather = (lambda t, at: mesh.allgather_rows(t, at, wait)) if mesh is not None else (lambda t, at: t)
        M = x.shape[0]
        with torch.inference_mode():
            for layer, block in enumerate(self.blocks):
                cos, sin = self.ropes[layer]
                if block.attn is not None:
                    heads = torch.cat([self._heads(block, x[r:r + 1], cos[p:p + 1], sin[p:p + 1], self.cache(slot),
                                                   layer, p) for r, (slot, p) in enumerate(zip(slots, positions))])
                else:
                    heads = torch.empty(M, 0)
                heads = gather(heads.contiguous(), self.heads_at)
                out = torch.cat([block.wo.forward(heads[r:r + 1]) for r in range(M)])  # as one machine: a row a call
                x += block.post(block.post_attn_norm, gather(out.contiguous(), list(s.dim_at)))
                if self.cfg.moe:
                    x += self._experts(gather, block, block.ffn_norm(x))
                    continue
                f = block.ffn_norm(x)
                x += block.post(block.post_ffn_norm, torch.cat([self._ffn(gather, block, f[r:r + 1].unsqueeze(0))[0]
                                                                for r in range(M)]))

    def _heads(self, block: SliceBlock, row: torch.Tensor, cos, sin, cache: KVCache, layer: int, pos: int):
        """One row's attention on this machine's heads, before wo: [1, its heads * head_dim]."""
        if block.glue is not None:
            return attend_row(block.attn, block.glue, block.attn_norm, row, cos, sin, cache, layer, pos)
        q, k, v = block.attn.wqkv(block.attn_norm(row.unsqueeze(0)))
        return block.attn._attend(q, k, v, cos, sin, cache, layer, pos)[0]

    def _experts(self, gather, block: SliceBlock, rows: torch.Tensor) -> torch.Tensor:
        """A mixture's FFN over rows [N, dim] (normed): the router on every machine; this
        machine's experts on the rows that chose them; one all-gather of every weighted expert
        output (in expert order, so each machine's are together); the sum in expert order."""
        experts: _Experts = block.ffn
        weights, chosen = experts.route(rows)
        hits = list(expert_rows(chosen))
        s, r, D = self.slices, self.rank, self.cfg.dim
        mine = [experts.run_expert(e, rows, hit, weights[hit, slot, None]) for e, hit, slot in hits
                if experts.mine.start <= e < experts.mine.stop]
        counts = [0] * s.ranks
        for e, hit, _ in hits:
            counts[next(q for q in range(s.ranks) if s.ffn_at[q] <= e < s.ffn_at[q + 1])] += hit.numel()
        at = _spans(counts, D)
        flat = torch.cat([y.reshape(-1) for y in mine]) if mine else torch.empty(0)
        every = gather(flat.reshape(1, -1).contiguous(), list(at)).reshape(-1, D)
        parts, start = [], 0
        for _, hit, _ in hits:
            parts.append((hit, every[start:start + hit.numel()]))
            start += hit.numel()
        return sum_experts(rows.shape[0], D, parts)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, dim] -> this machine's vocabulary rows of the logits [R, its rows]."""
        with torch.inference_mode():
            return self.head(self.norm(x))


def _candidates(logits: torch.Tensor, start: int, flags: int) -> torch.Tensor:
    """[R, n] logits of vocabulary rows start.. -> what goes back to the host: [R, 2 k] float64
    (values, then their vocabulary ids), k = TOP_CANDIDATES (or every row with ALL_LOGITS)."""
    k = logits.shape[1] if flags & ALL_LOGITS else min(TOP_CANDIDATES, logits.shape[1])
    values, ids = logits.topk(k, dim=1, sorted=False) if k < logits.shape[1] else (
        logits, torch.arange(logits.shape[1]).expand_as(logits))
    return torch.cat([values.double(), (ids + start).double()], dim=1).contiguous()


class TensorWorker:
    """A machine of the group other than the first: runs the steps the first sends until it
    says stop or the mesh fails (`error` says why)."""

    def __init__(self, part: TensorSlice, mesh: Mesh):
        self.part, self.mesh = part, mesh
        self.error: Exception | None = None
        self.steps = 0

    def serve(self) -> None:
        part, mesh = self.part, self.mesh
        D = part.cfg.dim
        try:
            while True:
                head = torch.zeros(4, dtype=torch.int64)
                mesh.exchange({}, {0: head})
                kind, m, flags, arg = (int(v) for v in head)
                if kind == STOP:
                    return
                if kind == DROP:
                    part.caches.pop(arg, None)
                    continue
                if kind != STEP or not 1 <= m <= PREFILL_ROWS:
                    raise ExchangeError(f"a step of kind {kind} with {m} rows", 0, -4)
                rows = torch.zeros(m, 3, dtype=torch.int64)
                x = torch.zeros(m, D)
                mesh.exchange({}, {0: rows}, part.timeout_ms)
                mesh.exchange({}, {0: x}, part.timeout_ms)
                slots, positions, want = rows[:, 0].tolist(), rows[:, 1].tolist(), rows[:, 2].tolist()
                if any(not 0 <= s < MAX_SLOTS for s in slots) or any(w not in (0, 1) for w in want):
                    raise ExchangeError(f"a step with slots {slots[:4]}.. or flags outside their range", 0, -4)
                part.run(mesh, x, slots, positions)
                out = [r for r in range(m) if want[r]]
                if out:
                    cand = _candidates(part.logits(x[out]), part.slices.vocab_at[part.rank], flags)
                    mesh.exchange({0: cand}, {}, part.timeout_ms)
                self.steps += 1
        except Exception as err:  # noqa: BLE001 - the owner reads it and re-plans
            self.error = err


class TensorGroup:
    """The first machine of a tensor-parallel group, as the token loop sees it: one stage
    holding every layer (start 0, end n_layers) that takes ids and gives logits. The logits of
    each row are the best TOP_CANDIDATES of every machine's vocabulary rows (the rest -inf):
    greedy decoding and top-k up to that many are exactly one machine's."""

    def __init__(self, part: TensorSlice, mesh: Mesh | None):
        assert part.rank == 0 and part.embed is not None
        self.part, self.mesh = part, mesh
        self.cfg = part.cfg
        self.start, self.end = 0, part.cfg.n_layers
        self._slots: dict[str, int] = {}
        self._lock = threading.Lock()  # one step at a time over the mesh

    def _slot(self, session: str) -> int:
        slot = self._slots.get(session)
        if slot is None:
            free = sorted(set(range(MAX_SLOTS)) - set(self._slots.values()))
            if not free:
                raise RuntimeError(f"a tensor-parallel group holds at most {MAX_SLOTS} sessions; drop one first")
            slot = self._slots[session] = free[0]
        return slot

    def _step(self, ids: torch.Tensor, slots: list[int], positions: list[int], want: list[int],
              flags: int = 0) -> torch.Tensor:
        """Rows through the group; logits [rows that want them, vocab]."""
        part, mesh, m = self.part, self.mesh, len(slots)
        peers = range(1, self.mesh.n) if mesh is not None else range(0)
        with torch.inference_mode():
            x = part.embed(ids.view(m, 1)).reshape(m, -1).float().contiguous()
        rows = torch.tensor([[s, p, w] for s, p, w in zip(slots, positions, want)], dtype=torch.int64)
        if mesh is not None:
            head = torch.tensor([STEP, m, flags, 0], dtype=torch.int64)
            wait = part.timeout_ms
            mesh.exchange({p: head for p in peers}, {}, wait)
            mesh.exchange({p: rows for p in peers}, {}, wait)
            mesh.exchange({p: x for p in peers}, {}, wait)
        part.run(mesh, x, slots, positions)
        out = [r for r in range(m) if want[r]]
        if not out:
            return torch.empty(0, self.cfg.vocab_size)
        mine = _candidates(part.logits(x[out]), 0, flags)
        gathered = {0: mine}
        if mesh is not None:
            s = part.slices
            for p in peers:
                k = s.vocab_at[p + 1] - s.vocab_at[p] if flags & ALL_LOGITS else min(TOP_CANDIDATES,
                                                                                    s.vocab_at[p + 1] - s.vocab_at[p])
                gathered[p] = torch.empty(len(out), 2 * k, dtype=torch.float64)
            mesh.exchange({}, {p: gathered[p] for p in peers}, part.timeout_ms)
        logits = torch.full((len(out), self.cfg.vocab_size), -math.inf)
        for cand in gathered.values():
            k = cand.shape[1] // 2
            ids_ = cand[:, k:].long()
            if ids_.numel() and (ids_.min() < 0 or ids_.max() >= self.cfg.vocab_size):
                raise ExchangeError("a machine sent logits of ids outside the vocabulary", -1, -4)
            logits.scatter_(1, ids_, cand[:, :k].float())
        return logits

    # -- the stage interface of engine/generate.py --------------------------------------------
    def forward(self, session: str, x: torch.Tensor, pos: int, *, all_logits: bool = False) -> torch.Tensor:
        """x: ids [1, S] at pos.. -> logits [1, vocab] of the last ([1, S, vocab] with all_logits)."""
        ids = x.reshape(-1)
        slot = self._slot(session)
        out = []
        with self._lock:
            for a in range(0, ids.numel(), PREFILL_ROWS):
                chunk = ids[a:a + PREFILL_ROWS]
                n = chunk.numel()
                want = [1] * n if all_logits else [int(a + r == ids.numel() - 1) for r in range(n)]
                logits = self._step(chunk, [slot] * n, list(range(pos + a, pos + a + n)), want,
                                    ALL_LOGITS if all_logits else 0)
                if logits.shape[0]:
                    out.append(logits)
        logits = torch.cat(out)
        return logits.unsqueeze(0) if all_logits else logits[-1:].reshape(1, -1)

    def forward_batch(self, sessions: Sequence[str], x: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """One new token for each session: ids [M] -> logits [M, vocab]."""
        slots = [self._slot(s) for s in sessions]
        with self._lock:
            return self._step(x.reshape(-1), slots, list(positions), [1] * len(slots))

    def drop(self, session: str) -> None:
        slot = self._slots.pop(session, None)
        if slot is None:
            return
        with self._lock:
            self.part.caches.pop(slot, None)
            if self.mesh is not None:
                head = torch.tensor([DROP, 0, 0, slot], dtype=torch.int64)
                self.mesh.exchange({p: head for p in range(1, self.mesh.n)}, {}, self.part.timeout_ms)

    def close(self) -> None:
        """Tell the other machines to stop (they return from TensorWorker.serve)."""
        if self.mesh is not None and self.mesh.ptr:
            try:
                head = torch.tensor([STOP, 0, 0, 0], dtype=torch.int64)
                self.mesh.exchange({p: head for p in range(1, self.mesh.n)}, {}, timeout_ms=2000)
            except ExchangeError:
                pass
