"""Text <-> token ids for a model: a `tokenizers.Tokenizer` built from GGUF metadata or from a
Hugging Face folder, the model's chat template, its stop tokens, and a streaming decoder.

Two sources:

- GGUF metadata (`tokenizer.ggml.*`, as llama.cpp writes it):
  - `model == "gpt2"`: byte-level BPE. Text is split by the regex that `tokenizer.ggml.pre`
    names (table `PRE_TOKENIZERS`), then merged with `tokenizer.ggml.merges`. An unknown or
    missing `pre` falls back to GPT-2's regex with a warning, as llama.cpp and transformers do.
  - `model == "llama"`: SentencePiece-style BPE. Merges are derived from `scores` (the higher
    the merged piece's score, the earlier it merges), spaces become `▁`, characters outside the
    vocabulary fall back to the `<0xXX>` byte tokens.
  Control (3), user-defined (4) and unknown (2) tokens are matched whole in the text, so
  `<|im_start|>` is one token, never `<`, `|`, `im`, ...
- a folder with `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`,
  `generation_config.json`), used as the `tokenizers` library reads it.

Decisions (the oracle in the tests is transformers; llama.cpp where transformers' GGUF
conversion is lossy):

- BOS: `encode(text)` adds nothing; `encode(text, add_bos=True)` prepends `bos_id`.
  `add_bos_token` says what the model wants (`tokenizer.ggml.add_bos_token`, else llama.cpp's
  default: yes for SentencePiece and Llama-3-style BPE, no otherwise). `encode_chat` renders
  the template and adds BOS only when the model wants one and the rendered text does not
  already start with it (llama.cpp's rule). For templates that write `{{ bos_token }}`
  themselves, and for models that want no BOS (SmolLM2), that equals transformers'
  `apply_chat_template(tokenize=True)`, which never adds one.
- SentencePiece space prefix: `▁` is put in front of every stretch of plain text that starts
  the input or follows a special token, and a leading space is kept (`" hi"` -> `▁▁hi`), as
  llama.cpp and sentencepiece do, and not prefixed at all when `add_space_prefix` is false.
  transformers' GGUF loader prefixes only the very start and merges a leading space into the
  prefix; the two agree on text that starts with a non-space character and has no special
  token in the middle.
- Llama-3-style pre-tokenizers take a whole pre-token that is in the vocabulary before trying
  merges (`ignore_merges`), as llama.cpp and Meta's tokenizer.json do.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
from gguf import TokenType
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from fastserve_edge.errors import ModelFormatError

log = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2", "llama")

# Text of tokens that end a turn or a sequence; llama.cpp stops on these too, whatever the
# file marks as eos.
END_OF_TURN_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
    "<end_of_turn>",
    "<|eom_id|>",
)

# Used when a model carries no template; ChatML is what most small instruct models speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPM_SPACE = "\u2581"  # "▁"

# tokenizer_config.json keys a chat template may read, as transformers passes them
_HF_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

# --- pre-tokenizers ---------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama-3's, but one digit per pre-token.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level BPE vocabulary splits text before merging.

    `splits` are applied in order, each cutting every piece further (isolated matches).
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token found whole in the vocab is taken as is
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_GPT2 = PreTokenizer((_GPT2_SPLIT,))
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2_SPLIT))  # every digit its own pre-token
_LLAMA3 = PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)

# `tokenizer.ggml.pre` -> splitting rules, after llama.cpp's llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "olmo": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": PreTokenizer((_QWEN2_SPLIT,)),
    "deepseek-r1-qwen": PreTokenizer((_QWEN2_SPLIT,)),
    "tekken": PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
}


def _pre_tokenizer_for(name: str | None) -> PreTokenizer:
    """The splitting rules `tokenizer.ggml.pre` names; GPT-2's, with a warning, for others."""
    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    what = "no tokenizer.ggml.pre" if name is None else f"unknown tokenizer.ggml.pre {name!r}"
    log.warning(
        "%s; splitting text like GPT-2, so numbers and whitespace may tokenize differently from "
        "the original model (known: %s)",
        what,
        ", ".join(sorted(PRE_TOKENIZERS)),
    )
    return _GPT2


