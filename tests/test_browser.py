"""The trace viewer in a real browser: headless Chromium (Debian's) driven by Playwright against a
real uvicorn process.

Uses the shipped model in ``model_artifacts/`` when it is there, otherwise a tiny untrained model
built here. Screenshots go to a temporary directory; with ``SENTIMENT_UPDATE_SCREENSHOT=1`` (and the
shipped model) the README's ``docs/screenshot.png`` and ``docs/screenshot-explain.png`` are
regenerated instead. Skips when Chromium or Playwright is missing.
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
EXPLAIN_SCREENSHOT = ROOT / "docs" / "screenshot-explain.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READY_TIMEOUT_S = 180  # loading + warm-up of the shipped model on a busy 2-core CI machine

TYPED_REVIEW = ("I expected a dull remake, but the acting is superb and the story kept me hooked. "
                "The ending was a bit weak, yet I loved it.")
NEGATION_REVIEW = "Not bad at all, I enjoyed it. The plot is thin but the acting is great."

# The page's diverging scale (ColorBrewer RdBu, as in viewer.js), to check colours against the API.
SCALE = ["#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7", "#d1e5f0", "#92c5de", "#4393c3", "#2166ac"]


def scale_rgb(x: float) -> tuple[int, ...]:
    """The colour at x in [0, 1] on the scale, interpolated linearly between its stops."""
    stops = [tuple(int(h[k:k + 2], 16) for k in (1, 3, 5)) for h in SCALE]
    pos = min(1.0, max(0.0, x)) * (len(SCALE) - 1)
    i = min(len(SCALE) - 2, int(pos))
    t = pos - i
    return tuple(round(a + (b - a) * t) for a, b in zip(stops[i], stops[i + 1]))


def css_rgb(css: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", css)[:3])


def attribution_rgb(a: float, max_abs: float) -> tuple[int, ...]:
    """Attributions are coloured symmetrically around 0, scaled to the review's largest |attribution|."""
    return scale_rgb(0.5 + 0.5 * a / max_abs if max_abs > 0 else 0.5)


def decided_by(tokens: list[str], attributions: list[float], label: str) -> tuple[list[int], list[int]]:
    """The token indices the page should list: the 5 strongest attributions towards the verdict and the 3
    strongest against it (|a| >= 0.005, each word once, strongest first)."""
    toward = 1 if label == "positive" else -1

    def top(indices: list[int], k: int) -> list[int]:
        seen: set[str] = set()
        out = []
        for i in indices:
            if tokens[i] not in seen:
                seen.add(tokens[i])
                out.append(i)
        return out[:k]

    towards = sorted(range(len(tokens)), key=lambda i: -attributions[i] * toward)  # stable, like the page's sort
    pro = top([i for i in towards if attributions[i] * toward >= 0.005], 5)
    against = sorted(range(len(tokens)), key=lambda i: attributions[i] * toward)
    con = top([i for i in against if attributions[i] * toward <= -0.005], 3)
    return pro, con


@dataclass
class Server:
    url: str
    shipped: bool  # serving model_artifacts/ (the real model) rather than a tiny test model

    def predict(self, text: str, explain: bool = False) -> httpx.Response:
        body: dict[str, object] = {"texts": [text], "trace": True}
        if explain:
            body["explain"] = "occlusion"
        return httpx.post(f"{self.url}/v1/predict", json=body, timeout=60)


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


# ---- explanations (issue 17): "explain": "occlusion" in the page's request ------------------------------

def _token_colours(page) -> list[tuple[int, ...]]:
    return [css_rgb(c) for c in page.eval_on_selector_all(".token", "els => els.map(e => getComputedStyle(e).backgroundColor)")]


def _assert_colours(shown: list[tuple[int, ...]], expected: list[tuple[int, ...]]) -> None:
    assert len(shown) == len(expected)
    for i, (got, want) in enumerate(zip(shown, expected)):
        assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (i, got, want)


