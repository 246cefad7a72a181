"""Issue 21: nothing from the network or a model file reaches a C kernel or an allocation
unchecked. Each test feeds one hostile input found in review (or by tests/fuzz) and expects
the boundary's own error, not a crash, a traceback of another kind, or a read out of bounds."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import torch
from gguf import GGMLQuantizationType as QType

from fastserve_edge.cluster.wire import WireError, pack_tensors, unpack_hidden, unpack_tensors
from fastserve_edge.engine import kernels
from fastserve_edge.models.config import ModelConfig
from fastserve_edge.engine.generate import local_stages
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import DenseEmbedding, QuantEmbedding, RuntimeWeights, quant_tensor
from fastserve_edge.errors import ModelFormatError
from fastserve_edge.models.gguf import GGUFModel, open_reader
from fastserve_edge.models.hf import HFModel
from fastserve_edge.models.tensors import RawTensor
from tests.fuzz import targets

SEED = targets.CORPUS / "gguf" / "llama-q4_0.gguf"  # dim 32, 2 heads of 16, 1 kv head, ffn 32, 16 tokens


class Source:
    """A model held in memory (as a peer's ShardSource): config and RawTensors by name."""

    def __init__(self, config: ModelConfig, tensors: dict[str, RawTensor]):
        self.config, self._tensors = config, tensors

    def has(self, name):
        return name in self._tensors

    def names(self):
        return sorted(self._tensors)

    def tensor(self, name):
        if name not in self._tensors:
            raise ModelFormatError(f"tensor {name} is missing")
        return self._tensors[name]


@pytest.fixture(scope="module")
def seed_model():
    return GGUFModel(SEED)


def tensors_of(model) -> dict[str, RawTensor]:
    return {n: model.tensor(n) for n in model.names()}


# -- token ids --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, 16, 1 << 40])
def test_an_id_outside_the_vocabulary_is_an_error_not_a_read(seed_model, bad):
    [stage] = local_stages(seed_model, max_tokens=8)
    assert isinstance(stage.stage.embed, QuantEmbedding)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        stage.forward("s", torch.tensor([[1, bad]]), 0)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        stage.forward_batch(["a", "b"], torch.tensor([3, bad]), [0, 0])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        stage.forward_packed(["a"], [torch.tensor([bad, 2])], [0])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        DenseEmbedding(torch.zeros(16, 32))(torch.tensor([bad]))
    assert stage.forward("s", torch.tensor([[15]]), 0).shape == (1, 16)  # the last id is fine


def test_the_kernel_refuses_a_row_outside_the_matrix():
    k = kernels.load()
    w = torch.zeros((4, 18), dtype=torch.uint8)
    with pytest.raises(IndexError):
        k.dequant_rows(kernels.FMT_Q4_0, 32, w, 32, torch.tensor([4]))
    with pytest.raises(IndexError):
        k.dequant_rows(kernels.FMT_Q4_0, 32, w, 32, torch.tensor([-1]))
    # told the matrix has more rows than its bytes hold: refused, nothing read
    rows, out = torch.tensor([5], dtype=torch.int64), torch.empty(1, 32)
    assert k.lib.fs_dequant_rows(0, 32, w.data_ptr(), 18, 32, rows.data_ptr(), 1, out.data_ptr(), 1, 8, w.numel()) < 0


def test_positions_past_the_stage_are_refused(seed_model):
    [stage] = local_stages(seed_model, max_tokens=8)
    with pytest.raises(ValueError, match="positions"):
        stage.forward("s", torch.tensor([[1, 2]]), 7)
    with pytest.raises(ValueError, match="positions"):
        stage.forward("s", torch.tensor([[1]]), -1)


# -- a tensor's layout from its qtype and shape ------------------------------------------------

def test_a_part_shaped_one_row_of_all_bytes_is_refused(seed_model):
    """[1, nbytes] has the right byte count (and hash): its row stride would have the kernels
    read N rows of nbytes each."""
    good = seed_model.tensor("blk.0.ffn_up.weight")  # Q4_0 [32, 32]: 32 rows of 18 bytes
    flat = RawTensor(good.name, good.qtype, good.shape, np.ascontiguousarray(good.data).reshape(1, -1))
    header = json.loads(pack_tensors([good])[8:8 + int.from_bytes(pack_tensors([good])[:8], "little")])
    entries = header["__metadata__"]["fastserve.tensors"]
    blob = safetensors.numpy.save({good.name: np.ascontiguousarray(flat.data)}, metadata={"fastserve.tensors": entries})
    with pytest.raises(WireError, match="rows of 18 bytes"):
        unpack_tensors(blob)
    with pytest.raises(ValueError, match="not 32 rows of 18 bytes"):
        quant_tensor(flat, kernels.load())
    tensors = tensors_of(seed_model) | {good.name: flat}
    with pytest.raises(ModelFormatError, match="ffn_up"):
        local_stages(Source(seed_model.config, tensors), max_tokens=8)


@pytest.mark.parametrize("shape", [[0, 32], [-1, 32], [2**62, 32], [32, 31], [1, 1, 1, 1, 32]])
def test_a_logical_shape_no_data_can_have_is_refused_on_the_wire(shape):
    rows = np.zeros((1, 18), dtype=np.uint8)
    entries = json.dumps([{"name": "w", "qtype": "Q4_0", "shape": shape, "array": "numpy", "dtype": "U8"}])
    with pytest.raises(WireError):
        unpack_tensors(safetensors.numpy.save({"w": rows}, metadata={"fastserve.tensors": entries}))


@pytest.mark.parametrize("blob", [
    b"", b"\xff" * 8 + b"{}", (2).to_bytes(8, "little") + b"[]",
    (10).to_bytes(8, "little") + b'{"x": 1}  ',
    # dtype not a hidden-state dtype, shape/bytes mismatch, negative and huge dims
    safetensors.numpy.save({"x": np.zeros((1, 4), dtype=np.int32)}),
    (60).to_bytes(8, "little") + b'{"x":{"dtype":"F32","shape":[1,4],"data_offsets":[0,12]}}  ' + bytes(12),
    (60).to_bytes(8, "little") + b'{"x":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,16]}} ' + bytes(16),
    (71).to_bytes(8, "little") + b'{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}' + bytes(16),
    safetensors.numpy.save({"x": np.zeros((1, 0, 4), dtype=np.float32)}),
    safetensors.numpy.save({"x": np.zeros((64, 64, 8), dtype=np.float32)}),  # more elements than allowed
])
def test_malformed_hidden_states_are_a_wire_error(blob):
    with pytest.raises(WireError):
        unpack_hidden(blob, max_elements=4096)


def test_a_deeply_nested_safetensors_header_is_a_wire_error():
    header = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(WireError):
        unpack_hidden(len(header).to_bytes(8, "little") + header, max_elements=10)


# -- config against tensors ----------------------------------------------------------------

def test_a_config_whose_sizes_disagree_with_the_tensors_is_refused(seed_model):
    """model.py builds the C block from the config and each matrix from its tensor: a config
    with a larger ffn would have the kernels write past the work buffer."""
    tensors = tensors_of(seed_model)
    for change in ({"ffn_dim": 64}, {"n_heads": 4, "head_dim": 8}, {"vocab_size": 1000}, {"dim": 64}):
        cfg = ModelConfig.from_dict(seed_model.config.to_dict() | change)
        with pytest.raises(ModelFormatError, match="config"):
            local_stages(Source(cfg, tensors), max_tokens=8)
    other = ModelConfig.from_dict(seed_model.config.to_dict() | {"ffn_dim": 64})
    with pytest.raises(ModelFormatError, match="disagree on ffn_dim"):
        Stage(other, RuntimeWeights(seed_model), 0, 1, max_tokens=8)


def test_a_gguf_whose_metadata_disagrees_with_its_tensors_is_refused(tmp_path):
    blob = SEED.read_bytes()
    key = b"llama.feed_forward_length"
    at = blob.index(key) + len(key) + 4  # past the key and its u32 type
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob[:at] + struct.pack("<I", 64) + blob[at + 4:])
    with pytest.raises(ModelFormatError, match=r"ffn_gate.weight has shape \[32, 32\].*gives it \[64, 32\]"):
        GGUFModel(bad)