# --- GGUF -> backend --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _outside_byte_alphabet() -> Callable[[str], re.Match[str] | None]:
    """search(text): a character of text outside the byte alphabet, if any. One regex call
    a token: a set per token cost 0.2 s on a 128k vocabulary."""
    return re.compile("[^" + "".join(re.escape(c) for c in _byte_alphabet().values()) + "]").search


def _in_byte_alphabet(text: str) -> bool:
    return _outside_byte_alphabet()(text) is None


def _byte_level_spelling(text: str) -> str:
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def _vocab_arrays(meta: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """`(tokens, token_types)`; types default to NORMAL when the file has none."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError(
            "the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens); "
            "use a GGUF converted with the tokenizer included, or the model's Hugging Face folder"
        )
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFormatError(
            f"the GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types; "
            "the file is damaged: download it again"
        )
    return list(tokens), [int(t) for t in types]


def _special_ids(meta: Mapping[str, Any]) -> dict[str, int]:
    """Named special tokens the file declares: {"bos_token": id, ...}."""
    keys = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    return {name: int(meta[key]) for name, key in keys.items() if meta.get(key) is not None}


def _build_byte_level_bpe(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], pre: PreTokenizer
) -> Backend:
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelFormatError(
            "the GGUF BPE tokenizer has no merges (tokenizer.ggml.merges); the file is incomplete: "
            "download it again"
        )
    vocab: dict[str, int] = {}
    outside, control = _outside_byte_alphabet(), TokenType.CONTROL
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        # Vocab entries are spelled in the byte alphabet; control tokens keep their raw text
        # because they are only ever matched whole, never built from bytes.
        if kind != control and outside(token) is not None:
            token = _byte_level_spelling(token)
        vocab[token] = token_id
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=pre.ignore_merges)
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_merges(tokens: list[str], types: list[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's "merge the best-scoring adjacent pair".

    Every split of a vocabulary piece into two vocabulary pieces is a merge, ranked by the
    score of the piece it makes (ties: longer left part first). Byte, control and unused
    tokens are never the result of a merge: they stand only for themselves.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, kind, score in zip(tokens, types, scores):
        if kind in (TokenType.BYTE, TokenType.CONTROL, TokenType.UNUSED, TokenType.UNKNOWN):
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(left, right) for left, right in splits if left in ids and right in ids]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        ranked += [(-float(score), -len(left), -len(right), left, right) for left, right in splits]
    ranked.sort(key=lambda m: m[:3])  # stable: equal keys keep vocabulary order
    return [(left, right) for *_, left, right in ranked]


def _build_sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Backend:
    scores = meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ModelFormatError(
            "the GGUF SentencePiece tokenizer has no scores for its tokens (tokenizer.ggml.scores); "
            "the file is incomplete: download it again"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=vocab,
        merges=_spm_merges(tokens, types, scores),
        unk_token=tokens[unk] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Backend(model)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # Normalizers run on each stretch of text between special tokens, which is exactly where
    # llama.cpp puts its space prefix.
    steps = [normalizers.Prepend(_SPM_SPACE)] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPM_SPACE)])
    backend.pre_tokenizer = None
    tail = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *tail]
    )
    return backend


def _register_whole_tokens(
    backend: Backend, tokens: list[str], types: list[int], named: Iterable[int], byte_level: bool
) -> None:
    """Make control/unknown/named tokens special and user-defined ones plain added tokens.

    Both are then matched whole in the input text, before any splitting. Ids stay those of the
    file because every token is already in the model's vocabulary.
    """
    whole = {int(TokenType.CONTROL), int(TokenType.UNKNOWN)}  # plain ints: 128k enum compares took 0.05 s
    special_ids = {i for i, t in enumerate(types) if t in whole}
    special_ids |= set(named)
    user_defined = int(TokenType.USER_DEFINED)
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)]
    )
    user = [
        AddedToken(token, special=False, normalized=False)
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind == user_defined and i not in special_ids
        # a user-defined token outside the byte alphabet was respelled and is reached by merges
        and (not byte_level or _in_byte_alphabet(token))
    ]
    if user:
        backend.add_tokens(user)


# --- chat templates ---------------------------------------------------------------------------


class _TemplateRaised(jinja2.TemplateError):
    """The template called raise_exception(message): it refuses this conversation."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training): render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & for HTML and non-ASCII; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _template_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (same flags, filters, globals)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def compile_chat_template(source: str, origin: str) -> jinja2.Template:
    """Parse a template once; a syntax error becomes a ModelFormatError naming `origin`."""
    try:
        return _template_env().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ModelFormatError(
            f"the chat template in {origin} is not valid Jinja (line {err.lineno}: {err.message}); "
            "the model's metadata is broken: get another build of the model"
        ) from None


# --- the tokenizer ----------------------------------------------------------------------------


class Tokenizer:
    """A model's tokenizer, chat template and stop tokens. Build with `from_gguf_metadata` or
    `from_hf_folder`.

    `bos_id`, `eos_id`: None when the model names none. `stop_ids`: eos, eot/eom (GGUF) or
    generation_config.json's eos ids, and every token spelled like an END_OF_TURN_MARKERS entry.
    `vocab_size`: rows of the model's embedding (the GGUF token count). `add_bos_token`: see
    the module docstring.

    If the model has no chat template, `chat_template` is a ChatML fallback
    (`<|im_start|>role\\ncontent<|im_end|>\\n`) and `chat_template_is_fallback` is true.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: Mapping[str, str],
        bos_id: int | None,
        eos_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
        template_origin: str,
        extra_stop_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ) -> None:
        self._backend = backend
        # {"bos_token": "<s>", ...}: what the chat template sees, as in transformers
        self.special_tokens = dict(special_tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos_token = add_bos_token and bos_id is not None
        self.vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self.stop_ids = self._collect_stop_ids(extra_stop_ids)
        self.chat_template_is_fallback = not chat_template
        if self.chat_template_is_fallback:
            chat_template, template_origin = CHATML_TEMPLATE, "the ChatML fallback"
        self.chat_template: str = chat_template
        self._template_origin = template_origin
        self._template = compile_chat_template(chat_template, template_origin)
        # transformers passes the OpenAI `tools` list to the template; one that never reads it
        # cannot tell the model about them (llama.cpp decides the same way)
        self.template_takes_tools = "tools" in jinja2.meta.find_undeclared_variables(
            _template_env().parse(chat_template))

    # -- construction --

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From the key/value metadata of a GGUF file (`gguf.read_metadata`)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in SUPPORTED_MODELS:
            raise ModelFormatError(
                f"this GGUF uses tokenizer model {kind!r}, which fastserve cannot read; supported: "
                f"{', '.join(SUPPORTED_MODELS)} (byte-level BPE and SentencePiece). "
                "Use a model with one of those, or its Hugging Face folder with tokenizer.json"
            )
        tokens, types = _vocab_arrays(meta)
        named = _special_ids(meta)
        for name, token_id in named.items():
            if not 0 <= token_id < len(tokens):
                raise ModelFormatError(
                    f"the GGUF names token {token_id} as {name} but has only {len(tokens)} tokens; "
                    "the file is damaged: download it again"
                )
        if kind == "gpt2":
            pre = _pre_tokenizer_for(meta.get("tokenizer.ggml.pre"))
            backend = _build_byte_level_bpe(meta, tokens, types, pre)
            default_bos = pre.add_bos
        else:
            backend = _build_sentencepiece_bpe(meta, tokens, types)
            default_bos = True
        _register_whole_tokens(backend, tokens, types, named.values(), byte_level=kind == "gpt2")
        extra = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(
            backend,
            special_tokens={name: tokens[i] for name, i in named.items()},
            bos_id=named.get("bos_token"),
            eos_id=named.get("eos_token"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
            chat_template=meta.get("tokenizer.chat_template"),
            template_origin="the GGUF metadata (tokenizer.chat_template)",
            extra_stop_ids=[int(i) for i in extra],
            vocab_size=len(tokens),
        )

    @classmethod
    def from_hf_folder(cls, path: Path) -> Tokenizer:
        """From a Hugging Face model folder: tokenizer.json, tokenizer_config.json (bos/eos,
        add_bos_token, chat_template), chat_template.jinja and generation_config.json if present."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"{path} has no tokenizer.json; fastserve reads only the fast-tokenizer format: "
                "download the model folder again or use its GGUF file"
            )
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust parser raises a bare Exception
            raise ModelFormatError(f"{tokenizer_file} cannot be read ({err}); download it again") from None
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(path / "tokenizer_config.json")
        special = {
            name: text
            for name in _HF_SPECIAL_NAMES
            if (text := _token_text(config.get(name))) is not None
        }
        template, origin = _hf_chat_template(path, config)
        generation = _read_json(path / "generation_config.json")
        eos = generation.get("eos_token_id")
        add_bos = config.get("add_bos_token")
        ids = {name: backend.token_to_id(text) for name, text in special.items()}
        tokenizer = cls(
            backend,
            special_tokens=special,
            bos_id=ids.get("bos_token"),
            eos_id=ids.get("eos_token"),
            add_bos_token=bool(add_bos) if add_bos is not None else False,
            chat_template=template,
            template_origin=origin,
            extra_stop_ids=eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [],
        )
        if add_bos is None:
            tokenizer.add_bos_token = _post_processor_adds_bos(backend, tokenizer.bos_id)
        return tokenizer

    # -- encoding / decoding --

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text in it (e.g. `<|im_start|>`) becomes that token."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def backend_json(self) -> str:
        """The `tokenizers` JSON of this tokenizer, GGUF-built or read: what llguidance builds its vocabulary from."""
        return self._backend.to_str()

    def token_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled `text` (special and added tokens as written), if any."""
        return self._backend.token_to_id(text)

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry of one id, as stored (byte-level or `▁` spelling)."""
        return self._backend.id_to_token(token_id)

    def stream_decoder(self, *, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(lambda ids: self.decode(ids, skip_special=skip_special))

    # -- chat --

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The conversation as the model's template writes it (transformers' semantics:
        `messages`, `add_generation_prompt`, `tools` (OpenAI's tool objects, or None),
        `documents` = None, and the special tokens)."""
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        try:
            return self._template.render(
                **self.special_tokens,
                messages=chat,
                tools=list(tools) if tools else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except _TemplateRaised as err:
            raise ModelFormatError(
                f"the model's chat template refused this conversation: {err.message}"
            ) from None
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            raise ModelFormatError(
                f"the chat template from {self._template_origin} failed on this conversation "
                f"({type(err).__name__}: {err}); the template may expect other roles or fields"
            ) from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the rendered conversation; BOS only if the model wants one and the
        template did not write it (see the module docstring)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        ids = self.encode(text)
        if self.add_bos_token and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    # -- helpers --

    def _collect_stop_ids(self, extra: Iterable[int]) -> frozenset[int]:
        ids = {self.eos_id, *extra}
        ids |= {self._backend.token_to_id(marker) for marker in END_OF_TURN_MARKERS}
        return frozenset(i for i in ids if i is not None)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{path} is not valid JSON ({err}); download the model folder again") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> tuple[str | None, str]:
    """`(template, where it came from)`; newer transformers save it as chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template, str(path / "tokenizer_config.json")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, str) and template:
        return template, str(path / "chat_template.json")
    return None, ""


def _post_processor_adds_bos(backend: Backend, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (when the config does not say)."""
    if bos_id is None:
        return False
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


# --- streaming --------------------------------------------------------------------------------


class StreamDecoder:
    """Text of a growing list of token ids, released as soon as it is complete.

    A character split over several tokens (byte-level BPE pieces, `<0xF0>` byte fallback)
    decodes to U+FFFD until its last byte arrives; such text is held back. Every push decodes
    only a short window: the tokens already released since the previous release (`prefix`,
    for context such as a dropped leading space) plus the new ones. Concatenating every
    `push()` and the final `flush()` gives `decode(all ids)`.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of what was released

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", never half a character)."""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Release whatever is held back (an unfinished character becomes U+FFFD)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        released = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(released) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(released) :]
