"""Typed settings: configs/*.toml < user config < environment < flags.

Paths follow XDG unless FASTSERVE_HOME moves everything (tests point it at a tmp dir):
    cache   $FASTSERVE_HOME/cache   or $XDG_CACHE_HOME/fastserve   (~/.cache/fastserve)
    config  $FASTSERVE_HOME/config  or $XDG_CONFIG_HOME/fastserve  (~/.config/fastserve)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fastserve_edge.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Paths:
    cache: Path   # models/, later shard caches
    config: Path  # config.toml, models.toml overrides, cluster token

    @property
    def models(self) -> Path:
        return self.cache / "models"

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str] | None = None) -> Paths:
        env = os.environ if env is None else env
        home = env.get("FASTSERVE_HOME")
        if home:
            root = Path(home).expanduser()
            return cls(cache=root / "cache", config=root / "config")
        xdg_cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        xdg_config = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return cls(cache=xdg_cache / "fastserve", config=xdg_config / "fastserve")


@dataclass(frozen=True)
class ChatDefaults:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int = 512
    max_ctx: int = 4096


@dataclass(frozen=True)
class ClusterSettings:
    # a peer's on-disk layer cache (shard_cache.DEFAULT_QUOTA_BYTES says why 32 GiB); when full,
    # the least recently used parts go
    shard_cache_bytes: int = 32 << 30


@dataclass(frozen=True)
class Settings:
    paths: Paths
    chat: ChatDefaults = field(default_factory=ChatDefaults)
    default_model: str = "smollm2-135m"
    cluster: ClusterSettings = field(default_factory=ClusterSettings)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML ({err}); fix or delete it") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _chat_defaults(table: dict[str, Any], source: str) -> ChatDefaults:
    known = {f.name: f.type for f in fields(ChatDefaults)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown setting [chat].{key} in {source}; known: {', '.join(known)}")
        cast = float if known[key] == "float" else int
        try:
            kwargs[key] = cast(value)
        except (TypeError, ValueError):
            raise ConfigError(f"[chat].{key} in {source} must be a number, got {value!r}") from None
    return ChatDefaults(**kwargs)


def _cluster_settings(table: dict[str, Any], source: str) -> ClusterSettings:
    from fastserve_edge.cluster.profile import SIZE_FORMS, parse_size  # one grammar for sizes, with --max-memory

    known = [f.name for f in fields(ClusterSettings)]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown setting [cluster].{key} in {source}; known: {', '.join(known)}")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"[cluster].{key} in {source} must be a size ({SIZE_FORMS}), got {value!r}")
        try:
            kwargs[key] = parse_size(str(value))
        except ConfigError as err:
            raise ConfigError(f"[cluster].{key} in {source}: {err}") from None
    return ClusterSettings(**kwargs)


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    paths = Paths.from_env(env)
    data = _merge(_read_toml(REPO_CONFIGS / "default.toml"), _read_toml(paths.config / "config.toml"))
    chat = dict(data.get("chat", {}))
    for key in (f.name for f in fields(ChatDefaults)):
        env_value = env.get(f"FASTSERVE_{key.upper()}")
        if env_value is not None:
            chat[key] = env_value
    default_model = env.get("FASTSERVE_MODEL") or data.get("models", {}).get("default", "smollm2-135m")
    cluster = dict(data.get("cluster", {}))
    for key in (f.name for f in fields(ClusterSettings)):
        env_value = env.get(f"FASTSERVE_{key.upper()}")
        if env_value is not None:
            cluster[key] = env_value
    return Settings(paths=paths, chat=_chat_defaults(chat, "configuration"), default_model=default_model,
                    cluster=_cluster_settings(cluster, "configuration"))


def model_aliases(paths: Paths) -> dict[str, dict[str, Any]]:
    """configs/models.toml, overlaid by the user's own models.toml."""
    return _merge(_read_toml(REPO_CONFIGS / "models.toml"), _read_toml(paths.config / "models.toml"))
