"""Several streaming chat clients at once (the async `openai` package), for tests that run the
server where the test process cannot reach it (inside a network namespace):

    python tests/integration/stream_clients.py URL KEY MAX_TOKENS QUESTION...

Prints "streaming" on stderr once every stream has sent its first text, and the answers as a
JSON list on stdout at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys

import openai


async def main(url: str, key: str, max_tokens: int, questions: list[str]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    started = 0

    async def one(q: str) -> str:
        nonlocal started
        stream = await client.chat.completions.create(
            model=(await client.models.list()).data[0].id, messages=[{"role": "user", "content": q}],
            temperature=0, max_tokens=max_tokens, stream=True)
        pieces: list[str] = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not pieces:
                    started += 1
                    if started == len(questions):
                        print("streaming", file=sys.stderr, flush=True)
                pieces.append(chunk.choices[0].delta.content)
        return "".join(pieces)

    try:
        return await asyncio.gather(*(one(q) for q in questions))
    finally:
        await client.close()


if __name__ == "__main__":
    url, key, max_tokens, *questions = sys.argv[1:]
    print(json.dumps(asyncio.run(main(url, key, int(max_tokens), questions))))