def test_the_block_kernel_checks_its_sizes_against_its_matrices(seed_model):
    [stage] = local_stages(seed_model, max_tokens=8)
    block = stage.stage.blocks[0]
    assert block.program is not None
    attn, ffn = block.attn, block.ffn
    with pytest.raises(ValueError, match="does not match its matrices"):
        block.glue.block(dim=32, n_heads=2, n_kv=1, head_dim=16, ffn=64, eps=1e-6, attn_norm=torch.ones(32),
                         ffn_norm=torch.ones(32), q_norm=None, k_norm=None, qkv_bias=None,
                         qkv=attn.wqkv.multi, wo=attn.wo.one_call(), gate_up=ffn.gate_up.multi, down=ffn.down.one_call())
    # a matrix told to hold more rows than its bytes do
    q = attn.wo.weight
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        q.k.matmul(q.kernel_fmt, q.group, q.blocks[:1], q.shape[0], q.shape[1], torch.ones(1, q.shape[1]))


def test_hostile_configs_are_value_errors():
    good = GGUFModel(SEED).config.to_dict()
    for change in ({"n_layers": 0}, {"dim": -32}, {"n_kv_heads": 0}, {"head_dim": 15}, {"vocab_size": 2**40},
                   {"norm_eps": float("nan")}, {"dim": "32"}, {"n_layers": True}, {"rope_scaling": [1]},
                   {"rope_scaling": {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}}):
        with pytest.raises((ValueError, TypeError)):
            ModelConfig.from_dict(good | change)


