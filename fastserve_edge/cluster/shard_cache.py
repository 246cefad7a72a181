"""Weights by the layer: what a stage needs, their hashes, and a peer's cache on disk.

A model is cut into *parts*: `layer.N` (every `blk.N.*` tensor), `embed` (the token
embedding, always on the host), `head` (final norm + output matrix, or the embedding again
when tied) and `common` (what every stage reads, e.g. llama3's rope_freqs). The host hashes
every tensor once (cached by file size and mtime) into a Manifest; the model digest is the
hash of that manifest, so a peer's cache is keyed by content, not by file name.

On a peer, `ShardCache` keeps each part as one safetensors file under
`<cache>/shards/<digest>/<part>.safetensors`, written only after every tensor matched its
manifest hash. A stage built later from the same parts reads them from disk: no transfer.
Either way the tensors a peer gets are read-only maps of that file, as a host's are of its
GGUF: the engine's copies (the x8 repacking, quant.py) then replace file pages in memory.

The cache holds at most `quota_bytes` ([cluster] shard_cache_bytes). Storing a part that
would go over evicts the least recently used parts, other models' before this one's, never
the parts the caller protects (the stage being loaded). Recency is the part file's mtime,
set on every store and load: no index to keep in step, nothing torn by a crash.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastserve_edge.cluster.wire import WireError, pack_tensors, sha256_of, unpack_tensors
from fastserve_edge.models.config import ModelConfig
from fastserve_edge.engine.quant import runtime_nbytes
from fastserve_edge.models.registry import temp_is_stale, write_atomic, write_temp
from fastserve_edge.models.tensors import ModelSource, RawTensor

MANIFEST_VERSION = 1
# A peer's share of a few models: a 70B Q4_0 is ~40 GB, a quarter of it per peer of four. A
# fixed number rather than a share of the free disk, which would shrink at every start as the
# cache itself fills the disk. Settings: [cluster] shard_cache_bytes.
DEFAULT_QUOTA_BYTES = 32 << 30
QUOTA_SETTING = "[cluster] shard_cache_bytes in config.toml (or FASTSERVE_SHARD_CACHE_BYTES)"
LOCK_FILE = ".lock"


def part_of_layer(layer: int) -> str:
    return f"layer.{layer}"


def parts_for_stage(config: ModelConfig, start: int, end: int) -> list[str]:
    """The parts a stage holding layers [start, end) needs (the host's embedding is not one:
    a peer stage never embeds)."""
    parts = ["common"] + [part_of_layer(i) for i in range(start, end)]
    if end == config.n_layers:
        parts.append("head")
    return parts


def _part_names(config: ModelConfig, names: Iterable[str]) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {"common": [], "embed": [], "head": []}
    for name in sorted(names):
        if name.startswith("blk."):
            parts.setdefault(part_of_layer(int(name.split(".")[1])), []).append(name)
        elif name == "token_embd.weight":
            parts["embed"].append(name)
            if config.tie_embeddings:
                parts["head"].append(name)
        elif name.startswith("output"):
            parts["head"].append(name)
        else:
            parts["common"].append(name)
    return parts


@dataclass(frozen=True)
class Manifest:
    digest: str                             # sha256 over every (part, name, hash): the model's identity
    parts: dict[str, dict[str, str]]        # part -> tensor name -> sha256
    part_bytes: dict[str, int]              # part -> bytes of its tensors (what a transfer costs)
    runtime_bytes: dict[str, int]           # part -> bytes once loaded (what a machine must hold)

    def to_json(self) -> str:
        return json.dumps({"version": MANIFEST_VERSION, "digest": self.digest, "parts": self.parts,
                           "part_bytes": self.part_bytes, "runtime_bytes": self.runtime_bytes}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError("manifest version differs")
        sizes = {key: {k: int(v) for k, v in data[key].items()} for key in ("part_bytes", "runtime_bytes")}
        return cls(data["digest"], data["parts"], sizes["part_bytes"], sizes["runtime_bytes"])


def _digest(parts: dict[str, dict[str, str]]) -> str:
    h = hashlib.sha256()
    for part in sorted(parts):
        for name, sha in sorted(parts[part].items()):
            h.update(f"{part}\0{name}\0{sha}\n".encode())
    return h.hexdigest()


def build_manifest(source: ModelSource, model_file: Path, cache_dir: Path) -> Manifest:
    """Hash every tensor of `source` once; reuse the result while the file is unchanged."""
    st = os.stat(model_file)
    key = hashlib.sha256(f"{Path(model_file).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir / "manifests" / f"{key}.json"
    try:
        return Manifest.from_json(cached.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    parts: dict[str, dict[str, str]] = {}
    part_bytes: dict[str, int] = {}
    runtime_bytes: dict[str, int] = {}
    hashes: dict[str, tuple[str, int, int]] = {}
    for part, names in _part_names(source.config, source.names()).items():
        parts[part] = {}
        part_bytes[part] = runtime_bytes[part] = 0
        for name in names:
            if name not in hashes:
                raw = source.tensor(name)
                hashes[name] = (sha256_of(raw), raw.nbytes, runtime_nbytes(raw))
            parts[part][name], size, runtime = hashes[name]
            part_bytes[part] += size
            runtime_bytes[part] += runtime
    manifest = Manifest(_digest(parts), parts, part_bytes, runtime_bytes)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cached, manifest.to_json().encode())
    return manifest


class ShardError(WireError):
    """Layer bytes that do not match the manifest (corrupt transfer, wrong model, bad peer)."""


def check_part(part: str, tensors: Sequence[RawTensor], expected: dict[str, str]) -> None:
    got = {t.name: t for t in tensors}
    if set(got) != set(expected):
        raise ShardError(f"part {part}: got tensors {sorted(got)}, the manifest lists {sorted(expected)}")
    for name, sha in expected.items():
        if sha256_of(got[name]) != sha:
            raise ShardError(f"part {part}: tensor {name} does not match its manifest hash (corrupt transfer?)")


class ShardCache:
    """A peer's per-part weight files, keyed by model digest, within a byte quota.

    Files: `<root>/<digest>/<part>.safetensors`; parts on their way in are hidden temporaries
    beside them (`.<part>.safetensors.pid<N>.<random>.tmp`) until renamed, so a reader sees a
    whole part or none. Their data is not fsynced: every load checks the tensor hashes, so a
    part torn by a power cut is a miss and is fetched again (commit 009cb40 dropped the fsync
    when peers began fetching 3 parts at once: bench/cluster.py's transfer went from 59% to
    83-91% of the namespace LAN's link).
    """

    def __init__(self, root: Path, *, quota_bytes: int = DEFAULT_QUOTA_BYTES):
        if quota_bytes <= 0:
            raise ShardError(f"the shard cache quota must be more than 0 bytes; set {QUOTA_SETTING}")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.sweep()

    def path(self, digest: str, part: str) -> Path:
        if not all(c in "0123456789abcdef" for c in digest) or "/" in part or part.startswith("."):
            raise ShardError(f"refusing a shard name that is not a plain digest/part: {digest!r}/{part!r}")
        return self.root / digest / f"{part}.safetensors"

    def sweep(self) -> list[Path]:
        """Remove the temporaries of writers that are gone (registry.temp_is_stale: the pid
        in the name is dead, or nothing was written for an hour) and empty model folders;
        return what was removed. A part another process is writing right now stays."""
        removed = []
        for path in self.root.glob("*/.*.tmp"):
            if temp_is_stale(path):
                path.unlink(missing_ok=True)
                removed.append(path)
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if folder.is_dir():
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    pass
        return removed

    def check_size(self, part: str, nbytes: int) -> None:
        """ShardError unless a part of nbytes can be cached at all: call it with a transfer's
        announced size before receiving it."""
        if nbytes > self.quota_bytes:
            raise ShardError(
                f"part {part} is {nbytes / 2**20:,.0f} MiB, more than the whole shard cache quota of "
                f"{self.quota_bytes / 2**20:,.0f} MiB; raise {QUOTA_SETTING}"
            )

    def load(self, digest: str, part: str, expected: dict[str, str]) -> list[RawTensor] | None:
        """The cached part, or None when missing or not matching `expected` (it is then removed)."""
        path = self.path(digest, part)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            tensors = unpack_tensors(blob)
            check_part(part, tensors, expected)
        except WireError:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass  # a read-only cache still serves its parts
        try:
            return _mapped(path, tensors)
        except OSError:
            return None  # evicted by another writer between the read and now

    def store(self, digest: str, part: str, blob: bytes, expected: dict[str, str], *,
              protect: Collection[str] = ()) -> list[RawTensor]:
        """Verify `blob` against the manifest, then keep it, evicting least recently used parts
        to stay within the quota: other models' first, then this model's, never `part` itself
        or the parts named in `protect` (this digest's parts the caller is loading).
        Raises ShardError on a mismatch, or when the quota cannot hold the part."""
        self.check_size(part, len(blob))  # before unpacking, which copies the blob
        tensors = unpack_tensors(blob)
        check_part(part, tensors, expected)
        path = self.path(digest, part)
        try:
            tmp = self._write_temp(path, blob)
        except OSError as err:
            where = "the disk is full" if err.errno == errno.ENOSPC else f"{err.strerror or err}"
            raise ShardError(f"could not write part {part} to {path.parent} ({where}); free disk space or "
                             f"lower {QUOTA_SETTING}") from None
        try:
            with self._locked():
                self._make_room(path, {self.path(digest, p) for p in (*protect, part)})
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return _mapped(path, tensors)

    def _write_temp(self, path: Path, blob: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return write_temp(path, blob, fsync=False)
        except FileNotFoundError:
            # the model's folder was removed as empty (a sweep, an eviction) after the mkdir;
            # with our temporary in it, it is not empty any more
            path.parent.mkdir(parents=True, exist_ok=True)
            return write_temp(path, blob, fsync=False)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One evicting writer at a time, across threads (each call opens its own file
        description) and processes; the kernel drops the lock of a process that dies."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _make_room(self, target: Path, keep: set[Path]) -> None:
        """Evict until everything on disk, temporaries being written included, fits the quota
        once `target`'s temporary has replaced `target`; evict nothing when that cannot be done."""
        used, parts = self._usage()
        if used - parts.get(target, (0, 0))[0] <= self.quota_bytes:
            return
        self.sweep()  # a crashed writer's leftovers go before anyone's parts
        used, parts = self._usage()
        used -= parts.pop(target, (0, 0))[0]
        digest = target.parent.name
        # other models' parts first, each model's least recently used first
        order = sorted((p for p in parts if p not in keep), key=lambda p: (p.parent.name == digest, parts[p][1]))
        victims = []
        for victim in order:
            if used <= self.quota_bytes:
                break
            victims.append(victim)
            used -= parts[victim][0]
        if used > self.quota_bytes:
            raise ShardError(
                f"the shard cache quota of {self.quota_bytes / 2**20:,.0f} MiB cannot hold part {target.stem} "
                f"of {target.parent.name[:12]}: this stage's parts and the transfers in progress alone take "
                f"{used / 2**20:,.0f} MiB; raise {QUOTA_SETTING}"
            )
        for victim in victims:
            victim.unlink(missing_ok=True)
            try:
                victim.parent.rmdir()
            except OSError:
                pass  # the model still has parts

    def _usage(self) -> tuple[int, dict[Path, tuple[int, int]]]:
        """(bytes of every file under root, {part file: (size, mtime_ns)})."""
        used, parts = 0, {}
        for path in self.root.glob("*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            used += st.st_size
            if path.suffix == ".safetensors" and not path.name.startswith("."):
                parts[path] = (st.st_size, st.st_mtime_ns)
        return used, parts


def _mapped(path: Path, tensors: list[RawTensor]) -> list[RawTensor]:
    """`tensors`, just read and checked from the part file at `path`, as read-only maps of
    that file: where the engine repacks a matrix it drops the file's pages (quant.py), so a
    peer holds one copy of its layers, not the blob's and the engine's."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = []
    for t in tensors:
        start, end = header[t.name]["data_offsets"]
        if not isinstance(t.data, np.ndarray) or end == start:  # torch tensors own their memory
            out.append(t)
            continue
        view = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size + start, shape=(end - start,))
        out.append(RawTensor(t.name, t.qtype, t.shape, view.view(t.data.dtype).reshape(t.data.shape)))
    return out


def part_blob(source: ModelSource, manifest: Manifest, part: str) -> bytes:
    """One part of the host's model as safetensors bytes (what FetchLayer streams)."""
    names = manifest.parts.get(part)
    if names is None:
        raise ShardError(f"this model has no part {part!r}")
    return pack_tensors([source.tensor(name) for name in sorted(names)])


class ShardSource:
    """A ModelSource over the parts a peer holds (the engine reads weights from it as from a file)."""

    def __init__(self, config: ModelConfig, tensors: Iterable[RawTensor]):
        self.config = config
        self._tensors = {t.name: t for t in tensors}

    def has(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def tensor(self, name: str) -> RawTensor:
        t = self._tensors.get(name)
        if t is None:
            raise ShardError(f"tensor {name} was not sent to this peer")
        return t

    def tokenizer(self):
        raise ShardError("a peer has no tokenizer: the host tokenizes")
