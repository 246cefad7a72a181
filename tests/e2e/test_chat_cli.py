"""`fastserve chat` as a person uses it: in a pseudo-terminal, and through pipes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.conftest import TEST_HOME

FASTSERVE = str(Path(sys.executable).parent / "fastserve")
PROMPT = ">>> "
STATS = re.compile(r"(\d+) prompt tokens( \((\d+) cached\))? · (\d+) generated")


def env(home: Path = TEST_HOME) -> dict[str, str]:
    return {**os.environ, "FASTSERVE_HOME": str(home), "COLUMNS": "200", "TERM": "xterm", "NO_COLOR": "1"}


def spawn(*args: str, timeout: int = 120, preexec_fn=None) -> pexpect.spawn:
    child = pexpect.spawn(FASTSERVE, ["chat", *args], env=env(), encoding="utf-8", timeout=timeout,
                          dimensions=(50, 200), preexec_fn=preexec_fn)
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, text: str) -> tuple[str, re.Match]:
    child.sendline(text)
    child.expect(STATS)
    answer, stats = child.before, child.match
    child.expect_exact(PROMPT)
    return answer, stats


@pytest.fixture(scope="module")
def model(smollm2_path) -> str:
    return "smollm2-135m" if not os.environ.get("FASTSERVE_TEST_SMOLLM2") else str(smollm2_path)


def test_interactive_answer_about_france_says_paris(model):
    child = spawn(model, "--temperature", "0")
    answer, stats = ask(child, "What is the capital of France?")
    assert "Paris" in answer
    assert int(stats.group(4)) > 0
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(model):
    child = spawn(model, "--temperature", "0.8", "--seed", "1", "--max-tokens", "2000", "--ctx", "2048")
    request = "Write a very long story about a dragon who learns to cook, with many chapters."
    child.sendline(request)
    child.expect_exact(request)  # the terminal's echo of what was typed
    child.expect(r"\w+ \w+ \w+ \w+", timeout=60)  # the answer has started streaming
    child.sendintr()
    child.expect("stopped")
    child.expect(STATS)
    generated = int(child.match.group(4))
    assert 0 < generated < 2000
    child.expect_exact(PROMPT)
    # the chat goes on: the next question is answered (and can be stopped the same way)
    child.sendline("What is the capital of France? Answer in one word.")
    child.expect("Paris", timeout=60)
    child.sendintr()
    child.expect(STATS)
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)


def test_two_ctrl_c_at_the_prompt_leave(model):
    child = spawn(model)
    child.sendintr()
    child.expect("Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_ctrl_c_works_when_started_with_sigint_ignored(model):
    """A shell's background job (`cmd &`) starts with SIGINT ignored, and Python then never
    raises KeyboardInterrupt: the chat takes Ctrl-C back."""
    import signal

    child = spawn(model, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    child.sendintr()
    child.expect("Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_reset_forgets_the_conversation(model):
    child = spawn(model, "--temperature", "0", "--max-tokens", "16")
    _, first = ask(child, "Hello there!")
    _, second = ask(child, "How are you?")
    assert int(second.group(1)) > int(first.group(1))  # history is part of the prompt
    assert second.group(3)  # and its KV cache was reused
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect_exact(PROMPT)
    _, again = ask(child, "Hello there!")
    assert int(again.group(1)) == int(first.group(1))
    assert again.group(3) is None  # nothing cached any more
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_context_overflow_drops_oldest_turns_and_keeps_going(model):
    child = spawn(model, "--temperature", "0", "--ctx", "160", "--max-tokens", "24",
                  "--system", "You are terse.")
    dropped = False
    for i in range(8):
        child.sendline(f"Tell me fact number {i} about the ocean, please, in one sentence.")
        idx = child.expect([STATS, "dropped the"])
        if idx == 1:
            dropped = True
            child.expect(STATS)
        assert int(child.match.group(1)) < 160
        child.expect_exact(PROMPT)
    assert dropped
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_a_message_longer_than_the_context_is_an_error_not_a_crash(model):
    child = spawn(model, "--temperature", "0", "--ctx", "64")
    child.sendline("word " * 200)
    child.expect("context holds 64")
    child.expect_exact(PROMPT)
    answer, _ = ask(child, "Hi")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def run(*args: str, stdin: str | None = None, home: Path = TEST_HOME) -> subprocess.CompletedProcess:
    return subprocess.run([FASTSERVE, *args], input=stdin, capture_output=True, text=True, env=env(home), timeout=300)


def test_prompt_flag_prints_only_the_answer_on_stdout(model):
    result = run("chat", model, "-p", "What is the capital of France?", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "prompt tokens" not in result.stdout and "prompt tokens" in result.stderr


def test_stdin_that_is_not_a_terminal_is_the_prompt(model):
    result = run("chat", model, "--temperature", "0", "--max-tokens", "24", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_seeded_sampling_is_reproducible(model):
    args = ("chat", model, "-p", "Name a fruit.", "--temperature", "1.0", "--seed", "42", "--max-tokens", "20")
    assert run(*args).stdout == run(*args).stdout


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_missing_model_path(tmp_path):
    assert_clean_failure(run("chat", str(tmp_path / "nope.gguf"), "-p", "hi"), "nope.gguf")


def test_unknown_alias(tmp_path):
    assert_clean_failure(run("chat", "no-such-model", "-p", "hi"), "no-such-model")


def test_truncated_gguf(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(5_000_000))
    assert_clean_failure(run("chat", str(cut), "-p", "hi"), "truncated")


def test_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 100)
    assert_clean_failure(run("chat", str(junk), "-p", "hi"), "junk.gguf")


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "-1", "--temperature"),
    ("--top-p", "2", "--top-p"),
    ("--ctx", "100000000", "--ctx"),
    ("--threads", "0", "--threads"),
    ("--max-tokens", "0", "--max-tokens"),
])
def test_flag_out_of_range(model, flag, value, needle):
    assert_clean_failure(run("chat", model, "-p", "hi", flag, value), needle)
