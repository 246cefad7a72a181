"""`fastserve bench` as a script uses it."""

from __future__ import annotations

import json

from tests.e2e.test_chat_cli import assert_clean_failure, run


def test_bench_json_has_the_contract_keys(smollm2_path):
    result = run("bench", str(smollm2_path), "--threads", "1", "--prompt-tokens", "24", "--gen-tokens", "4",
                 "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "cold_ttft_s", "load_s", "peak_rss_bytes", "threads", "model"):
        assert key in report
    assert report["threads"] == 1 and report["activations"] == "int16"  # the default precision
    assert report["prefill_tok_s"] > 0 and report["decode_tok_s"] > 0 and report["ttft_s"] > 0
    assert report["load_s"] > 0 and report["cold_ttft_s"] > 0  # bench/vs_llamacpp.py's load + first token
    # its own peak (VmHWM): at least the mapped model, far below what a parent could leak in
    assert smollm2_path.stat().st_size / 4 < report["peak_rss_bytes"] < 4 * 2**30


def test_bench_table_without_json(smollm2_path):
    result = run("bench", str(smollm2_path), "--prompt-tokens", "16", "--gen-tokens", "2", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "decode tok/s" in result.stdout and "peak RSS" in result.stdout


def test_bench_flags_out_of_range(smollm2_path):
    assert_clean_failure(run("bench", str(smollm2_path), "--gen-tokens", "0"), "--gen-tokens")
    assert_clean_failure(run("bench", str(smollm2_path), "--prompt-tokens", "9000"), "--prompt-tokens")


def test_bench_with_int8_activations_reports_them(smollm2_path):
    result = run("bench", str(smollm2_path), "--threads", "1", "--prompt-tokens", "24", "--gen-tokens", "4",
                 "--repeats", "1", "--activations", "int8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["activations"] == "int8" and report["decode_tok_s"] > 0


def test_an_unknown_activation_precision_is_refused_before_loading(smollm2_path):
    for command in (["bench", str(smollm2_path)], ["chat", str(smollm2_path), "--local-only", "-p", "hi"]):
        result = run(*command, "--activations", "int4")
        assert_clean_failure(result, "--activations must be one of int16, int8, got 'int4'")
