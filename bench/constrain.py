"""What a grammar costs per token in `fastserve serve`'s batched decode: one decode step of
--sessions sessions (Pipeline.next_tokens, as the engine loop runs it) with plain samplers,
and with every session held to a JSON grammar (constrain.GrammarMask: llguidance's mask,
unpacked and applied before the sampling chain, then the token consumed).

    python bench/constrain.py                       # SmolLM2, 8 sessions, 24 steps, threads 2
    python bench/constrain.py --sessions 4 --steps 48 --threads 1

Prints the median step time of both, the mask's own time per session-token (computed on
the matcher states the constrained run went through) and its share of a plain step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastserve_edge.engine.generate import DecodeStep
from fastserve_edge.engine.local import load_local_model
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.serving import constrain
from tests.models_fixtures import smollm2_path

PROMPT = "Describe a person as a JSON object with their name, age and city."
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}}, "required": ["name", "age", "city"]}


def run(model, sessions: int, steps: int, constrained: bool, tag: str) -> tuple[list[float], list[float]]:
    """-> (seconds of each decode step, seconds of each mask computed)."""
    tok, pipe = model.tokenizer, model.pipeline
    prompt = tok.encode_chat([{"role": "user", "content": PROMPT}])
    grammar = constrain.json_schema_grammar(SCHEMA, strict=True, param="bench")
    params = SamplingParams(temperature=0.7, seed=0, repeat_penalty=1.0)
    samplers, masks = [], []
    for i in range(sessions):
        mask = constrain.GrammarMask.build(tok, grammar, param="bench") if constrained else None
        masks.append(mask)
        samplers.append(Sampler(params, mask))
    contexts = []
    for i, s in enumerate(samplers):
        first = pipe.next_token(f"{tag}{i}", prompt, 0, s, prompt)
        s.accept(first)
        contexts.append(prompt + [first])
    step_s, mask_s = [], []
    for _ in range(steps):
        if constrained:
            for m in masks:
                if m.matcher.is_stopped():
                    continue
                t0 = time.perf_counter()
                m.mask(torch.zeros(tok.vocab_size))
                mask_s.append(time.perf_counter() - t0)
        batch = [DecodeStep(f"{tag}{i}", c[-1], len(c) - 1, samplers[i], c) for i, c in enumerate(contexts)]
        t0 = time.perf_counter()
        tokens = pipe.next_tokens(batch)
        step_s.append(time.perf_counter() - t0)
        for i, t in enumerate(tokens):
            if t not in tok.stop_ids:
                samplers[i].accept(t)
            contexts[i].append(t)
    for i in range(sessions):
        pipe.drop(f"{tag}{i}")
    return step_s, mask_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_local_model(smollm2_path(), ctx=512)
    constrain.vocabulary(model.tokenizer)  # built once per model; not a per-token cost
    run(model, args.sessions, 2, False, "warm")
    plain, _ = run(model, args.sessions, args.steps, False, "p")
    held, masks = run(model, args.sessions, args.steps, True, "c")
    p, c, m = statistics.median(plain), statistics.median(held), statistics.median(masks)
    print(f"SmolLM2-135M Q4_1, {args.sessions} sessions, {args.threads} threads, {args.steps} steps")
    print(f"decode step, plain samplers:     {p * 1e3:8.2f} ms (median)")
    print(f"decode step, JSON grammar each:  {c * 1e3:8.2f} ms (median)")
    print(f"mask per session-token:          {m * 1e6:8.1f} us (median), {max(masks) * 1e6:.1f} us (max); "
          f"{args.sessions} of them = {100 * args.sessions * m / p:.1f}% of a plain step")


if __name__ == "__main__":
    main()
