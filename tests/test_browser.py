"""The trace viewer in a real browser: headless Chromium (Debian's) driven by Playwright against a
real uvicorn process.

Uses the shipped model in ``model_artifacts/`` when it is there, otherwise a tiny untrained model
built here. Screenshots go to a temporary directory; with ``SENTIMENT_UPDATE_SCREENSHOT=1`` (and the
shipped model) the README's ``docs/screenshot.png`` is regenerated instead. Skips when Chromium or
Playwright is missing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from app.process import ServiceProcess

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_ARTIFACTS = ROOT / "model_artifacts"
SCREENSHOT = ROOT / "docs" / "screenshot.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READY_TIMEOUT_S = 180  # loading + warm-up of the shipped model on a busy 2-core CI machine

TYPED_REVIEW = ("I expected a dull remake, but the acting is superb and the story kept me hooked. "
                "The ending was a bit weak, yet I loved it.")


@dataclass
class Server:
    url: str
    shipped: bool  # serving model_artifacts/ (the real model) rather than a tiny test model

    def predict(self, text: str) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/predict", json={"texts": [text], "trace": True}, timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium under Playwright; skip (with the reason) where either is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("python package 'playwright' is not importable (pip install playwright)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _tiny_artifacts(out: Path) -> Path:
    """An untrained model over a five-word vocabulary: enough to exercise the page."""
    from sentiment.artifacts import export_artifacts
    from sentiment.model import ModelConfig, SentimentLSTM
    from sentiment.text import TokenizerSettings, Vocabulary

    vocab = Vocabulary.build([["good", "bad", "movie", "great", "awful"]], TokenizerSettings(max_tokens=50), min_freq=1)
    model = SentimentLSTM(ModelConfig(len(vocab), 8, 8))
    return export_artifacts(model, vocab, {"version": "tiny-test", "metrics": {}}, out)


@pytest.fixture(scope="module")
def server(browser: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real service (``python -m app``) on a free port, once ``/health/ready`` answers 200."""
    shipped = (SHIPPED_ARTIFACTS / "model.pt").is_file()
    artifacts = SHIPPED_ARTIFACTS if shipped else _tiny_artifacts(tmp_path_factory.mktemp("tiny-artifacts"))
    try:
        process = ServiceProcess(artifacts, {"SENTIMENT_TORCH_THREADS": "1"}, ready_timeout_s=READY_TIMEOUT_S)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with process:
        yield Server(process.base_url, shipped)


