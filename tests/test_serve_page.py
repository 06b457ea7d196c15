"""The chat page at / in a real headless browser: Debian's chromium driven by Playwright
(executable_path: Playwright cannot download its own browser here). Streaming, a second turn, the
stop button, the API key asked once. A screenshot is saved under the test's tmp dir on failure."""

from __future__ import annotations

import json
import shutil

import pytest

from kit import Served

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (`apt-get install chromium`; .ci/run does it)")
KEY = "page-key-0123456789"
pytestmark = [pytestmark, pytest.mark.slow]  # a server process and a browser


@pytest.fixture(scope="module")
def sampling_model(tiny_model, tmp_path_factory):
    """The tiny model with a sampling generation_config: its replies are visible text, not newlines."""
    out = tmp_path_factory.mktemp("sampling") / "model"
    shutil.copytree(tiny_model, out)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                           "max_new_tokens": 48, "eos_token_id": 2}))
    return out


@pytest.fixture
def page(tmp_path, request):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                          "--disable-background-networking"])
        page = browser.new_page()
        yield page
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            page.screenshot(path=str(tmp_path / "failure.png"))
        browser.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    setattr(item, "rep_" + outcome.get_result().when, outcome.get_result())


def test_page_streams_two_turns_and_stops(sampling_model, page, tmp_path):
    with Served("--model", str(sampling_model), "--served-model-name", "tiny", "--api-key", KEY) as s:
        try:
            page.on("dialog", lambda d: d.accept(KEY))  # the key, asked once for this tab
            page.goto(s.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=30000)
            page.fill("#input", "How do I restart a deployment?")
            page.keyboard.press("Enter")
            page.wait_for_selector(".assistant[data-done='1']", timeout=60000)
            first = page.inner_text(".assistant >> nth=0")
            assert first.strip(), "no streamed text appeared"
            # a second turn: the page sends the history, the server sees a longer prompt
            page.fill("#input", "And roll it back?")
            page.click("#send")
            page.wait_for_selector(".assistant >> nth=1", timeout=10000)
            page.wait_for_function("document.querySelectorAll(\".assistant[data-done='1']\").length === 2", timeout=60000)
            usage = page.inner_text("#status")
            assert "prompt" in usage and int(usage.split()[0]) > 30
            assert page.locator(".user").count() == 2
            # the stop button ends a reply mid-stream
            page.evaluate("""() => { const f = window.fetch; window.fetch = (u, o) => {
                if (o && o.body) { const b = JSON.parse(o.body); b.max_tokens = 1500; o = {...o, body: JSON.stringify(b)}; }
                return f(u, o); }; }""")
            page.fill("#input", "Tell me everything about Kubernetes.")
            page.click("#send")
            page.wait_for_selector("#stop:not([hidden])", timeout=10000)
            page.wait_for_function("document.querySelectorAll('.assistant')[2].textContent.length > 0", timeout=30000)
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=10000)
            assert page.is_hidden("#stop")
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"screenshot: {tmp_path / 'failure.png'}")
            raise


def test_page_renders_markdown_code_with_a_copy_button(tiny_model, page):
    with Served("--model", str(tiny_model)) as s:
        page.goto(s.url + "/")
        html = page.evaluate("markdown('Run:\\n\\n```bash\\nkubectl get pods <a>\\n```\\n\\n- **one**\\n- `two`')")
        assert '<pre><button class="copy"' in html and "kubectl get pods &lt;a&gt;" in html
        assert "<ul><li><strong>one</strong></li><li><code>two</code></li></ul>" in html
