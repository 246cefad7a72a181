"""A multi-turn conversation on top of a Pipeline: history, context fitting, streaming text.

The chat template is the model's own (tokenizer.py); the KV cache of the previous turn is
reused because each new prompt starts with the previous one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fastserve_edge.engine.generate import GenerationStats, Pipeline
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.errors import ContextOverflow


@dataclass
class Turn:
    stats: GenerationStats = field(default_factory=GenerationStats)
    text: str = ""
    dropped_messages: int = 0   # oldest messages dropped to fit the context


class ChatSession:
    """One person's conversation. `ask()` streams the answer's text pieces."""

    def __init__(self, pipeline: Pipeline, tokenizer, params: SamplingParams, *,
                 max_tokens: int, system: str | None = None,
                 notice: Callable[[str], None] = lambda message: None):
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.params = params
        self.max_tokens = max_tokens
        self.system = system
        self.notice = notice
        self.messages: list[dict[str, str]] = []
        self.session = uuid.uuid4().hex
        self.last = Turn()

    def reset(self) -> None:
        self.messages.clear()
        self.pipeline.drop(self.session)

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[int], int]:
        """Prompt ids that leave room for an answer; drops the oldest turns (never the system)."""
        ctx = self.pipeline.ctx
        room = min(self.max_tokens, ctx // 4)  # answer space kept free when history is long
        dropped = 0
        while True:
            ids = self.tokenizer.encode_chat(self._with_system(messages))
            if len(ids) + room <= ctx or len(messages) <= 1:
                break
            # drop the oldest user message and the assistant answer that followed it
            cut = 2 if len(messages) > 2 and messages[1]["role"] == "assistant" else 1
            messages, dropped = messages[cut:], dropped + cut
        if len(ids) >= ctx:
            raise ContextOverflow(
                f"this message is {len(ids)} tokens with the chat template, but the context holds {ctx}; "
                "send a shorter message or start with a larger --ctx"
            )
        return ids, dropped

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`. Closing the iterator early (Ctrl-C) keeps what was said."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids, dropped = self._fit(messages)
        self.messages = messages[dropped:]
        if dropped:
            self.notice(f"the conversation outgrew the context ({self.pipeline.ctx} tokens): "
                        f"dropped the {dropped} oldest message(s)")
        turn = self.last = Turn(dropped_messages=dropped)
        decoder = self.tokenizer.stream_decoder()
        sampler = Sampler(self.params)
        try:
            for token in self.pipeline.generate(self.session, ids, sampler, max_tokens=self.max_tokens,
                                                stop_ids=self.tokenizer.stop_ids, stats=turn.stats):
                piece = decoder.push(token)
                if piece:
                    turn.text += piece
                    yield piece
            tail = decoder.flush()
            if tail:
                turn.text += tail
                yield tail
        finally:
            self.messages.append({"role": "assistant", "content": turn.text})