@pytest.fixture
def page(browser, server: Server):
    """A fresh page at ``/``; fails the test on any uncaught JavaScript error."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    page.goto(server.url + "/")
    yield page
    context.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"


def _analyze(page, submit: str = "click") -> None:
    if submit == "click":
        page.click("#analyze")
    else:
        page.press("#review", "Control+Enter")
    page.wait_for_selector("body[data-state=done], body[data-state=error]")


def test_typed_review_shows_one_coloured_token_per_trace_token(page, server: Server) -> None:
    page.locator("#review").press_sequentially(TYPED_REVIEW)
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")

    api = server.predict(TYPED_REVIEW).json()["predictions"][0]
    tokens = page.locator(".token")
    assert tokens.count() == len(api["trace"]["tokens"])
    assert tokens.all_text_contents() == api["trace"]["tokens"]
    shown = [float(p) for p in page.eval_on_selector_all(".token", "els => els.map(e => e.dataset.p)")]
    assert shown == pytest.approx(api["trace"]["probabilities"], abs=1e-4)

    assert page.text_content("#verdict").strip().lower() == api["label"]
    assert page.text_content("#probability") == f"{api['probability']:.3f}"
    assert page.is_hidden("#truncation-note")

    # Colour follows the diverging scale: red dominates below 0.5, blue above.
    colours = page.eval_on_selector_all(".token", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    for p, css in zip(shown, colours):
        r, _, b = (int(v) for v in re.findall(r"\d+", css)[:3])
        if p < 0.45:
            assert r > b, (p, css)
        elif p > 0.55:
            assert b > r, (p, css)

    # The chart: one trace line over the 0.5 threshold; hovering it highlights a token.
    assert page.locator("#chart svg .threshold").count() == 1
    assert page.locator("#chart svg .trace-line").count() == (1 if len(shown) > 1 else 0)
    chart = page.locator("#chart svg")
    box = chart.bounding_box()
    chart.hover(position={"x": box["width"] - 20, "y": box["height"] / 2})  # scrolls it into view first
    assert page.locator(".token.active").count() == 1
    assert page.is_visible("#tooltip")
    assert re.search(r"token \d+ of %d" % len(shown), page.text_content("#tooltip"))


def test_keyboard_submit_long_review_shows_truncation(page, server: Server) -> None:
    max_tokens = httpx.get(f"{server.url}/v1/model", timeout=10).json()["max_tokens"]
    long_review = "The acting is great but the plot is awful . " * (max_tokens // 10 + 5)
    page.fill("#review", long_review)
    _analyze(page, submit="keyboard")  # Ctrl+Enter in the text box
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")

    api = server.predict(long_review).json()["predictions"][0]
    assert api["truncated"] and api["num_tokens"] == max_tokens
    assert page.locator(".token").count() == len(api["trace"]["tokens"]) == max_tokens
    assert page.is_visible("#truncation-note")
    assert "beginning was cut" in page.text_content("#truncation-note")
    assert str(max_tokens) in page.text_content("#truncation-note")
    # The token area scrolls instead of growing with the review.
    assert page.eval_on_selector("#tokens", "e => getComputedStyle(e).overflowY") == "auto"
    if max_tokens >= 200:  # the shipped model's 400 tokens overflow the box; the tiny model's 50 do not
        assert page.eval_on_selector("#tokens", "e => e.scrollHeight > e.clientHeight")

    # Tokens are reachable from the keyboard: focus the list, End jumps to the last token.
    page.focus(".token >> nth=0")
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.dataset.i") == str(max_tokens - 1)
    assert f"token {max_tokens} of {max_tokens}" in page.text_content("#tooltip")


def test_gate_toggle_draws_the_lstm_gates(page, server: Server) -> None:
    page.fill("#review", TYPED_REVIEW)
    _analyze(page)
    assert page.is_hidden("#gates-card")  # off by default: the plain trace is cheaper
    page.focus("#gates-toggle")
    page.keyboard.press("Space")  # the toggle is keyboard operable
    assert page.is_checked("#gates-toggle")
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    assert page.is_visible("#gates-card")
    for key in ("input", "forget", "output", "cell_norm"):
        assert page.locator(f"#gates-chart svg .gate-{key}").count() == 1
    assert page.locator(".gates-legend-item").count() == 4
    n = len(server.predict(TYPED_REVIEW).json()["predictions"][0]["trace"]["tokens"])
    assert f"Over {n} tokens" in page.text_content("#gates-desc")


def test_api_error_is_shown_in_words(page, server: Server) -> None:
    page.fill("#review", "   \n  ")
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "error"
    api = server.predict("   \n  ")
    assert api.status_code == 422
    shown = page.text_content("#error")
    assert page.is_visible("#error")
    assert api.json()["error"]["message"] in shown


def test_network_failure_is_shown_in_words(page, server: Server) -> None:
    page.route("**/v1/predict", lambda route: route.abort("connectionrefused"))
    page.fill("#review", TYPED_REVIEW)
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "error"
    assert "Could not reach the service" in page.text_content("#error")
    assert page.get_attribute("#analyze", "aria-disabled") is None  # ready for another try
    assert page.text_content("#analyze") == "Analyze"


def test_narrow_screen_has_no_horizontal_scroll(page, server: Server) -> None:
    page.set_viewport_size({"width": 360, "height": 740})
    page.click("[data-example=mixed]")
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done"
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def test_example_review_screenshot(page, server: Server, tmp_path: Path) -> None:
    """Analyse the "change of heart" example (or the review in the file named by
    ``SENTIMENT_SCREENSHOT_REVIEW``) and save a screenshot of the whole page.

    With the shipped model and ``SENTIMENT_UPDATE_SCREENSHOT=1`` the screenshot is the README's
    (docs/screenshot.png)."""
    page.wait_for_selector("#model-status[data-status=ready]")
    review = os.environ.get("SENTIMENT_SCREENSHOT_REVIEW")
    if review:
        page.fill("#review", Path(review).read_text(encoding="utf-8"))
    else:
        page.click("[data-example=mixed]")
    text = page.input_value("#review")
    assert text.strip()
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done"
    api = server.predict(text).json()["predictions"][0]
    assert page.locator(".token").count() == len(api["trace"]["tokens"])
    assert page.text_content("#verdict").strip().lower() == api["label"]

    # A viewport as tall as the page (same width, so the chart keeps its layout); then hover the token
    # where the probability fell most, so the picture shows the tooltip and the linked chart cursor.
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": 1100, "height": height})
    probs = api["trace"]["probabilities"]
    drop = min(range(1, len(probs)), key=lambda i: probs[i] - probs[i - 1]) if len(probs) > 1 else 0
    page.hover(f'.token[data-i="{drop}"]')
    assert page.locator(".token.active").count() == 1
    assert page.is_visible("#chart svg .cursor-group[visibility=visible]")

    update = server.shipped and os.environ.get("SENTIMENT_UPDATE_SCREENSHOT") == "1"
    path = SCREENSHOT if update else tmp_path / "screenshot.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    assert path.stat().st_size > 20_000


def test_a_service_with_an_api_key_asks_for_it(browser, tmp_path: Path) -> None:
    artifacts = _tiny_artifacts(tmp_path / "artifacts")
    with ServiceProcess(artifacts, {"SENTIMENT_API_KEY": "viewer-key"}) as keyed:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        try:
            page.goto(keyed.base_url + "/")
            assert not page.is_visible("#api-key")
            page.fill("#review", "a good movie")
            _analyze(page)
            assert page.get_attribute("body", "data-state") == "error"
            assert "requires an API key" in page.text_content("#error")
            assert page.is_visible("#api-key")
            page.fill("#api-key", "wrong")
            _analyze(page)
            assert page.get_attribute("body", "data-state") == "error"
            page.fill("#api-key", "viewer-key")
            _analyze(page)
            assert page.get_attribute("body", "data-state") == "done"
            assert page.locator(".token").count() == 3
        finally:
            context.close()
