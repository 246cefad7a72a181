"""OpenAI's shapes of log-probabilities, from the engine's TokenLogprobs (engine/sampling.py).

    chat:        choices[i].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token,
                 logprob, bytes}]}], "refusal": null}
    completions: choices[i].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}],
                 text_offset} (the legacy shape; text_offset counts characters from the start of
                 the prompt, as OpenAI's does without echo)

A token's `bytes` are its exact UTF-8 bytes, also when it holds only part of a character (a
byte-level BPE piece, a SentencePiece <0xNN> byte); its `token` text is those bytes decoded,
or, when they are not whole characters, "bytes:" and their \\xNN escapes, as OpenAI writes them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from fastserve_edge.engine.sampling import TokenLogprobs
from fastserve_edge.models.tokenizer import _byte_alphabet

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"


class TokenTexts:
    """Token id -> its bytes and text, for one tokenizer (cached: a vocabulary is fixed)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_of = {c: b for b, c in _byte_alphabet().items()}
        self.bytes = lru_cache(maxsize=65536)(self._bytes)
        self.text = lru_cache(maxsize=65536)(self._text)

    def _bytes(self, token_id: int) -> bytes:
        spelled = self.tokenizer.token_text(token_id) or ""
        byte = _BYTE_TOKEN.fullmatch(spelled)
        if byte:  # SentencePiece's byte fallback
            return bytes([int(byte.group(1), 16)])
        if _SPM_SPACE in spelled:  # SentencePiece text: the decoder would strip a leading space
            return spelled.replace(_SPM_SPACE, " ").encode()
        text = self.tokenizer.decode([token_id], skip_special=False)
        if "\ufffd" not in text:
            return text.encode()
        # a byte-level piece of a character: its spelling maps back to its bytes one to one
        if spelled and all(c in self._byte_of for c in spelled):
            return bytes(self._byte_of[c] for c in spelled)
        return text.encode()

    def _text(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def item(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token_id), "logprob": logprob, "bytes": list(self.bytes(token_id))}


def chat_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts) -> dict[str, Any]:
    """choices[i].logprobs of a chat completion (or of one chunk: the tokens it carries)."""
    content = [{**texts.item(e.token, e.logprob), "top_logprobs": [texts.item(t, lp) for t, lp in e.top]}
               for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts, offset: int) -> tuple[dict[str, Any], int]:
    """choices[i].logprobs of a legacy completion (or chunk) whose first token starts at
    character `offset` -> (it, the offset after its last token)."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for e in entries:
        text = texts.text(e.token)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({texts.text(t): lp for t, lp in e.top})
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}, offset
