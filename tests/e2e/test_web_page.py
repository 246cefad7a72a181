"""The web page of `fastserve serve` as a person uses it: Debian's chromium, headless, driven by
selenium through chromium-driver, against a real server on loopback with the real SmolLM2 model
(and an API key, typed into the page). scripts/setup.sh test installs chromium where it can; the
tests are skipped, saying so, where it is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.integration.test_serve_api import KEY, QUESTION, metrics, raw, running_server

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
LONG_STORY = "Write a very long story about a dragon."
WAIT_S = 120  # an answer on a busy 2-core machine


@pytest.fixture(scope="module")
def server(smollm2_path) -> Iterator[str]:
    model = str(smollm2_path) if os.environ.get("FASTSERVE_TEST_SMOLLM2") else "smollm2-135m"
    with running_server(model, "--max-sessions", "2") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed: apt-get install chromium chromium-driver "
                    "(scripts/setup.sh test does it when run as root on Debian)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,820", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def bubbles(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg")


def type_into(driver, element_id: str, text: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def ask(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    by_id(driver, "input").send_keys(text, Keys.ENTER)  # Enter sends


def stored_conversation(driver) -> list[dict]:
    return json.loads(driver.execute_script("return localStorage.getItem('fastserve.conversation')") or "[]")


def csp_violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]


def greedy_answer(server: str, text: str, max_tokens: int) -> str:
    model = json.loads(raw(server, "GET", "/v1/models")[1])["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
            "max_tokens": max_tokens}
    status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, answer
    return json.loads(answer)["choices"][0]["message"]["content"]


def cancelled(m: dict[str, float]) -> float:
    return m.get('fastserve_sessions_finished_total{reason="cancelled"}', 0)


def test_the_page_and_its_files_need_no_key_and_carry_a_strict_policy(server):
    with urllib.request.urlopen(server + "/", timeout=30) as response:
        headers, page = response.headers, response.read().decode()
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    # nothing inline for the policy to refuse: scripts by src, no handlers, no style attributes
    assert not re.search(r"<script(?![^>]*\bsrc=)", page) and not re.search(r"\s(on[a-z]+|style)\s*=", page)
    for path, kind in (("/web/app.js", "text/javascript"), ("/web/style.css", "text/css")):
        with urllib.request.urlopen(server + path, timeout=30) as response:
            assert response.headers["Content-Type"].startswith(kind)
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert raw(server, "GET", "/v1/status", key=None)[0] == 401  # what the page fetches still wants the key
    status, body = raw(server, "GET", "/v1/status")
    s = json.loads(body)
    assert s["layout"] == "single" and s["kv_budget_tokens"] > 0
    (machine,) = s["machines"]
    assert machine["name"] == "this machine" and machine["layers"] == [0, 30] and machine["in_use"]


def test_chat_streams_stops_and_is_kept_across_a_reload(server, browser, tmp_path):
    driver = browser
    expected = greedy_answer(server, QUESTION, 24)
    driver.get(server + "/")
    # without the key the cluster panel says what to do; with it, it shows this machine
    wait_until(driver, lambda d: "API key" in by_id(d, "status-error").text, "no hint to enter the API key")
    type_into(driver, "api-key", KEY)
    type_into(driver, "temperature", "0")
    type_into(driver, "max-tokens", "24")
    wait_until(driver, lambda d: "this machine" in by_id(d, "machines").text, "the machines panel is empty", 20)
    assert "layers 0–29" in by_id(driver, "machines").text
    assert not by_id(driver, "status-error").is_displayed()

    ask(driver, QUESTION)
    wait_until(driver, lambda d: len(bubbles(d)) == 2 and bubbles(d)[1].get_attribute("data-done") == "1",
               "the answer never finished")
    answer = bubbles(driver)[1]
    assert int(answer.get_attribute("data-deltas")) > 1  # it came in pieces, as they were generated
    conversation = stored_conversation(driver)
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[1]["content"] == expected  # the page's streamed answer is the API's greedy one
    assert "Paris" in answer.text

    # stop during a long answer: the stream ends, the server cancels the session
    before = cancelled(metrics(server))
    type_into(driver, "max-tokens", "400")
    ask(driver, LONG_STORY)
    wait_until(driver, lambda d: len(bubbles(d)) == 4 and int(bubbles(d)[3].get_attribute("data-deltas") or 0) >= 5,
               "the long answer did not start")
    assert by_id(driver, "send").get_attribute("disabled") is not None
    # the cluster view, polled every 2 s, shows the session while it runs
    wait_until(driver, lambda d: "running" in by_id(d, "sessions").text, "no running session in the view", 10)
    assert re.search(r"generating\s+[\d.]+ tokens/s", by_id(driver, "summary").text), by_id(driver, "summary").text
    streaming = tmp_path / "streaming.png"
    driver.save_screenshot(str(streaming))
    print(f"\nscreenshot while an answer streams: {streaming}")
    by_id(driver, "stop").click()
    wait_until(driver, lambda d: bubbles(d)[3].get_attribute("data-done") == "1", "stop did not end the answer", 10)
    assert "(stopped)" in bubbles(driver)[3].text
    assert by_id(driver, "stop").get_attribute("disabled") is not None
    assert by_id(driver, "send").get_attribute("disabled") is None
    deadline = time.monotonic() + 10
    while not ((m := metrics(server))["fastserve_active_sessions"] == 0 and cancelled(m) == before + 1):
        assert time.monotonic() < deadline, f"the server did not cancel the stopped answer: {m}"
        time.sleep(0.05)
    stopped = stored_conversation(driver)[3]
    assert stopped["note"] == "(stopped)" and 0 < len(stopped["content"])
    time.sleep(0.5)
    assert stored_conversation(driver)[3]["content"] == stopped["content"]  # nothing more arrived

    # a reload keeps the conversation and the key
    driver.refresh()
    wait_until(driver, lambda d: len(bubbles(d)) == 4, "the conversation was not kept")
    shown = bubbles(driver)
    assert shown[0].text == QUESTION and shown[2].text == LONG_STORY
    assert "Paris" in shown[1].text and "(stopped)" in shown[3].text
    assert by_id(driver, "api-key").get_attribute("value") == KEY
    wait_until(driver, lambda d: "this machine" in by_id(d, "machines").text, "no machines after the reload", 20)
    assert csp_violations(driver) == []
    shot = tmp_path / "web_page.png"
    driver.save_screenshot(str(shot))
    print(f"\nscreenshot of the web page: {shot}")

    by_id(driver, "new-chat").click()
    assert bubbles(driver) == [] and stored_conversation(driver) == []


HOSTILE = ("<img src=x onerror=\"window.pwned=1\"> **bold** and *italic*, `<b>code</b>`\n\n"
           "- one\n- two\n\n1. first\n2. second\n\n"
           "[a link](https://example.org/a?b=1&c=2) and [not one](javascript:window.pwned=1)\n\n"
           "```python\n<script>window.pwned=1</script>\nprint('hi')\n```\n")


def test_markdown_from_storage_is_rendered_and_nothing_in_it_runs(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(server + "/")
    driver.execute_script("localStorage.setItem('fastserve.conversation', arguments[0])", json.dumps(
        [{"role": "user", "content": "<b>show markdown</b>"}, {"role": "assistant", "content": HOSTILE}]))
    driver.refresh()
    wait_until(driver, lambda d: len(bubbles(d)) == 2, "the stored conversation was not shown")
    user, answer = bubbles(driver)
    assert user.text == "<b>show markdown</b>" and user.find_elements(By.TAG_NAME, "b") == []
    assert answer.find_elements(By.CSS_SELECTOR, "img, script, b") == []
    assert [e.text for e in answer.find_elements(By.TAG_NAME, "strong")] == ["bold"]
    assert [e.text for e in answer.find_elements(By.TAG_NAME, "em")] == ["italic"]
    assert answer.find_element(By.CSS_SELECTOR, "p code").text == "<b>code</b>"
    assert [e.text for e in answer.find_elements(By.CSS_SELECTOR, "ul li")] == ["one", "two"]
    assert [e.text for e in answer.find_elements(By.CSS_SELECTOR, "ol li")] == ["first", "second"]
    (link,) = answer.find_elements(By.TAG_NAME, "a")
    assert link.get_attribute("href") == "https://example.org/a?b=1&c=2" and link.text == "a link"
    assert set(link.get_attribute("rel").split()) >= {"noopener", "noreferrer"}
    assert "[not one](javascript:window.pwned=1)" in answer.text
    assert answer.find_element(By.CSS_SELECTOR, "pre code").text == "<script>window.pwned=1</script>\nprint('hi')"
    assert driver.execute_script("return window.pwned === undefined")
    assert csp_violations(driver) == []
    shot = tmp_path / "markdown.png"
    driver.save_screenshot(str(shot))
    print(f"\nscreenshot of the markdown: {shot}")
