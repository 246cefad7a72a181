"""Fuzz targets: bytes (or records) that arrive from a file or another machine, in; a result
or the boundary's own error out. Anything else is a bug: another exception's traceback, a
sanitizer report (the kernels built with FASTSERVE_KERNELS_SANITIZE=1), a hang.

    wire   unpack_hidden / unpack_tensors / join_chunks, then a matmul (and an embedding
           lookup) on what came out, through the kernels
    gguf   the GGUF reader, then every layer of the model built and one token forward
    txt    an mDNS TXT record through NodeInfo.from_properties

Seeds: tests/fuzz/corpus/ (tests/fuzz/seeds.py writes them).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fastserve_edge.cluster.discovery import MalformedRecord, NodeInfo
from fastserve_edge.cluster.protocol import peer_pb2
from fastserve_edge.cluster.wire import WireError, join_chunks, unpack_hidden, unpack_tensors
from fastserve_edge.engine import kernels
from fastserve_edge.engine.generate import local_stages
from fastserve_edge.engine.quant import QuantEmbedding, quant_tensor
from fastserve_edge.errors import ModelFormatError
from fastserve_edge.models.gguf import GGUFModel

CORPUS = Path(__file__).with_name("corpus")
MAX_HIDDEN = 1 << 14  # elements of a hidden-state message the harness accepts (a peer: ctx * dim)
MAX_PART = 1 << 20  # bytes of a chunked part
MAX_TOKENS = 8  # a fuzzed model's context


def seeds(kind: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / kind).iterdir())]


def wire(blob: bytes) -> None:
    """Both wire payloads, then the kernels on whatever they let through."""
    k = kernels.load()
    try:
        x = unpack_hidden(blob, max_elements=MAX_HIDDEN)
    except WireError:
        pass
    else:
        assert x.dim() in (2, 3) and x.numel() <= MAX_HIDDEN
        rows = x.reshape(-1, x.shape[-1]).float()
        if k is not None and rows.shape[1] % 32 == 0:  # a Q8_0 matrix [8, K] of zero blocks
            w = torch.zeros((8, rows.shape[1] // 32 * 34), dtype=torch.uint8)
            assert k.matmul(kernels.FMT_Q8, 32, w, 8, rows.shape[1], rows).shape == (rows.shape[0], 8)
    try:
        raws = unpack_tensors(blob)
    except WireError:
        return
    for raw in raws:
        q = quant_tensor(raw, k) if k is not None else None
        if q is None:
            raw.to_float()  # what quant.py does with the rest: must agree with its shape
            continue
        n, K = q.shape
        assert q.matmul(torch.ones(1, K)).shape == (1, n)
        emb = QuantEmbedding(q)
        assert emb(torch.tensor([0, n - 1])).shape == (2, K)
        for bad in (-1, n):
            try:
                emb(torch.tensor([bad]))
            except IndexError:
                continue
            raise AssertionError(f"embedding row {bad} of {n} was read")


def chunks(pieces: list[tuple[int, int, int, bytes, bool]]) -> None:
    """A FetchLayer stream of (index, offset, total_bytes, data, last), then its blob unpacked."""
    stream = [peer_pb2.TensorChunk(index=i, offset=o, total_bytes=t, data=d, last=last) for i, o, t, d, last in pieces]
    try:
        blob = join_chunks(iter(stream), max_bytes=MAX_PART)
    except WireError:
        return
    assert len(blob) <= MAX_PART
    wire(blob)


def gguf(blob: bytes) -> None:
    """A GGUF file's bytes: refused with ModelFormatError, or a model whose stages build and
    run one token (and refuse an id outside the vocabulary)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.gguf"
        path.write_bytes(blob)
        try:
            source = GGUFModel(path)
            [stage] = local_stages(source, max_tokens=MAX_TOKENS)
        except ModelFormatError:
            return
        vocab = source.config.vocab_size
        logits = stage.forward("s", torch.tensor([[vocab - 1]]), 0)
        assert logits.shape == (1, vocab)
        for bad in (-1, vocab):
            try:
                stage.forward("t", torch.tensor([[bad]]), 0)
            except IndexError:
                continue
            raise AssertionError(f"token id {bad} of a {vocab}-token vocabulary was embedded")


def txt(props: dict[str, str | None], port: int) -> None:
    """A TXT record: MalformedRecord, or a node whose record reads back as the same node."""
    try:
        node = NodeInfo.from_properties(props, port=port)
    except MalformedRecord:
        return
    again = NodeInfo.from_properties(node.to_properties(), port=port)
    assert again == node, (node, again)
