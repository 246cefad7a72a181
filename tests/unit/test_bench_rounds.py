"""bench/vs_llamacpp.py --rounds: llama.cpp and ours measured alternately, each side's figures over its rounds."""

from __future__ import annotations

import pytest

from bench.vs_llamacpp import over_rounds, parse_args


def run(prefill: float, decode: float, rss: int, noisy: bool = False) -> tuple[dict, None]:
    return ({"prefill_tok_s": prefill, "decode_tok_s": decode, "ttft_s": 512 / prefill, "load_s": 1.0,
             "cold_ttft_s": 0.5, "wall_s": 30.0, "peak_rss_bytes": rss, "noisy": noisy, "threads": 2}, None)


def test_each_figure_is_the_median_over_the_rounds_and_rss_the_highest():
    data, problem = over_rounds([run(60, 20, 100), run(70, 18, 300), run(50, 25, 200, noisy=True)])
    assert problem is None
    assert data["prefill_tok_s"] == 60 and data["decode_tok_s"] == 20 and data["ttft_s"] == 512 / 60
    assert data["peak_rss_bytes"] == 300 and data["noisy"] and data["threads"] == 2
    assert [r["prefill_tok_s"] for r in data["rounds"]] == [60, 70, 50]


def test_failed_rounds_are_left_out_and_all_failed_gives_the_first_problem():
    data, _ = over_rounds([(None, "timed out"), run(40, 10, 5)])
    assert data["prefill_tok_s"] == 40 and len(data["rounds"]) == 1
    assert over_rounds([(None, "timed out"), (None, "crashed")]) == (None, "timed out")
    assert over_rounds([]) == (None, None)


def test_rounds_below_one_are_refused(capsys):
    assert parse_args(["--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
