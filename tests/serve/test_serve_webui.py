"""The web page in a real headless browser (Debian's chromium driven by Playwright; no
browser download): a streamed chat answer is rendered, a FIM completion appears in place in
the playground, and nothing is fetched from outside the server. Screenshots are kept as
test artifacts (in $CODESHELL_ARTIFACTS when set, else in pytest's temp folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import require_tool

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api.expect.set_options(timeout=60_000)  # CI shares 2 cores: be patient, not flaky


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    # like every missing toolchain in this project (fails instead where CI requires it)
    require_tool("chromium", CHROMIUM is not None, "Debian's chromium is not installed (run .ci/install-serve.sh)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1100, "height": 800})
        pg.set_default_timeout(60_000)
        outside = []
        pg.on("request", lambda r: None if r.url.startswith(server.url) else outside.append(r.url))
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(server.url + "/")
        pg.outside = outside
        yield pg
        browser.close()


def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ.get("CODESHELL_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_chat_streams_and_renders(page, model_name, tmp_path_factory):
    sync_api.expect(page.locator("#model")).to_have_text(model_name)
    page.fill("#chat-input", "Write a Python function that adds two numbers")
    page.click(".settings summary")
    page.fill("#chat-max", "24")
    page.fill("#chat-temp", "0")
    page.press("#chat-input", "Enter")
    sync_api.expect(page.locator(".msg.user")).to_have_text("Write a Python function that adds two numbers")
    answer = page.locator(".msg.assistant").last
    sync_api.expect(answer).not_to_have_class("streaming", timeout=60_000)
    page.wait_for_function("!document.querySelector('.msg.streaming') && !document.getElementById('send').disabled")
    assert answer.inner_text().strip() != ""
    assert page.locator("#conversations li").count() >= 1
    page.screenshot(path=str(artifacts(tmp_path_factory) / "webui-chat.png"), full_page=True)
    # Kept in the browser: after a reload the conversation is still there.
    page.reload()
    sync_api.expect(page.locator(".msg.user").first).to_have_text("Write a Python function that adds two numbers")
    assert page.outside == [] and page.errors == []


def test_markdown_code_block_has_copy_button(page):
    html = page.evaluate("CSMarkdown.render('Here:\\n```python\\ndef f(x):\\n    return x  # id\\n```\\n')")
    assert 'class="codeblock"' in html and 'class="copy"' in html and 'tok-keyword' in html


def test_playground_fim_in_place(page, tmp_path_factory):
    page.click("#tab-play")
    page.fill("#play-prefix", "def add(a, b):\n")
    page.fill("#play-suffix", "\n\nprint(add(1, 2))\n")
    page.fill("#play-max", "12")
    page.press("#play-prefix", "Control+Enter")
    page.wait_for_selector("#play-result.done", timeout=60_000)
    text = page.inner_text("#play-result")
    assert text.startswith("def add(a, b):") and text.rstrip().endswith("print(add(1, 2))")
    assert page.locator("#play-result mark.fim").count() == 1
    page.screenshot(path=str(artifacts(tmp_path_factory) / "webui-playground.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 800})  # phone-sized
    page.click("#tab-chat")
    page.screenshot(path=str(artifacts(tmp_path_factory) / "webui-phone.png"))
    assert page.outside == [] and page.errors == []
