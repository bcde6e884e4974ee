"""The chat web app in a real browser (Debian's chromium, driven by Playwright): send, stream, reload, a tool
call answered for the tool, and typeset math."""

from __future__ import annotations

import json
import os

import pytest
from test_clients import TOOLS, deepseek_calls, pieces
from test_serve import CORPUS, LiveServer, ScriptedEngine

from seekling.tokenizer import train_tokenizer

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_chat_in_browser(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    engine = ScriptedEngine(train_tokenizer(CORPUS, vocab_size=300), step_delay=0.05)
    server = LiveServer(engine, data_dir=str(tmp_path), api_key=["browser-key-1"])
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append("request failed: " + r.url))
            page.goto(server.url + "/")
            # Without the key the app says so and opens the settings; with it, it loads.
            page.wait_for_selector("#error:not([hidden])")
            assert "API key" in page.inner_text("#error")
            page.fill("#api-key", "browser-key-1")
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector("#error", state="hidden")

            page.fill("#input", "What is `2 + 2`?")
            page.press("#input", "Enter")
            page.wait_for_selector("#stop:not([hidden])")  # streaming: the stop button is up
            page.wait_for_selector(".msg.assistant .actions", timeout=15000)  # finished
            reasoning, answer = engine.script(engine.prompts[-1])
            summary = page.inner_text(".msg.assistant details.thinking summary")
            assert summary.startswith("Thought for ") and summary.endswith(" s")
            assert page.text_content(".msg.assistant .reasoning") == "".join(reasoning)
            assert page.inner_text(".msg.assistant .bubble").strip() == "".join(answer)
            page.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
            page.screenshot(path="/tmp/seekling_webapp.png")

            page.reload()
            page.wait_for_selector(".msg.assistant .actions")
            assert page.is_hidden("#settings")  # hidden until asked for (the key is known now)
            assert page.inner_text("#conversations li") == "What is `2 + 2`?"
            assert page.inner_text(".msg.user .bubble") == "What is `2 + 2`?"
            assert page.inner_text(".msg.assistant .bubble").strip() == "".join(answer)

            # Markdown with a fenced code block is rendered and highlighted.
            engine.script = lambda prompt: (["ok"], ["Here:\n\n```python\nprint(1)\n```\n"])
            page.click("text=Regenerate")
            page.wait_for_selector(".msg.assistant pre code.hljs", timeout=15000)
            assert page.inner_text(".msg.assistant pre code").strip() == "print(1)"
            page.screenshot(path="/tmp/seekling_webapp_code.png")

            # Tools from the settings: the model's call is shown, the user answers for the tool, and the answer
            # that follows has its formulas typeset.
            page.click("#toggle-settings")
            page.fill("#tools", json.dumps(TOOLS[:1]))
            page.dispatch_event("#tools", "change")
            engine.script = lambda prompt: (["Need", " the", " tool."],
                                            pieces(deepseek_calls(("get_weather", {"city": "Paris"}))))
            page.fill("#input", "Weather in Paris?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant .tool-call textarea.tool-result", timeout=15000)
            assert page.inner_text(".msg.assistant:last-child .tool-name") == "Tool call: get_weather"
            assert json.loads(page.inner_text(".msg.assistant:last-child pre.tool-args")) == {"city": "Paris"}
            assert "## Tools" in engine.prompts[-1] and "get_weather" in engine.prompts[-1]
            engine.script = lambda prompt: (["ok"], pieces("So $x^2 = 4$ and the total is \\boxed{629}:\n\n"
                                                           "\\[ \\frac{1}{2} \\]\n"))
            page.fill("textarea.tool-result", "sunny, 21 C")
            page.click("text=Send tool results")
            page.wait_for_selector(".msg.assistant:last-child .actions", timeout=15000)
            assert page.inner_text(".msg.tool .bubble") == "get_weather → sunny, 21 C"
            assert "<｜tool▁output▁begin｜>sunny, 21 C<｜tool▁output▁end｜>" in engine.prompts[-1]
            last = ".msg.assistant:last-child .bubble"
            assert page.locator(f"{last} .katex").count() == 3 and page.locator(f"{last} .katex-display").count() == 1
            tex = page.eval_on_selector_all(f"{last} annotation", "els => els.map(e => e.textContent)")
            assert tex == ["x^2 = 4", "\\boxed{629}", " \\frac{1}{2} "]
            assert "\\boxed" not in page.inner_text(last)  # typeset, not shown as raw LaTeX
            page.screenshot(path="/tmp/seekling_webapp_math.png")
            browser.close()
            assert errors == []
    finally:
        server.close()
