"""Tokenizer: the same ids as transformers (the oracle) for GGUF byte-level BPE and
SentencePiece vocabularies and for tokenizer.json folders; llama.cpp's rules where
transformers' GGUF loader differs; special tokens whole; stop ids; streaming decode."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from fastserve_edge.errors import ModelFormatError
from fastserve_edge.models.gguf import open_reader, read_metadata
from fastserve_edge.models.tokenizer import Tokenizer
from tests.unit.tokenizer_fixtures import (  # noqa: F401  (fixtures)
    CORPUS,
    NON_ASCII_NUMBERS,
    SPM_TRAINING_TEXT,
    UNMERGEABLE,
    load_oracle,
    oracle_ids,
    sentencepiece_vocab,
    small_byte_level_vocab,
    smollm2_gguf,
    smollm2_meta,
    smollm2_oracle,
    write_gguf,
)

SPM_SPACE = "\u2581"


def load(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(open_reader(path)))


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.token_text(i) for i in tok.encode(text)]


# --- SmolLM2: the real default model (byte-level BPE, pre = smollm) ----------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_ids_match_transformers(smollm2: Tokenizer, smollm2_oracle: Any, text: str) -> None:
    assert smollm2.encode(text) == smollm2_oracle(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_decode_matches_transformers(smollm2: Tokenizer, smollm2_oracle: Any, text: str) -> None:
    ids = smollm2_oracle(text, add_special_tokens=False)["input_ids"]
    assert smollm2.decode(ids) == smollm2_oracle.decode(ids, skip_special_tokens=True)
    assert smollm2.decode(ids, skip_special=False) == smollm2_oracle.decode(ids) == text


def test_smollm2_special_tokens_and_stop_ids(smollm2: Tokenizer) -> None:
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.vocab_size) == (1, 2, 49152)
    assert smollm2.encode("<|im_start|>x<|im_end|>") == [1, smollm2.encode("x")[0], 2]
    # eos <|im_end|> and the <|endoftext|> marker; never an ordinary token
    assert {0, 2} <= smollm2.stop_ids <= {0, 1, 2}
    # the file says add_bos_token = false, and transformers adds none either
    assert smollm2.add_bos_token is False
    assert smollm2.encode("hi", add_bos=True) == [1, *smollm2.encode("hi")]


def test_smollm2_splits_every_number_like_its_tokenizer_json(smollm2: Tokenizer, smollm2_oracle: Any) -> None:
    """SmolLM2's tokenizer.json splits with Digits(individual_digits) before ByteLevel, as
    llama.cpp's `smollm` regex does; transformers' GGUF loader skips that step, which shows
    only on non-ASCII numbers (SmolLM2 has no multi-digit tokens)."""
    published = with_smollm2_published_pre_tokenizer(smollm2_oracle)
    for text in (NON_ASCII_NUMBERS, CORPUS[4]):
        assert smollm2.encode(text) == published.encode(text, add_special_tokens=False).ids


def with_smollm2_published_pre_tokenizer(oracle: Any) -> Backend:
    """The oracle's backend with the pre-tokenizer of SmolLM2's tokenizer.json on the Hub."""
    backend = Backend.from_str(oracle.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


# --- other byte-level pre-tokenizers: synthetic files with a cut-down SmolLM2 vocabulary -------

PRE_NAMES = ("llama-bpe", "qwen2", "gpt2", "smollm", "no-such-pre")
DIGIT_TEXT = "x 12345 123 4512\n\n(hello) 'S  world"


@pytest.fixture(scope="module")
def byte_level_files(smollm2_meta: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bpe")
    return {
        pre: write_gguf(folder / f"{pre}.gguf", small_byte_level_vocab(smollm2_meta, 6000, pre))
        for pre in PRE_NAMES
    }


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_byte_level_pre_tokenizers_match_transformers(byte_level_files: dict[str, Path], pre: str) -> None:
    texts = [*CORPUS, DIGIT_TEXT, NON_ASCII_NUMBERS]
    oracle = load_oracle(byte_level_files[pre])
    tok = load(byte_level_files[pre])
    if pre == "smollm":  # transformers' GGUF loader has no digit split (see above)
        published = with_smollm2_published_pre_tokenizer(oracle)
        assert [tok.encode(t) for t in texts] == [published.encode(t, add_special_tokens=False).ids for t in texts]
    else:
        assert [tok.encode(t) for t in texts] == oracle_ids(oracle, texts)
    assert [tok.decode(ids) for ids in oracle_ids(oracle, texts)] == [
        oracle.decode(ids, skip_special_tokens=True) for ids in oracle_ids(oracle, texts)
    ]


def test_pre_tokenizer_name_decides_the_split(byte_level_files: dict[str, Path]) -> None:
    tokens = {pre: pieces(load(byte_level_files[pre]), DIGIT_TEXT) for pre in ("llama-bpe", "qwen2", "gpt2")}
    assert {"123", "45"} <= set(tokens["llama-bpe"])  # digits in threes: 123|45
    assert all(len(t) == 1 for t in tokens["qwen2"] if t.isdigit())  # one digit per pre-token
    assert {"123", "45"} <= set(tokens["gpt2"])  # " 12345" is one pre-token
    assert tokens["gpt2"] != tokens["llama-bpe"] != tokens["qwen2"]


def test_llama3_pre_tokenizer_takes_whole_words_from_the_vocab(byte_level_files: dict[str, Path]) -> None:
    """llama.cpp and Meta's tokenizer.json (`ignore_merges`) look a pre-token up before merging."""
    assert pieces(load(byte_level_files["llama-bpe"]), "a zxqv") == ["a", UNMERGEABLE]
    assert UNMERGEABLE not in pieces(load(byte_level_files["gpt2"]), "a zxqv")


