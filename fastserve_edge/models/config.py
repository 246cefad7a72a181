"""What a model IS, as the engine needs it: one frozen dataclass, no file formats."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3")
MAX_EXPERTS = 1024        # Qwen3-235B-A22B: 128; DeepSeek-V3: 256
# Bounds on what a config may say (it arrives from model files and from other machines, and
# sizes allocations and C loops): far above any model these families ship (Llama 3.1 405B:
# 126 layers, dim 16384, ffn 53248; Qwen2: 152k vocabulary; 128k context).
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20       # dim, ffn_dim, n_heads * head_dim
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24
_ZERO_MEANS_NONE = ("sliding_window", "sliding_pattern")  # checked on their own (0 allowed)
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+\.(?:weight|bias))")
_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight")
MOE_FIELDS = ("n_experts", "n_experts_used", "expert_ffn_dim")  # 0 on a dense model


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 "llama3" frequency scaling (the only kind these families ship with)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192

    def __post_init__(self) -> None:
        numbers = (self.factor, self.low_freq_factor, self.high_freq_factor, self.original_context_length)
        if not (all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in numbers)
                and self.high_freq_factor > self.low_freq_factor):
            raise ValueError(f"rope scaling {self} is not llama3's (positive factors, high above low)")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # "llama" (Mixtral too) | "qwen2" | "qwen3" | "qwen3moe" | "gemma3"
    n_layers: int
    dim: int                  # hidden size D
    n_heads: int
    n_kv_heads: int           # < n_heads: grouped-query attention
    head_dim: int             # usually D // n_heads; qwen3 sets it explicitly
    ffn_dim: int              # SwiGLU inner size (a mixture-of-experts model: its dense size, unused)
    vocab_size: int
    context_length: int       # what the model was trained for; --ctx is capped by it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False  # no output.weight: the head reuses token_embd
    attn_bias: bool = False       # qwen2: q/k/v projections carry a bias
    qk_norm: bool = False         # qwen3: RMSNorm over each head of q and k before rope
    name: str = ""
    # mixture of experts (qwen3moe, Mixtral): every block's FFN is n_experts SwiGLUs of
    # expert_ffn_dim, of which a router picks n_experts_used per token; 0 = a dense FFN
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_dim: int = 0
    norm_topk: bool = True        # the chosen experts' router weights renormalized to sum to 1
    # gemma3 (each a flag, so the engine asks for a piece, never for an architecture):
    post_norms: bool = False      # RMSNorm on the attention and FFN outputs before each residual add
    gelu_ffn: bool = False        # GeGLU: gelu (tanh approximation) where SwiGLU has silu
    scale_embeddings: bool = False  # embedding rows times sqrt(dim) (the tied head reads them unscaled)
    query_pre_attn_scalar: float | None = None  # scores scaled by its ** -0.5; None: head_dim's
    sliding_window: int = 0       # > 0: local layers attend to this many positions (their own included)
    sliding_pattern: int = 0      # with sliding_window: layer i is global when (i + 1) % pattern == 0
    rope_local_theta: float = 10000.0  # rope base of the local layers (rope_theta: the global ones')
    rope_linear_factor: float = 1.0    # global layers: positions divided by it (Gemma 3 4B+: 8)

    def __post_init__(self) -> None:
        """ValueError for a config no model can have: every size feeds allocations and C loops."""
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and f.name not in _ZERO_MEANS_NONE and not (
                    isinstance(value, Integral) and not isinstance(value, bool)
                    and (value > 0 or (value == 0 and f.name in MOE_FIELDS))):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
            if f.type == "float" and not (isinstance(value, Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"{f.name} must be a positive finite number, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rope, got {self.head_dim}")
        if self.n_layers > MAX_LAYERS or self.vocab_size > MAX_VOCAB or self.context_length > MAX_CONTEXT:
            raise ValueError(f"{self.n_layers} layers, a vocabulary of {self.vocab_size} or a context of "
                             f"{self.context_length} is beyond any model this supports")
        if max(self.dim, self.ffn_dim, self.n_heads * self.head_dim) > MAX_WIDTH:
            raise ValueError(f"dim {self.dim}, ffn_dim {self.ffn_dim} or {self.n_heads} heads of {self.head_dim} "
                             "is beyond any model this supports")
        if self.n_heads > self.dim or self.head_dim > self.dim * 4:
            raise ValueError(f"{self.n_heads} heads of {self.head_dim} do not fit a model of dim {self.dim}")
        if not isinstance(self.name, str) or not isinstance(self.rope_scaling, (RopeScaling, type(None))):
            raise ValueError("name must be a string and rope_scaling a RopeScaling")
        if self.n_experts or self.n_experts_used or self.expert_ffn_dim:
            if not (0 < self.n_experts_used <= self.n_experts <= MAX_EXPERTS and 0 < self.expert_ffn_dim <= MAX_WIDTH):
                raise ValueError(f"{self.n_experts_used} of {self.n_experts} experts of {self.expert_ffn_dim} is no "
                                 f"mixture of experts this supports (1 <= used <= experts <= {MAX_EXPERTS})")
        elif self.arch == "qwen3moe":
            raise ValueError("a qwen3moe model needs its expert counts and sizes")

    @property
    def moe(self) -> bool:
        return self.n_experts > 0
        for flag in ("tie_embeddings", "attn_bias", "qk_norm", "post_norms", "gelu_ffn", "scale_embeddings"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        for name in ("sliding_window", "sliding_pattern"):
            value = getattr(self, name)
            if not (isinstance(value, Integral) and not isinstance(value, bool) and 0 <= value <= MAX_CONTEXT):
                raise ValueError(f"{name} must be an integer from 0 to {MAX_CONTEXT}, got {value!r}")
        if self.sliding_window and not self.sliding_pattern:
            raise ValueError(f"a sliding window of {self.sliding_window} needs a sliding_pattern (6 in Gemma 3)")
        scalar = self.query_pre_attn_scalar
        if scalar is not None and not (isinstance(scalar, Real) and not isinstance(scalar, bool)
                                       and math.isfinite(scalar) and scalar > 0):
            raise ValueError(f"query_pre_attn_scalar must be a positive finite number, got {scalar!r}")
        if self.rope_linear_factor != 1.0 and self.rope_scaling is not None:
            raise ValueError("rope scaling is either llama3's or linear, not both")

    @property
    def fits_c_block(self) -> bool:
        """The block is the one kernels/decode.c implements (llama/qwen: SwiGLU, two norms,
        1/sqrt(head_dim), every layer global). Otherwise blocks run through torch only."""
        return not (self.post_norms or self.gelu_ffn or self.sliding_window or self.query_pre_attn_scalar is not None)

    def window(self, layer: int) -> int:
        """Positions layer `layer` attends to (its own included); 0: all of them (global)."""
        if self.sliding_window and (layer + 1) % self.sliding_pattern:
            return self.sliding_window
        return 0

    def weight_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape (torch order: [out, in]) this config gives the tensor `name` (canonical
        GGUF name); None for a name the decoder does not read."""
        D, F, hd = self.dim, self.ffn_dim, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        if self.moe and (e := _EXPERT_TENSOR.fullmatch(name)):  # one expert of a block (our own name)
            if int(e[1]) >= self.n_layers or int(e[3]) >= self.n_experts:
                return None
            Fe = self.expert_ffn_dim
            return (D, Fe) if e[2] == "ffn_down" else (Fe, D)
        top = {"token_embd.weight": (self.vocab_size, D), "output.weight": (self.vocab_size, D),
               "output_norm.weight": (D,), "rope_freqs.weight": (hd // 2,)}
        if name in top:
            return top[name]
        m = _BLOCK_TENSOR.fullmatch(name)
        if m is None or int(m[1]) >= self.n_layers:
            return None
        return {
            "attn_norm.weight": (D,), "ffn_norm.weight": (D,),
            "post_attention_norm.weight": (D,), "post_ffw_norm.weight": (D,),
            "attn_q.weight": (q, D), "attn_k.weight": (kv, D), "attn_v.weight": (kv, D),
            "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
            "attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,),
            "attn_output.weight": (D, q),
            **({"ffn_gate.weight": (F, D), "ffn_up.weight": (F, D), "ffn_down.weight": (D, F)} if not self.moe else {
                "ffn_gate_inp.weight": (self.n_experts, D),  # the router
                # as a GGUF file holds them: every expert of the block in one tensor
                "ffn_gate_exps.weight": (self.n_experts, self.expert_ffn_dim, D),
                "ffn_up_exps.weight": (self.n_experts, self.expert_ffn_dim, D),
                "ffn_down_exps.weight": (self.n_experts, D, self.expert_ffn_dim)}),
        }.get(m[2])

    def to_dict(self) -> dict:
        """Plain JSON-able fields (the config travels to peers with their stage)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of to_dict; unknown or missing fields raise TypeError/ValueError."""
        data = dict(data)
        if data.get("rope_scaling") is not None:
            if not isinstance(data["rope_scaling"], dict):
                raise TypeError(f"rope_scaling must be an object, got {data['rope_scaling']!r}")
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)