def test_explain_toggle_colours_tokens_by_attribution(page, server: Server) -> None:
    requests: list[dict] = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/v1/predict") else None)
    assert page.is_checked("#explain-toggle")  # on by default
    page.fill("#review", NEGATION_REVIEW)
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    assert requests == [{"texts": [NEGATION_REVIEW], "trace": True, "gates": False, "explain": "occlusion"}]

    api = server.predict(NEGATION_REVIEW, explain=True).json()["predictions"][0]
    probs, attrs = api["trace"]["probabilities"], api["explanation"]["attributions"]
    assert api["explanation"]["tokens"] == api["trace"]["tokens"] == page.locator(".token").all_text_contents()
    shown_a = [float(a) for a in page.eval_on_selector_all(".token", "els => els.map(e => e.dataset.a)")]
    assert shown_a == pytest.approx(attrs, abs=1e-4)
    max_abs = max(abs(a) for a in attrs)

    # The running-probability view stays the default; the attribution view is one arrow key away.
    assert page.get_attribute("#tokens", "data-view") == "probability"
    _assert_colours(_token_colours(page), [scale_rgb(p) for p in probs])
    page.focus("input[name=token-view][value=probability]")
    page.keyboard.press("ArrowRight")  # a native radio group: arrows move the choice
    assert page.is_checked("#view-attribution")
    assert page.get_attribute("#tokens", "data-view") == "attribution"
    _assert_colours(_token_colours(page), [attribution_rgb(a, max_abs) for a in attrs])
    # Specific tokens: the strongest attribution takes the scale's saturated end, in its own direction.
    strongest = max(range(len(attrs)), key=lambda i: abs(attrs[i]))
    end = SCALE[-1] if attrs[strongest] > 0 else SCALE[0]
    assert _token_colours(page)[strongest] == tuple(int(end[k:k + 2], 16) for k in (1, 3, 5))
    assert "attribution" in page.text_content("#tokens-heading")
    sign = lambda v: ("+" if v > 0 else "−") + f"{abs(v):.3f}"  # noqa: E731 (the page's minus sign)
    assert page.locator("#legend-ticks span").all_text_contents() == [sign(-max_abs), "0", sign(max_abs)]

    # The tooltip shows both views' values for a token.
    page.hover(f'.token[data-i="{strongest}"]')
    tip = page.text_content("#tooltip")
    assert f"P(positive) {probs[strongest]:.3f}" in tip
    assert f"attribution {sign(attrs[strongest])}" in tip
    assert f"review without it: P(positive) {api['probability'] - attrs[strongest]:.3f}" in tip

    # And back: the view is the user's choice, kept for the next analysis.
    page.click("text=Running P(positive)")
    _assert_colours(_token_colours(page), [scale_rgb(p) for p in probs])
    page.click("#view-attribution")
    _analyze(page)
    assert page.get_attribute("#tokens", "data-view") == "attribution"


def test_decided_by_list_matches_the_top_attributions(page, server: Server) -> None:
    page.fill("#review", TYPED_REVIEW)
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    api = server.predict(TYPED_REVIEW, explain=True).json()["predictions"][0]
    tokens, attrs = api["explanation"]["tokens"], api["explanation"]["attributions"]
    pro, con = decided_by(tokens, attrs, api["label"])
    assert page.is_visible("#decided-card")
    assert api["label"] in page.text_content("#decided-for-heading")

    def listed(list_id: str) -> list[int]:
        return [int(i) for i in page.eval_on_selector_all(f"#{list_id} .decided", "els => els.map(e => e.dataset.i)")]

    assert listed("decided-for") == pro and listed("decided-against") == con
    assert pro or con  # a real review has words that mattered
    for list_id, expected in (("decided-for", pro), ("decided-against", con)):
        texts = page.locator(f"#{list_id} .decided").all_text_contents()
        sign = lambda v: ("+" if v > 0 else "−") + f"{abs(v):.2f}"  # noqa: E731
        assert texts == [f"{sign(attrs[i])}{tokens[i]}" for i in expected]  # e.g. "+0.21" "enjoyed"
    if pro:  # clicking an entry focuses its token, whose tooltip then shows the attribution
        page.click("#decided-for .decided >> nth=0")
        assert page.evaluate("document.activeElement.dataset.i") == str(pro[0])
        assert "attribution" in page.text_content("#tooltip")


def test_explain_off_asks_without_it(page, server: Server) -> None:
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/predict") else None)
    page.focus("#explain-toggle")
    page.keyboard.press("Space")
    assert not page.is_checked("#explain-toggle")
    page.fill("#review", NEGATION_REVIEW)
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done"
    assert bodies == [{"texts": [NEGATION_REVIEW], "trace": True, "gates": False}]
    assert page.is_hidden("#decided-card") and page.is_hidden("#explain-note")
    assert page.is_disabled("#view-attribution")
    assert "Explain (why)" in page.text_content("#view-attribution-hint")


def test_a_service_that_refuses_explain_still_gets_the_trace(page, server: Server) -> None:
    """An older service rejects the unknown field with 422: the page asks again without it."""
    refusal = {"error": {"code": "invalid_request", "message": "invalid request: body.explain: Extra inputs are not permitted",
                         "details": [{"loc": ["body", "explain"], "msg": "Extra inputs are not permitted"}]}}

    def handle(route) -> None:
        if "explain" in (route.request.post_data_json or {}):
            route.fulfill(status=422, json=refusal)
        else:
            route.continue_()

    page.route("**/v1/predict", handle)
    page.fill("#review", NEGATION_REVIEW)
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    assert page.is_hidden("#error")
    assert page.locator(".token").count() == len(server.predict(NEGATION_REVIEW).json()["predictions"][0]["trace"]["tokens"])
    assert "invalid_request" in page.text_content("#explain-note")
    assert page.is_disabled("#view-attribution") and page.is_hidden("#decided-card")