def test_unknown_pre_tokenizer_warns_and_splits_like_gpt2(
    byte_level_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fastserve_edge.models.tokenizer"):
        unknown = load(byte_level_files["no-such-pre"])
    assert "no-such-pre" in caplog.text
    gpt2 = load(byte_level_files["gpt2"])
    assert [unknown.encode(t) for t in CORPUS] == [gpt2.encode(t) for t in CORPUS]


# --- SentencePiece-style `llama` vocabulary --------------------------------------------------


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", sentencepiece_vocab())


@pytest.fixture(scope="module")
def spm(spm_file: Path) -> Tokenizer:
    return load(spm_file)


def _same_as_transformers_gguf(text: str) -> bool:
    """transformers' GGUF loader prefixes `▁` only at offset 0 and not before a leading space;
    llama.cpp prefixes every stretch after a special token and keeps the space. They agree on
    text like this."""
    specials = ("<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>")
    return not text[:1].isspace() and not any(s in text for s in specials)


SPM_TEXTS = [t for t in [*CORPUS, SPM_TRAINING_TEXT, NON_ASCII_NUMBERS] if _same_as_transformers_gguf(t)]


def test_sentencepiece_matches_transformers(spm_file: Path, spm: Tokenizer) -> None:
    oracle = load_oracle(spm_file)
    assert [spm.encode(t) for t in SPM_TEXTS] == oracle_ids(oracle, SPM_TEXTS)
    # transformers adds BOS to a llama vocabulary by default, as does llama.cpp
    assert spm.add_bos_token is True
    assert [spm.encode(t, add_bos=True) for t in SPM_TEXTS] == [oracle(t)["input_ids"] for t in SPM_TEXTS]
    assert [spm.decode(spm.encode(t)) for t in SPM_TEXTS] == [
        oracle.decode(ids, skip_special_tokens=True) for ids in oracle_ids(oracle, SPM_TEXTS)
    ]


def test_sentencepiece_space_prefix_follows_llama_cpp(spm: Tokenizer) -> None:
    assert pieces(spm, "the") == [f"{SPM_SPACE}the"]
    assert pieces(spm, " the") == [SPM_SPACE, f"{SPM_SPACE}the"]  # "▁▁the": the space is kept
    after_special = pieces(spm, "<|im_start|>the<|im_end|>the")
    assert after_special == ["<|im_start|>", f"{SPM_SPACE}the", "<|im_end|>", f"{SPM_SPACE}the"]
    for text in CORPUS:
        if "<" not in text:
            assert spm.decode(spm.encode(text)) == text


def test_sentencepiece_without_space_prefix(tmp_path: Path) -> None:
    tok = load(write_gguf(tmp_path / "nospace.gguf", sentencepiece_vocab(add_space_prefix=False)))
    assert not pieces(tok, "the fox")[0].startswith(SPM_SPACE)
    assert f"{SPM_SPACE}fox" in pieces(tok, "the fox")
    assert tok.decode(tok.encode(" the fox ")) == " the fox "


def test_sentencepiece_byte_fallback_and_whole_tokens(spm: Tokenizer) -> None:
    assert pieces(spm, "😀") == [SPM_SPACE, "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert spm.decode(spm.encode("😀")) == "😀"
    # control and user-defined tokens are one token; byte-token text is just text
    assert len(spm.encode("<|im_end|>")) == 1
    assert pieces(spm, "a<think>b")[1] == "<think>"
    assert "<0x41>" not in pieces(spm, "<0x41>")
    assert spm.decode(spm.encode("<think>x</s>")) == "<think> x"  # specials skipped, user-defined kept


def test_sentencepiece_stop_ids(spm_file: Path) -> None:
    meta = read_metadata(open_reader(spm_file))
    tok = Tokenizer.from_gguf_metadata(meta)
    im_end = tok.encode("<|im_end|>")[0]
    assert tok.stop_ids == {2, im_end}  # eos </s> and the <|im_end|> marker
    think = tok.encode("<think>")[0]
    with_eot = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.eot_token_id": think})
    assert with_eot.stop_ids == {2, im_end, think}


# --- Hugging Face folders (tokenizer.json) ---------------------------------------------------


def test_hf_folder_matches_transformers(smollm2_oracle: Any, smollm2: Tokenizer, tmp_path: Path) -> None:
    smollm2_oracle.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert [tok.encode(t) for t in CORPUS] == oracle_ids(smollm2_oracle, CORPUS)
    assert [tok.decode(smollm2.encode(t)) for t in CORPUS] == [smollm2.decode(smollm2.encode(t)) for t in CORPUS]
    assert (tok.bos_id, tok.eos_id, tok.add_bos_token) == (1, 2, False)
    assert tok.stop_ids == {0, 2, 7}
    assert tok.chat_template == smollm2.chat_template and not tok.chat_template_is_fallback


def test_hf_folder_sentencepiece(spm_file: Path, tmp_path: Path) -> None:
    oracle = load_oracle(spm_file)
    oracle.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    # tokenizer.json carries transformers' own Metaspace rules, so every text agrees
    assert [tok.encode(t) for t in CORPUS] == oracle_ids(oracle, CORPUS)
    assert [tok.decode(ids) for ids in oracle_ids(oracle, CORPUS)] == [
        oracle.decode(ids, skip_special_tokens=True) for ids in oracle_ids(oracle, CORPUS)
    ]
    # tokenizer_config.json is silent on add_bos_token; the post-processor adds <s>
    assert tok.add_bos_token is True and tok.encode("Hello", add_bos=True) == oracle("Hello")["input_ids"]


# --- refusals ----------------------------------------------------------------------------------


def _minimal_meta(**overrides: Any) -> dict[str, Any]:
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer.ggml.model": "bert"}, "supported: gpt2, llama"),
        ({"tokenizer.ggml.model": None}, "supported: gpt2, llama"),
        ({"tokenizer.ggml.tokens": None}, "no tokenizer vocabulary"),
        ({"tokenizer.ggml.scores": None}, "no scores"),
        ({"tokenizer.ggml.model": "gpt2"}, "no merges"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "4 tokens but 2 token types"),
        ({"tokenizer.ggml.eos_token_id": 99}, "token 99 as eos_token"),
    ],
)
def test_unusable_gguf_tokenizer_is_a_model_format_error(overrides: dict[str, Any], message: str) -> None:
    assert Tokenizer.from_gguf_metadata(_minimal_meta())  # the baseline is fine
    with pytest.raises(ModelFormatError, match=message):
        Tokenizer.from_gguf_metadata(_minimal_meta(**overrides))


