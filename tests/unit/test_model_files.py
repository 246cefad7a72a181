"""Reading model files: what we accept, and the one-line errors for what we do not."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from fastserve_edge.errors import ModelFormatError, ModelNotFound
from fastserve_edge.models import open_model
from fastserve_edge.models.gguf import GGUFModel
from tests import models_fixtures as mf

VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mf.write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", "llama", tensor_type="Q8_0", vocab_size=VOCAB)


def rewrite(src, dst, *, arch=None, drop=(), retype=None):
    """Copy a GGUF, changing its architecture, dropping tensors, or relabelling a tensor's type."""
    r = gguf.GGUFReader(src)
    meta = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    old_arch = meta["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch or old_arch)
    for key, field in meta.items():
        if key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key.replace(f"{old_arch}.", f"{arch or old_arch}."), field.contents(), vtype, sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        qtype = (retype or {}).get(t.name, t.tensor_type)
        data = np.array(t.data)
        if qtype != t.tensor_type:  # same byte count, another label
            size, bytes_ = gguf.GGML_QUANT_SIZES[qtype]
            cols, rows = (int(n) for n in t.shape.tolist())
            data = np.zeros((rows, cols // size * bytes_), dtype=np.uint8)
        w.add_tensor(t.name, data, raw_dtype=qtype if qtype != gguf.GGMLQuantizationType.F32 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_tiny_gguf_reads_into_a_config(tiny):
    m = open_model(tiny)
    assert isinstance(m, GGUFModel)
    c = m.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size) == ("llama", 2, 64, 4, 2, VOCAB)
    assert c.tie_embeddings and not c.attn_bias and not c.qk_norm
    assert m.quantization == "Q8_0"
    assert m.tensor("blk.0.attn_q.weight").shape == (64, 64)


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="no such model"):
        open_model(tmp_path / "missing.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 4096)
    with pytest.raises(ModelFormatError, match="not a readable GGUF"):
        open_model(bad)


@pytest.mark.parametrize("keep", [0.3, 0.95, 0.9999])
def test_truncated_gguf(tiny, tmp_path, keep):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFormatError, match="truncated|not a readable"):
        open_model(cut)


def test_header_reads_every_key_as_gguf_py_does(tiny):
    from fastserve_edge.models.gguf import open_reader

    ours = open_reader(tiny).metadata
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(tiny).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value, key
    assert len(ours["tokenizer.ggml.tokens"]) == VOCAB


def vocabulary_at(data: bytes) -> int:
    """Offset of the first token's u64 length in the tokens array (after key, type, item type, count)."""
    key = b"tokenizer.ggml.tokens"
    return data.index(key) + len(key) + 4 + 4 + 8


@pytest.mark.parametrize("where", ["inside the vocabulary", "a length past the end"])
def test_a_broken_vocabulary_is_a_format_error(tiny, tmp_path, where):
    data = bytearray(tiny.read_bytes())
    first = vocabulary_at(bytes(data))
    if where == "inside the vocabulary":
        data = data[: first + 8 * VOCAB]  # some hundred tokens in
    else:
        data[first:first + 8] = (len(data)).to_bytes(8, "little")  # the first token "longer than the file"
    bad = tmp_path / "vocab.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="truncated|not a readable"):
        open_model(bad)


def test_unknown_architecture_names_the_supported_ones(tiny, tmp_path):
    path = rewrite(tiny, tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ModelFormatError, match=r"'falcon' is not supported; supported: llama, qwen2, qwen3"):
        open_model(path)


def test_unknown_tensor_type_names_the_supported_ones(tiny, tmp_path):
    path = rewrite(tiny, tmp_path / "iq.gguf", retype={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.IQ4_NL})
    with pytest.raises(ModelFormatError, match=r"IQ4_NL, which is not supported; supported types: F32, F16"):
        open_model(path)


def test_missing_tensor_is_named(tiny, tmp_path):
    from fastserve_edge.engine.generate import local_stages

    path = rewrite(tiny, tmp_path / "hole.gguf", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ModelFormatError, match=r"blk\.1\.ffn_up\.weight is missing"):
        local_stages(open_model(path), max_tokens=32)


def test_hf_folder_reads_and_maps_names(tmp_path):
    folder = mf.write_tiny_hf_folder(tmp_path / "q2", "qwen2", vocab_size=VOCAB)
    m = open_model(folder)
    assert m.config.arch == "qwen2" and m.config.attn_bias
    assert m.tensor("blk.1.attn_q.bias").shape == (64,)
    assert m.n_params > 0


def test_hf_folder_with_unsupported_model_type(tmp_path):
    folder = mf.write_tiny_hf_folder(tmp_path / "x", "llama", vocab_size=VOCAB)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="'gpt_neox' is not supported"):
        open_model(folder)


def test_hf_folder_with_truncated_safetensors(tmp_path):
    folder = mf.write_tiny_hf_folder(tmp_path / "t", "llama", vocab_size=VOCAB)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="safetensors"):
        open_model(folder)
