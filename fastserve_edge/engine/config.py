"""What a model IS, as the engine needs it: one frozen dataclass, no file formats."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 "llama3" frequency scaling (the only kind these families ship with)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # "llama" | "qwen2" | "qwen3"
    n_layers: int
    dim: int                  # hidden size D
    n_heads: int
    n_kv_heads: int           # < n_heads: grouped-query attention
    head_dim: int             # usually D // n_heads; qwen3 sets it explicitly
    ffn_dim: int              # SwiGLU inner size
    vocab_size: int
    context_length: int       # what the model was trained for; --ctx is capped by it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False  # no output.weight: the head reuses token_embd
    attn_bias: bool = False       # qwen2: q/k/v projections carry a bias
    qk_norm: bool = False         # qwen3: RMSNorm over each head of q and k before rope
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}")
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"

    def to_dict(self) -> dict:
        """Plain JSON-able fields (the config travels to peers with their stage)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of to_dict; unknown or missing fields raise TypeError/ValueError."""
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)