# -- GGUF headers ------------------------------------------------------------------------------

def _str(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def gguf_bytes(kvs: bytes = b"", n_kv: int = 0, infos: bytes = b"", n_tensors: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + infos + tail


def _u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", 4, value)


def _info(name: str, dims: list[int], qtype: int = 0, offset: int = 0) -> bytes:
    return _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", qtype, offset)


@pytest.mark.parametrize("blob", [
    pytest.param(gguf_bytes(_u32("general.alignment", 0), 1, tail=bytes(64)), id="alignment-0"),
    pytest.param(gguf_bytes(_u32("general.alignment", 12), 1, tail=bytes(64)), id="alignment-12"),
    pytest.param(gguf_bytes(infos=_info("w", [0, 4]), n_tensors=1, tail=bytes(64)), id="zero-dim"),
    pytest.param(gguf_bytes(infos=_info("w", [32, 2**62 + 1]), n_tensors=1, tail=bytes(256)), id="dims-wrap-int64"),
    pytest.param(gguf_bytes(infos=_info("w", [4] * 5), n_tensors=1, tail=bytes(4096)), id="five-dims"),
    pytest.param(gguf_bytes(infos=_info("w", [31, 1], qtype=2), n_tensors=1, tail=bytes(64)), id="partial-block"),
    pytest.param(gguf_bytes(infos=_info("w", [4], offset=3), n_tensors=1, tail=bytes(64)), id="misaligned"),
    pytest.param(gguf_bytes(_str("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000
                            + struct.pack("<IQ", 0, 0), 1), id="nested-arrays"),
    pytest.param(gguf_bytes(_str("k") + struct.pack("<IIQ", 9, 9, 2**62), 1, tail=bytes(64)), id="array-count"),
    pytest.param(gguf_bytes(_str("k") + struct.pack("<IIQ", 9, 8, 2**60), 1, tail=bytes(64)), id="strings-count"),
    pytest.param(gguf_bytes(_str("k") + struct.pack("<IIQ", 9, 10, 2**61), 1, tail=bytes(64)), id="numbers-count"),
    pytest.param(gguf_bytes(n_kv=2**63, tail=bytes(64)), id="key-count"),
    pytest.param(gguf_bytes(n_tensors=2**64 - 1, tail=bytes(64)), id="tensor-count"),
    pytest.param(gguf_bytes(_str("k") + struct.pack("<I", 99), 1), id="unknown-type"),
])
def test_a_malformed_gguf_header_is_a_model_format_error(tmp_path, blob):
    path = tmp_path / "h.gguf"
    path.write_bytes(blob)
    with pytest.raises(ModelFormatError):
        open_reader(path)


@pytest.mark.parametrize("key", ["llama.attention.head_count", "llama.block_count"])
def test_metadata_of_the_wrong_type_is_a_model_format_error(tmp_path, key):
    """A float where a count belongs: ModelFormatError, not a ZeroDivisionError or a model of
    no layers."""
    blob = SEED.read_bytes()
    at = blob.index(key.encode()) + len(key)
    path = tmp_path / "t.gguf"
    path.write_bytes(blob[:at] + struct.pack("<I", 6) + blob[at + 4:])  # type u32 -> f32: the same 4 bytes
    with pytest.raises(ModelFormatError, match="describes no model"):
        GGUFModel(path)


def test_a_deeply_nested_config_json_is_a_model_format_error(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    safetensors.numpy.save_file({"x": np.zeros(1, dtype=np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="nests too deeply"):
        HFModel(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": [1],
                                                    "hidden_size": 64}))
    with pytest.raises(ModelFormatError):
        HFModel(folder)