def test_a_review_over_the_explain_limit_is_analyzed_without_explain(browser, tmp_path: Path) -> None:
    artifacts = _tiny_artifacts(tmp_path / "artifacts")
    with ServiceProcess(artifacts, {"SENTIMENT_MAX_EXPLAIN_TOKENS": "5"}) as limited:
        long_text, short_text = "a good movie , great and not bad at all", "a good movie"
        refused = httpx.post(f"{limited.base_url}/v1/predict", timeout=30,
                             json={"texts": [long_text], "trace": True, "explain": "occlusion"})
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "explain_too_long"
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        js_errors: list[str] = []
        page.on("pageerror", lambda exc: js_errors.append(str(exc)))
        bodies: list[dict] = []
        page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/predict") else None)
        try:
            page.goto(limited.base_url + "/")
            page.wait_for_selector("#model-status[data-status=ready]")
            page.fill("#review", long_text)
            _analyze(page)
            assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
            assert [b.get("explain") for b in bodies] == ["occlusion", None]  # asked, refused, asked without
            assert page.is_hidden("#error")
            assert page.locator(".token").count() == 10
            note = page.text_content("#explain-note")
            assert page.is_visible("#explain-note")
            assert "Not explained" in note and "10 tokens" in note and "at most 5 tokens" in note
            assert page.is_disabled("#view-attribution") and page.is_hidden("#decided-card")

            # A short review on the same service is explained again.
            page.fill("#review", short_text)
            _analyze(page)
            assert page.get_attribute("body", "data-state") == "done"
            assert page.is_hidden("#explain-note")
            assert page.is_enabled("#view-attribution") and page.is_visible("#decided-card")
            assert len(page.eval_on_selector_all(".token[data-a]", "els => els")) == 3
        finally:
            context.close()
        assert not js_errors, js_errors


def test_explained_review_screenshot(page, server: Server, tmp_path: Path) -> None:
    """The attribution view of a review where it disagrees with the running probability: the built-in
    negation example, or the review in the file named by ``SENTIMENT_EXPLAIN_SCREENSHOT_REVIEW``. With the
    shipped model and ``SENTIMENT_UPDATE_SCREENSHOT=1`` the picture is docs/screenshot-explain.png."""
    page.wait_for_selector("#model-status[data-status=ready]")
    review = os.environ.get("SENTIMENT_EXPLAIN_SCREENSHOT_REVIEW")
    text = Path(review).read_text(encoding="utf-8") if review else NEGATION_REVIEW
    page.fill("#review", text)
    _analyze(page)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    page.click("#view-attribution")
    assert page.get_attribute("#tokens", "data-view") == "attribution"
    api = server.predict(text, explain=True).json()["predictions"][0]
    probs, attrs = api["trace"]["probabilities"], api["explanation"]["attributions"]

    # Hover the token where the two views disagree most: its attribution has the opposite sign to the step
    # the running probability took there (a negation: "not" lowers the trace but pushes the verdict up).
    steps = [p - (probs[i - 1] if i else 0.5) for i, p in enumerate(probs)]
    disagree = max(range(len(attrs)), key=lambda i: abs(attrs[i]) if attrs[i] * steps[i] < 0 else -1)
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": 1100, "height": height})
    # Point at it on the chart (the tooltip then sits over the chart, leaving the token list in view).
    # The plot spans the SVG's width less its margins (left 44, right 14 SVG units, as in viewer.js).
    x, y = page.evaluate("""i => {
        const svg = document.querySelector('#chart svg'), box = svg.getBoundingClientRect();
        const w = svg.viewBox.baseVal.width, n = document.querySelectorAll('.token').length;
        const sx = 44 + (n > 1 ? i / (n - 1) : 0.5) * (w - 44 - 14);
        return [box.left + sx * box.width / w, box.top + box.height / 2]; }""", disagree)
    page.mouse.move(x, y)
    assert page.get_attribute(".token.active", "data-i") == str(disagree)
    assert "attribution" in page.text_content("#tooltip")

    update = server.shipped and os.environ.get("SENTIMENT_UPDATE_SCREENSHOT") == "1"
    path = EXPLAIN_SCREENSHOT if update else tmp_path / "screenshot-explain.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    assert path.stat().st_size > 20_000
