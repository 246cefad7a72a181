"""The chat's prompt loop (cli/chat.py repl) and Ctrl-C, driven without a terminal: a console
whose input and print replay a script, so a Ctrl-C can land at a chosen point."""

from __future__ import annotations

import pytest

from cli import chat as chat_cli

HINT = "Ctrl-C again"


class ScriptedConsole:
    """input() takes the next step of `script` (a string to return or an exception to raise);
    print() raises KeyboardInterrupt while printing the hint if `ctrl_c_at_hint`."""

    def __init__(self, script: list, ctrl_c_at_hint: bool = False):
        self.script, self.ctrl_c_at_hint, self.printed = list(script), ctrl_c_at_hint, []

    def input(self, prompt: str) -> str:
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    def print(self, *args, **kwargs) -> None:
        text = " ".join(str(a) for a in args)
        self.printed.append(text)
        if self.ctrl_c_at_hint and HINT in text:
            raise KeyboardInterrupt  # the second Ctrl-C, right as the hint goes out


class NoChat:
    def reset(self) -> None:
        raise AssertionError("not asked")


def run(monkeypatch, console: ScriptedConsole) -> None:
    monkeypatch.setattr(chat_cli, "Console", lambda: console)
    chat_cli.repl(NoChat())


def test_a_second_ctrl_c_while_the_hint_is_printed_leaves_without_a_traceback(monkeypatch):
    """Under load the second Ctrl-C can come as the hint is printed; it leaves, as a second
    Ctrl-C does, rather than escaping the loop as KeyboardInterrupt (exit status 1)."""
    console = ScriptedConsole([KeyboardInterrupt()], ctrl_c_at_hint=True)
    try:
        run(monkeypatch, console)
    except KeyboardInterrupt:  # not raised on: it would end the whole test run
        pytest.fail("the second Ctrl-C escaped the chat loop")
    assert any(HINT in p for p in console.printed)


@pytest.mark.parametrize("between", ["", "  "])
def test_one_ctrl_c_shows_the_hint_and_a_line_forgets_it(monkeypatch, between):
    """Ctrl-C, a (blank) line, Ctrl-C: only a hint each time, then /exit leaves."""
    console = ScriptedConsole([KeyboardInterrupt(), between, KeyboardInterrupt(), "/exit"])
    run(monkeypatch, console)
    assert sum(HINT in p for p in console.printed) == 2 and not console.script
