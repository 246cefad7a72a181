"""Material for the tokenizer tests: the real SmolLM2 GGUF, synthetic GGUF files written with
gguf.GGUFWriter, a varied text corpus, and transformers (the oracle) loading a GGUF."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from fastserve_edge.models.gguf import open_reader, read_metadata
from tests.models_fixtures import smollm2_path

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model, pulled once by the project's own `pull` (tests/models_fixtures.py)."""
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_meta(smollm2_gguf: Path) -> dict[str, Any]:
    return read_metadata(open_reader(smollm2_gguf))


@pytest.fixture(scope="session")
def smollm2_oracle(smollm2_gguf: Path) -> Any:
    return load_oracle(smollm2_gguf)


CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand \r\n CRLF\r\n",
    "Numbers: 0 7 42 123 1234 12345678 3.14159 -17 1e-9 1,000,000",
    "Unicode: café naïve Ærøskøbing Straße ŝĉ ﬁ Å",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "Emoji: 😀👍🏽 🇩🇪 👨‍👩‍👧‍👦 ❤️ 🤖",
    "def f(x):\n    return x**2  # square\n\tif (a && b) { c = d->e; }",
    '{"key": [1, 2, {"nested": null}], "s": "a\\"b"}',
    "contractions: I'm, you're, it's, they'll, we'd, I've, DON'T, O'Neil's",
    "Mixed    whitespace      runs\n\n\n\n    indented\u00a0nbsp\u3000ideographic",
    "URLs https://example.com/a?b=c&d=e#frag and emails a.b@c.de",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|> <|im_start|>",
    "<not special> <|im_start |> <|im_end",
    "",
    " ",
    "\n",
]

# Numbers that are not ASCII digits. SmolLM2's own tokenizer.json (Digits pre-tokenizer) and
# llama.cpp cut these off the preceding space; transformers' GGUF loader does not.
NON_ASCII_NUMBERS = "fractions ½ ¾, powers x² y³, Arabic ٣٤٥, Roman Ⅻ"

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in haiku."},
        {"role": "user", "content": "Tell me about 🌊 and 日本."},
        {"role": "assistant", "content": "Waves fold into foam"},
        {"role": "user", "content": "  more,\n\nplease  "},
    ],
]


# --- writing GGUF files -------------------------------------------------------------------------


@dataclass
class Vocab:
    """Tokenizer metadata to write into a synthetic GGUF."""

    model: str  # "gpt2" | "llama" | anything, to test refusal
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)  # {"bos": 1, "eos": 2, "unk": 0, "eot": 5}
    add_bos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def write_gguf(path: Path, vocab: Vocab) -> Path:
    """A llama-architecture GGUF with this vocabulary and one tiny tensor (transformers needs
    a readable model header to load the tokenizer)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(vocab.tokens))
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    adders = {
        "bos": w.add_bos_token_id,
        "eos": w.add_eos_token_id,
        "unk": w.add_unk_token_id,
        "pad": w.add_pad_token_id,
        "eot": w.add_eot_token_id,
    }
    for name, token_id in vocab.special.items():
        adders[name](token_id)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)
    w.add_tensor("token_embd.weight", np.zeros((len(vocab.tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# SmolLM2 has no multi-digit tokens; these make `\p{N}{1,3}` (Llama 3) and `\p{N}` (Qwen2)
# splitting give different ids.
DIGIT_MERGES = ("1 2", "12 3", "4 5")
# A word in the vocabulary that no merge builds: only Llama-3-style `ignore_merges` finds it.
UNMERGEABLE = "\u0120zxqv"  # "Ġzxqv", i.e. " zxqv"


def small_byte_level_vocab(meta: Mapping[str, Any], size: int, pre: str | None) -> Vocab:
    """The first `size` tokens of a byte-level BPE vocabulary (SmolLM2's), the merges among
    them, `DIGIT_MERGES` and `UNMERGEABLE`: a smaller but complete tokenizer, quick for
    transformers to load."""
    tokens = list(meta["tokenizer.ggml.tokens"][:size])
    types = list(meta["tokenizer.ggml.token_type"][:size])
    kept = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"] if m.replace(" ", "") in kept and set(m.split(" ")) <= kept]
    for merge in DIGIT_MERGES:
        assert merge.replace(" ", "") not in kept
        tokens.append(merge.replace(" ", ""))
        types.append(gguf.TokenType.NORMAL)
        merges.append(merge)
    tokens.append(UNMERGEABLE)
    types.append(gguf.TokenType.NORMAL)
    return Vocab(
        model="gpt2",
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        special={"bos": 1, "eos": 2, "unk": 0},
        add_bos=False,
    )


SPM_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world! Hello there, the theory of the "
    "thing is that there is nothing there. def main(): return 42 if x else 0\n"
    "Numbers 123 and 456; the user said hello to the assistant. Café, naïve, straße."
)


def _train_pieces(text: str, count: int) -> list[str]:
    """Plain BPE training over `▁`-prefixed words: the pieces in the order they were learned."""
    words = Counter("\u2581" + w for w in text.split())
    spelled = {w: list(w) for w in words}
    pieces: list[str] = []
    for _ in range(count):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            symbols = spelled[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (left, right), _ = pairs.most_common(1)[0]
        pieces.append(left + right)
        for word, symbols in spelled.items():
            merged, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == [left, right]:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[word] = merged
    return pieces


def sentencepiece_vocab(*, add_space_prefix: bool | None = None, chat_template: str | None = None) -> Vocab:
    """A small SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, learned pieces
    (score = -learning order), single characters, and two control tokens for chat markup."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(_train_pieces(SPM_TRAINING_TEXT, 120)):
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank))
    for char in sorted(set(SPM_TRAINING_TEXT.replace(" ", "\u2581").replace("\n", "")) | {"\u2581"}):
        if char not in tokens:
            tokens.append(char)
            types.append(gguf.TokenType.NORMAL)
            scores.append(-1000.0)
    for control in ("<|im_start|>", "<|im_end|>"):
        tokens.append(control)
        types.append(gguf.TokenType.CONTROL)
        scores.append(0.0)
    tokens.append("<think>")
    types.append(gguf.TokenType.USER_DEFINED)
    scores.append(0.0)
    return Vocab(
        model="llama",
        tokens=tokens,
        types=[int(t) for t in types],
        scores=scores,
        special={"bos": 1, "eos": 2, "unk": 0},
        add_space_prefix=add_space_prefix,
        chat_template=chat_template,
    )


def load_oracle(path: Path) -> Any:
    """transformers' own tokenizer for a GGUF file (it converts GGUF tokenizers itself)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def oracle_ids(oracle: Any, texts: Sequence[str]) -> list[list[int]]:
    return [oracle(t, add_special_tokens=False)["input_ids"] for t in texts]