def test_unusable_hf_folder_is_a_model_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="cannot be read"):
        Tokenizer.from_hf_folder(tmp_path)


# --- streaming decode --------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids], decoder.flush()


@pytest.mark.parametrize("text", CORPUS)
def test_stream_decoder_equals_decode_without_mojibake(smollm2: Tokenizer, spm: Tokenizer, text: str) -> None:
    for tok in (smollm2, spm):
        ids = tok.encode(text)
        parts, rest = _stream(tok, ids)
        assert "\ufffd" not in "".join(parts)
        assert "".join(parts) + rest == tok.decode(ids)
        assert rest == ""


def test_stream_decoder_holds_back_partial_characters(smollm2: Tokenizer, spm: Tokenizer) -> None:
    ids = smollm2.encode("ok 😀")
    assert len(ids) > 2  # the emoji is several byte-level tokens
    parts, _ = _stream(smollm2, ids)
    assert parts[-1] == " 😀" and set(parts[1:-1]) == {""}

    ids = spm.encode("a😀b")  # byte fallback: ▁a <0xF0> <0x9F> <0x98> <0x80> b
    parts, _ = _stream(spm, ids)
    assert parts == ["a", "", "", "", "😀", "b"]

    decoder = spm.stream_decoder()
    assert decoder.push(ids[0]) == "a" and decoder.push(ids[1]) == ""
    assert decoder.flush() == "\ufffd"  # a character that never finished


def test_stream_decoder_skips_special_tokens(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>assistant\nHi there<|im_end|>")
    parts, rest = _stream(smollm2, ids)
    assert "".join(parts) + rest == "assistant\nHi there"
