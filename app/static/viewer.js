// Trace viewer: sends the review to the public API (POST v1/predict with "trace": true, and
// "explain": "occlusion" when Explain is ticked) and draws the model's running P(positive) as coloured
// tokens and an SVG line chart, and each token's attribution (how much the verdict's probability
// depends on it) as a second colouring of the same tokens. No libraries, no build.
// URLs are relative so the page also works when the service sits behind a path prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";

  const EXAMPLES = {
    positive:
      "What a wonderful surprise. The script is sharp and funny, the two leads have real chemistry, and the " +
      "photography is gorgeous from the first frame to the last. I laughed, I cried, and I walked out of the " +
      "cinema smiling. One of the best films I have seen this year; highly recommended.",
    negative:
      "I really wanted to like this, but it is a mess. The plot makes no sense, the dialogue is painfully " +
      "wooden and the jokes fall flat. Even the usually reliable lead looks bored. By the end I was checking " +
      "my watch every five minutes. A dull, lazy waste of a talented cast. Avoid.",
    mixed:
      "The first hour is genuinely great: a clever premise, lovely music and a brilliant performance from the " +
      "lead. Then it all falls apart. The second half is slow, predictable and far too long, the villain is a " +
      "cartoon, and the ending is so stupid that it ruined the whole thing for me. What a disappointment.",
  };

  // ColorBrewer RdBu (9 classes), red = negative, near-white = 0.5, blue = positive.
  // viewer.css repeats these stops in --scale for the legend and the verdict meter.
  const SCALE = ["#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7", "#d1e5f0", "#92c5de", "#4393c3", "#2166ac"];
  const SCALE_RGB = SCALE.map((hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));

  /** Colour for probability p in [0, 1] on the diverging scale (linear between the stops). */
  function colour(p) {
    const x = Math.min(1, Math.max(0, p)) * (SCALE.length - 1);
    const i = Math.min(SCALE.length - 2, Math.floor(x));
    const t = x - i;
    const [a, b] = [SCALE_RGB[i], SCALE_RGB[i + 1]];
    const rgb = a.map((v, k) => Math.round(v + (b[k] - v) * t));
    return `rgb(${rgb.join(",")})`;
  }

  /** Dark text on light backgrounds, white on the saturated ends. */
  const textColour = (p) => (Math.abs(p - 0.5) > 0.33 ? "#ffffff" : "#1c2430");
  const fmt = (p) => p.toFixed(3);
  const signed = (d, digits = 3) =>
    (Math.abs(d) < 0.5 * 10 ** -digits ? "±" : d > 0 ? "+" : "−") + Math.abs(d).toFixed(digits);

  /** Attribution a on the same diverging scale, symmetric around 0 and scaled to ±maxAbs (the
   *  largest |attribution| in the review): −maxAbs is the red end, 0 white, +maxAbs the blue end. */
  const attributionPosition = (a, maxAbs) => (maxAbs > 0 ? 0.5 + 0.5 * (a / maxAbs) : 0.5);
  const quote = (t) => `“${t}”`;

  // Punctuation and English clitics are drawn against the previous token, as they were written.
  const TIGHT = /^([.,!?;:%)\]}…]|'s$|'re$|'ve$|'ll$|'d$|'m$|n't$)/i;

  // view: which colouring the token list shows ("probability" or "attribution"); it is the user's
  // choice and persists across analyses. limits: /v1/model's request limits, once known.
  const state = { result: null, active: -1, tipFrom: null, controller: null, modelRetry: null,
    view: "probability", limits: null };

  // Adds "Authorization: Bearer <key>" when the user has entered an API key.
  function authorized(headers) {
    const key = $("api-key").value.trim();
    return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
  }

  // ---- model info (header badge and footer) ---------------------------------------------------

  async function loadModelInfo() {
    clearTimeout(state.modelRetry);
    let res;
    try {
      res = await fetch("v1/model", { headers: { Accept: "application/json" } });
    } catch (err) {
      setModelStatus("error", "Service unreachable");
      state.modelRetry = setTimeout(loadModelInfo, 5000);
      return;
    }
    if (res.ok) {
      const info = await res.json();
      setModelStatus("ready", `Ready · ${info.device}`);
      state.limits = info.limits || null;
      renderModelInfo(info);
      return;
    }
    const err = await readError(res);
    const retry = Number(res.headers.get("Retry-After")) || 0;
    const loading = res.status === 503 && retry > 0;
    setModelStatus(loading ? "loading" : "error", loading ? "Model loading…" : "Model unavailable");
    $("model-info").replaceChildren(infoItem("Model", err.message));
    state.modelRetry = setTimeout(loadModelInfo, Math.max(1, retry || 5) * 1000);
  }

  function setModelStatus(status, text) {
    $("model-status").dataset.status = status;
    $("model-status-text").textContent = text;
  }

  function infoItem(term, value) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    div.append(dt, dd);
    return div;
  }

  function renderModelInfo(info) {
    const metrics = info.metrics || {};
    const items = [infoItem("Model", info.version), infoItem("Device", info.device)];
    if (metrics.test && typeof metrics.test.accuracy === "number") {
      items.push(infoItem("Test accuracy", `${(metrics.test.accuracy * 100).toFixed(1)}%`));
    } else if (metrics.validation && typeof metrics.validation.accuracy === "number") {
      items.push(infoItem("Validation accuracy", `${(metrics.validation.accuracy * 100).toFixed(1)}%`));
    }
    items.push(infoItem("Truncation", `last ${info.max_tokens} tokens of a review kept`));
    if (typeof info.vocab_size === "number") items.push(infoItem("Vocabulary", info.vocab_size.toLocaleString("en")));
    $("model-info").replaceChildren(...items);
  }

  // ---- errors -----------------------------------------------------------------------------------
  /** The API's error body ({"error": {"code", "message"}}) or a description of what came back. */
  async function readError(res) {
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      /* not JSON: a proxy page or an empty body */
    }
    if (body && body.error && body.error.message) {
      return { code: body.error.code, message: body.error.message, details: body.error.details || [] };
    }
    return { code: `http_${res.status}`, message: `The service answered HTTP ${res.status} ${res.statusText || ""}`.trim() + ".",
      details: [] };
  }

  function showError(title, message) {
    const box = $("error");
    const strong = document.createElement("strong");
    strong.textContent = title;
    const text = document.createElement("span");
    text.id = "error-message";
    text.textContent = message;
    box.replaceChildren(strong, text);
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  // ---- analyze ---------------------------------------------------------------------------------
  async function analyze() {
    const text = $("review").value;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const button = $("analyze");
    document.body.dataset.state = "loading";
    // aria-disabled, not disabled: a disabled button drops keyboard focus. A second submit while
    // busy simply replaces the first request (it is aborted above).
    button.setAttribute("aria-disabled", "true");
    button.textContent = "Analyzing…";
    $("result").setAttribute("aria-busy", "true");
    clearError();
    const gates = $("gates-toggle").checked;
    const wantExplain = $("explain-toggle").checked;
    const send = async (explain) => {
      const body = { texts: [text], trace: true, gates };
      if (explain) body.explain = "occlusion";
      try {
        return await fetch("v1/predict", {
          method: "POST",
          headers: authorized({ "Content-Type": "application/json", Accept: "application/json" }),
          body: JSON.stringify(body),
          signal: controller.signal,
        });
      } catch (err) {
        if (err.name === "AbortError") return null;
        throw new NetworkError();
      }
    };
    try {
      let res = await send(wantExplain);
      if (!res) return; // replaced by a newer request
      // The explanation is an extra: when the service refuses it (the review is over the explanation
      // limit, or an older service does not know "explain"), analyze without it and say why.
      let explainRefused = null;
      if (wantExplain && !res.ok) {
        const err = await readError(res.clone());
        if (isExplainError(res.status, err)) {
          explainRefused = err;
          res = await send(false);
          if (!res) return;
        }
      }
      if (res.status === 401) {
        // SENTIMENT_API_KEY is set: ask for the key (never stored beyond this page).
        $("key-row").hidden = false;
        $("api-key").focus();
        fail("This service requires an API key.", "Enter the key in the API key field and analyze again.");
        return;
      }
      if (!res.ok) {
        const err = await readError(res);
        const retry = res.headers.get("Retry-After");
        let hint = retry ? ` Try again in ${retry} s.` : "";
        // An explanation costs about one prediction per token, and admission counts it: without it
        // the same review is much cheaper to let in.
        if (wantExplain && res.status === 503 && err.code === "overloaded") {
          hint += " Unticking \u201cExplain (why)\u201d makes the request much cheaper.";
        }
        fail(`The service could not analyze this text (${err.code}).`, err.message + hint);
        return;
      }
      const body = await res.json();
      const prediction = body.predictions && body.predictions[0];
      if (!prediction || !prediction.trace) {
        fail("Unexpected answer.", "The service answered without a per-token trace.");
        return;
      }
      const ms = Number(res.headers.get("x-process-time-ms"));
      render(prediction, body.model, Number.isFinite(ms) ? ms : null, { asked: wantExplain, refused: explainRefused });
      document.body.dataset.state = "done";
    } catch (err) {
      if (err instanceof NetworkError) {
        fail("Could not reach the service.", "The request failed before an answer came back (network error or the service is down). Check the connection and try again.");
      } else {
        fail("Something went wrong in the page.", String(err && err.message ? err.message : err));
      }
    } finally {
      if (state.controller === controller) {
        state.controller = null;
        button.removeAttribute("aria-disabled");
        button.textContent = "Analyze";
        $("result").removeAttribute("aria-busy");
      }
    }
  }

  class NetworkError extends Error {}

  /** Did the service refuse only the explanation (so the same request without it can succeed)? */
  function isExplainError(status, err) {
    if (err.code === "explain_too_long" || err.code === "too_many_explained_texts") return true;
    // A service that predates explanations rejects the unknown field: 422 with "explain" in a detail's loc.
    return status === 422 && err.details.some((d) => Array.isArray(d.loc) && d.loc.includes("explain"));
  }

  function fail(title, message) {
    showError(title, message);
    document.body.dataset.state = "error";
  }

  // ---- render ------------------------------------------------------------------------------------
  function render(prediction, model, ms, explain) {
    const { tokens, probabilities: probs } = prediction.trace;
    // The explanation's tokens are the trace's (the API guarantees it); anything else is not shown.
    const ex = prediction.explanation;
    const attrs = ex && Array.isArray(ex.attributions) && ex.tokens.length === tokens.length &&
      ex.tokens.every((t, i) => t === tokens[i]) ? ex.attributions : null;
    const maxAbs = attrs ? Math.max(0, ...attrs.map(Math.abs)) : 0;
    state.result = { tokens, probs, prediction, attrs, maxAbs };
    state.active = -1;
    $("result").hidden = false;

    const verdict = $("verdict");
    verdict.textContent = prediction.label;
    verdict.dataset.label = prediction.label;
    $("probability").textContent = fmt(prediction.probability);
    $("close-call").hidden = Math.abs(prediction.probability - 0.5) >= 0.1;
    $("meter-marker").style.left = `${(prediction.probability * 100).toFixed(2)}%`;
    $("summary").textContent = summarise(tokens, probs, prediction, model, ms);

    const note = $("truncation-note");
    if (prediction.truncated) {
      note.textContent = `This review is longer than the model reads: the beginning was cut, and only its last ` +
        `${prediction.num_tokens} tokens were analyzed (shown below).`;
      note.hidden = false;
    } else {
      note.hidden = true;
    }

    renderExplainNote(prediction, explain, attrs);
    renderTokens(tokens, probs, prediction.truncated);
    applyView();
    renderDecided(tokens, attrs, prediction.label, prediction.probability);
    renderChart();
    renderGates(prediction.trace.gates);
    renderMoves(tokens, probs);
  }

  // ---- explanation (occlusion attributions) --------------------------------------------------------
  function renderExplainNote(prediction, explain, attrs) {
    const note = $("explain-note");
    const hint = $("view-attribution-hint");
    let why = null;
    if (explain.refused) {
      const err = explain.refused;
      if (err.code === "explain_too_long") {
        const limit = (state.limits && state.limits.max_explain_tokens) ||
          Number((err.message.match(/limit is (\d+)/) || [])[1]) || null;
        note.textContent = `Not explained: this review has ${prediction.num_tokens} tokens` +
          (prediction.truncated ? " (after truncation)" : "") +
          `, and the service explains at most ${limit !== null ? limit : "fewer"} tokens per text. ` +
          "Showing the running probability only; shorten the review to see which words decided the verdict.";
      } else {
        note.textContent = `Not explained: the service refused the explanation (${err.code}: ${err.message}). ` +
          "Showing the running probability only.";
      }
      why = "Not available for this review (see the note above).";
    } else if (!explain.asked) {
      why = "Tick \u201cExplain (why)\u201d and analyze again to see attributions.";
    } else if (!attrs) {
      note.textContent = "Not explained: the service answered without an explanation. Showing the running probability only.";
      why = "Not available for this review.";
    }
    note.hidden = !explain.refused && !(explain.asked && !attrs);
    hint.textContent = why || "";
    hint.hidden = !why;
    $("view-attribution").disabled = !attrs;
  }

  /** Colour the tokens, the legend and the help text by the chosen view (probability when there is
   *  no explanation). */
  function applyView() {
    const r = state.result;
    if (!r) return;
    const view = state.view === "attribution" && r.attrs ? "attribution" : "probability";
    $("tokens").dataset.view = view;
    $("legend").dataset.view = view;
    const ticks = $("legend-ticks").children;
    if (view === "attribution") {
      $("tokens-heading").textContent = "Tokens, coloured by attribution (why)";
      $("tokens-help").textContent = "Each token shows how much it moved the verdict: P(positive) of the review minus " +
        "P(positive) with that token dropped. Blue pushed towards positive, red towards negative, white did not " +
        `matter; the scale runs to ±${fmt(r.maxAbs)}, the largest in this review. Hover a token, or focus the ` +
        "list and use the arrow keys.";
      [ticks[0].textContent, ticks[1].textContent, ticks[2].textContent] = [signed(-r.maxAbs), "0", signed(r.maxAbs)];
    } else {
      $("tokens-heading").textContent = "Tokens, coloured by the running probability";
      $("tokens-help").textContent = "Each token shows P(positive) after the model has read it. " +
        "Hover a token, or focus the list and use the arrow keys.";
      [ticks[0].textContent, ticks[1].textContent, ticks[2].textContent] = ["0", "0.5", "1"];
    }
    $("tokens").querySelectorAll(".token").forEach((el) => {
      const i = Number(el.dataset.i);
      const pos = view === "attribution" ? attributionPosition(r.attrs[i], r.maxAbs) : r.probs[i];
      el.style.background = colour(pos);
      el.style.color = textColour(pos);
    });
    const radio = document.querySelector(`input[name=token-view][value=${view}]`);
    if (!radio.checked) radio.checked = true;
  }

  /** The words that decided the verdict: the strongest attributions towards it (5) and against it (3). */
  function renderDecided(tokens, attrs, label, probability) {
    const card = $("decided-card");
    card.hidden = !attrs;
    if (!attrs) return;
    // A very confident verdict saturates: P(positive) hardly moves when any one word is dropped, so
    // every attribution is tiny. Say so, and still list the largest (with more digits).
    const maxAbs = Math.max(...attrs.map(Math.abs));
    const digits = maxAbs < 0.01 ? 4 : 2;
    const note = $("decided-note");
    note.hidden = maxAbs >= 0.01;
    note.textContent = maxAbs >= 0.01 ? "" : `The model is so sure (P(positive) = ${fmt(probability)}) that ` +
      `dropping any single word moves it by less than 0.01: no one word decides, the review as a whole does.`;
    const toward = label === "positive" ? 1 : -1;
    const other = label === "positive" ? "negative" : "positive";
    const forHead = $("decided-for-heading");
    forHead.textContent = `Towards ${label}, for the verdict`;
    forHead.className = label === "positive" ? "pos-text" : "neg-text";
    const againstHead = $("decided-against-heading");
    againstHead.textContent = `Towards ${other}, against it`;
    againstHead.className = other === "positive" ? "pos-text" : "neg-text";
    const items = attrs.map((a, i) => ({ i, a }));
    // Strongest first, each word once (a repeated word is listed where it mattered most).
    const top = (list, k) => {
      const seen = new Set();
      return list.filter(({ i }) => !seen.has(tokens[i]) && seen.add(tokens[i])).slice(0, k);
    };
    const floor = 0.5 * 10 ** -digits;  // what would print as ±0
    const pro = top(items.filter((x) => x.a * toward >= floor).sort((x, y) => (y.a - x.a) * toward), 5);
    const con = top(items.filter((x) => x.a * toward <= -floor).sort((x, y) => (x.a - y.a) * toward), 3);
    const fill = (id, list, emptyText) => {
      const el = $(id);
      if (!list.length) {
        const li = document.createElement("li");
        li.className = "empty";
        li.textContent = emptyText;
        el.replaceChildren(li);
        return;
      }
      el.replaceChildren(...list.map(({ i, a }) => {
        const li = document.createElement("li");
        const b = document.createElement("button");
        b.type = "button";
        b.className = "move decided";
        b.dataset.i = String(i);
        b.dataset.a = String(a);
        b.title = `Show token ${i + 1}`;
        const value = document.createElement("span");
        value.className = `delta ${a >= 0 ? "pos-text" : "neg-text"}`;
        value.textContent = signed(a, digits);
        const word = document.createElement("span");
        word.className = "word";
        word.textContent = tokens[i];
        b.append(value, word);
        b.setAttribute("aria-label", `${tokens[i]}, token ${i + 1}: attribution ${signed(a)}; show it`);
        b.addEventListener("click", () => focusToken(i));
        li.append(b);
        return li;
      }));
    };
    fill("decided-for", pro, "No word pushed it noticeably towards the verdict.");
    fill("decided-against", con, `No word pushed it noticeably towards ${other}.`);
  }

  // ---- gate chart (only when the request asked for "gates": true) ------------------------------
  const GATE_SERIES = [
    { key: "input", label: "input gate", colour: "#2f7d32" },
    { key: "forget", label: "forget gate", colour: "#6a3fb5" },
    { key: "output", label: "output gate", colour: "#c46a00" },
    { key: "cell_norm", label: "cell-state norm (scaled)", colour: "#1c2430", dash: "5 3" },
  ];

  function renderGates(gates) {
    const card = $("gates-card");
    card.hidden = !gates;
    if (!gates) return;
    const host = $("gates-chart");
    const n = gates.input.length;
    const w = Math.max(280, host.clientWidth || $("chart").clientWidth);
    const h = w < 520 ? 170 : 210;
    const m = { top: 12, right: 14, bottom: 30, left: 44 };
    const pw = w - m.left - m.right;
    const ph = h - m.top - m.bottom;
    const x = (i) => m.left + (n === 1 ? pw / 2 : (i / (n - 1)) * pw);
    const y = (v) => m.top + (1 - v) * ph;
    const maxNorm = Math.max(...gates.cell_norm, 1e-9);
    const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, width: w, height: h, role: "img",
      "aria-labelledby": "gates-heading gates-desc" });
    const mean = (a) => a.reduce((s, v) => s + v, 0) / a.length;
    svgEl("desc", { id: "gates-desc" }, svg).textContent =
      `Over ${n} tokens: mean input gate ${fmt(mean(gates.input))}, forget gate ${fmt(mean(gates.forget))}, ` +
      `output gate ${fmt(mean(gates.output))}; cell-state norm from ${gates.cell_norm[0].toFixed(2)} to ` +
      `${gates.cell_norm[n - 1].toFixed(2)} (largest ${maxNorm.toFixed(2)}).`;
    const grid = svgEl("g", { class: "grid" }, svg);
    const axis = svgEl("g", { class: "axis" }, svg);
    for (const v of [0, 0.5, 1]) {
      svgEl("line", { x1: m.left, x2: m.left + pw, y1: y(v), y2: y(v) }, grid);
      svgEl("text", { x: m.left - 8, y: y(v) + 4, "text-anchor": "end" }, axis).textContent = String(v);
    }
    for (const t of xTicks(n, w < 520 ? 4 : 8)) {
      svgEl("text", { x: x(t - 1), y: m.top + ph + 16, "text-anchor": "middle" }, axis).textContent = String(t);
    }
    const legend = $("gates-legend");
    legend.replaceChildren();
    for (const s of GATE_SERIES) {
      const values = s.key === "cell_norm" ? gates.cell_norm.map((v) => v / maxNorm) : gates[s.key];
      const d = values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(2)},${y(v).toFixed(2)}`).join(" ");
      svgEl("path", { d, fill: "none", stroke: s.colour, "stroke-width": 1.6,
        "stroke-dasharray": s.dash || "none", class: `gate-line gate-${s.key}` }, svg);
      const item = document.createElement("span");
      item.className = "gates-legend-item";
      const swatch = document.createElement("span");
      swatch.className = "gates-swatch";
      swatch.style.borderTop = `3px ${s.dash ? "dashed" : "solid"} ${s.colour}`;
      item.append(swatch, document.createTextNode(s.key === "cell_norm" ? `${s.label}, max ${maxNorm.toFixed(2)}` : s.label));
      legend.append(item);
    }
    host.replaceChildren(svg);
  }

  function summarise(tokens, probs, prediction, model, ms) {
    const n = tokens.length;
    let lo = 0;
    let hi = 0;
    let crossings = 0;
    for (let i = 1; i < n; i++) {
      if (probs[i] < probs[lo]) lo = i;
      if (probs[i] > probs[hi]) hi = i;
      if ((probs[i] >= 0.5) !== (probs[i - 1] >= 0.5)) crossings++;
    }
    const parts = [`Read ${n} token${n === 1 ? "" : "s"}.`];
    if (n > 1) {
      parts.push(`Lowest ${fmt(probs[lo])} after ${quote(tokens[lo])} (#${lo + 1}); highest ${fmt(probs[hi])} after ${quote(tokens[hi])} (#${hi + 1}).`);
      parts.push(crossings === 0 ? "It never crossed 0.5." : `It crossed 0.5 ${crossings === 1 ? "once" : `${crossings} times`}.`);
    }
    if (model) parts.push(`Model ${model.version} on ${model.device}${ms !== null ? `, ${Math.round(ms)} ms` : ""}.`);
    return parts.join(" ");
  }

  function renderTokens(tokens, probs, truncated) {
    const box = $("tokens");
    const frag = document.createDocumentFragment();
    if (truncated) {
      const cut = document.createElement("span");
      cut.className = "cut-marker";
      cut.textContent = "… beginning cut";
      frag.append(cut);
    }
    tokens.forEach((tok, i) => {
      const p = probs[i];
      const span = document.createElement("span");
      span.className = TIGHT.test(tok) && i > 0 ? "token tight" : "token";
      span.textContent = tok;
      const a = state.result.attrs ? state.result.attrs[i] : null;
      span.dataset.p = String(p);
      span.dataset.i = String(i);
      if (a !== null) span.dataset.a = String(a);
      span.tabIndex = i === 0 ? 0 : -1; // roving tabindex: one tab stop, arrows move inside
      span.setAttribute("aria-label", `${tok}: token ${i + 1} of ${tokens.length}, P(positive) ${fmt(p)}` +
        (a !== null ? `, attribution ${signed(a)}` : ""));
      frag.append(span);
    });
    box.replaceChildren(frag);
    box.scrollTop = 0;
  }

  function tokenEl(i) {
    return $("tokens").querySelector(`.token[data-i="${i}"]`);
  }

  /** Highlight token i in both views; ``from`` says which view asked (it handles its own focus). */
  function setActive(i, from, opts = {}) {
    const r = state.result;
    if (!r) return;
    const prev = tokenEl(state.active);
    if (prev) prev.classList.remove("active");
    state.active = i;
    if (i < 0) {
      hideTooltip();
      drawCursor(-1);
      return;
    }
    const el = tokenEl(i);
    if (el) {
      el.classList.add("active");
      if (from !== "tokens") scrollTokenIntoView(el);
    }
    drawCursor(i);
    state.tipFrom = from;
    if (opts.tooltipAt) showTooltip(i, opts.tooltipAt);
  }

  /** Scroll inside the token box only (scrollIntoView would also move the page). */
  function scrollTokenIntoView(el) {
    const box = $("tokens");
    const top = el.offsetTop;
    const bottom = top + el.offsetHeight;
    if (top < box.scrollTop + 4) box.scrollTop = top - 8;
    else if (bottom > box.scrollTop + box.clientHeight - 4) box.scrollTop = bottom - box.clientHeight + 8;
  }

  // ---- tooltip ------------------------------------------------------------------------------------
  function showTooltip(i, anchor) {
    const { tokens, probs } = state.result;
    const tip = $("tooltip");
    const head = document.createElement("div");
    head.className = "tt-token";
    head.textContent = quote(tokens[i]);
    const line1 = document.createElement("div");
    line1.className = "tt-value";
    line1.textContent = `token ${i + 1} of ${tokens.length} · P(positive) ${fmt(probs[i])}`;
    tip.replaceChildren(head, line1);
    if (i > 0) {
      const line2 = document.createElement("div");
      line2.className = "tt-value";
      line2.textContent = `change from previous token ${signed(probs[i] - probs[i - 1])}`;
      tip.append(line2);
    }
    const { attrs, prediction } = state.result;
    if (attrs) {
      const line3 = document.createElement("div");
      line3.className = "tt-value tt-attribution";
      line3.textContent = `attribution ${signed(attrs[i])}`;
      const line4 = document.createElement("div");
      line4.className = "tt-value";
      line4.textContent = `review without it: P(positive) ${fmt(prediction.probability - attrs[i])}`;
      tip.append(line3, line4);
    }
    tip.hidden = false;
    // Place above the anchor (a DOMRect-like {left, top, width, height}); below when there is no room.
    const tw = tip.offsetWidth;
    const th = tip.offsetHeight;
    let x = anchor.left + anchor.width / 2 - tw / 2;
    x = Math.max(6, Math.min(window.innerWidth - tw - 6, x));
    let y = anchor.top - th - 8;
    if (y < 6) y = anchor.top + anchor.height + 8;
    tip.style.left = `${Math.round(x)}px`;
    tip.style.top = `${Math.round(y)}px`;
  }

  /** Keep the tooltip on its token or chart point when the page or the token box scrolls. */
  function followAnchor() {
    if ($("tooltip").hidden || state.active < 0 || !state.result) return;
    const i = state.active;
    if (state.tipFrom === "chart") {
      showTooltip(i, cursorRect(i));
      return;
    }
    const rect = tokenEl(i).getBoundingClientRect();
    const box = $("tokens").getBoundingClientRect();
    if (rect.bottom < box.top || rect.top > box.bottom) hideTooltip(); // scrolled out of its box
    else showTooltip(i, rect);
  }

  function hideTooltip() {
    $("tooltip").hidden = true;
  }

  // ---- token interactions -------------------------------------------------------------------------
  function wireTokens() {
    const box = $("tokens");
    box.addEventListener("pointerover", (e) => {
      const el = e.target.closest(".token");
      if (el) setActive(Number(el.dataset.i), "tokens", { tooltipAt: el.getBoundingClientRect() });
    });
    box.addEventListener("pointerleave", () => {
      if (!box.contains(document.activeElement)) setActive(-1, "tokens");
    });
    box.addEventListener("focusin", (e) => {
      const el = e.target.closest(".token");
      if (!el) return;
      scrollTokenIntoView(el);
      setActive(Number(el.dataset.i), "tokens", { tooltipAt: el.getBoundingClientRect() });
    });
    box.addEventListener("focusout", (e) => {
      if (!box.contains(e.relatedTarget)) setActive(-1, "tokens");
    });
    box.addEventListener("keydown", (e) => {
      const el = e.target.closest(".token");
      if (!el || !state.result) return;
      const n = state.result.tokens.length;
      const i = Number(el.dataset.i);
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, PageDown: 10, PageUp: -10 }[e.key];
      let next = null;
      if (step !== undefined) next = Math.max(0, Math.min(n - 1, i + step));
      else if (e.key === "Home") next = 0;
      else if (e.key === "End") next = n - 1;
      else if (e.key === "Escape") hideTooltip();
      if (next === null) return;
      e.preventDefault();
      focusToken(next);
    });
  }

  function focusToken(i) {
    const el = tokenEl(i);
    if (!el) return;
    $("tokens").querySelectorAll('.token[tabindex="0"]').forEach((t) => (t.tabIndex = -1));
    el.tabIndex = 0;
    el.focus({ preventScroll: true });
  }

  // ---- chart ----------------------------------------------------------------------------------------
  const chart = { svg: null, x: null, y: null, m: null, w: 0, h: 0 };

  function svgEl(name, attrs = {}, parent = null) {
    const el = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (parent) parent.append(el);
    return el;
  }

  /** "Nice" tick positions (1-based token positions) for n tokens, about `target` of them. */
  function xTicks(n, target) {
    if (n <= 1) return [1];
    const raw = (n - 1) / target;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = Math.max(1, [1, 2, 5, 10].map((s) => s * mag).find((s) => s >= raw) || 10 * mag);
    const ticks = [1];
    for (let t = step; t <= n; t += step) if (t - ticks[ticks.length - 1] >= step * 0.6) ticks.push(t);
    return ticks;
  }

  function renderChart() {
    const host = $("chart");
    const r = state.result;
    if (!r) return;
    const { tokens, probs } = r;
    const n = tokens.length;
    const w = Math.max(280, host.clientWidth);
    const h = w < 520 ? 190 : 240;
    const m = { top: 14, right: 14, bottom: 34, left: 44 };
    const pw = w - m.left - m.right;
    const ph = h - m.top - m.bottom;
    const x = (i) => m.left + (n === 1 ? pw / 2 : (i / (n - 1)) * pw);
    const y = (p) => m.top + (1 - p) * ph;
    Object.assign(chart, { x, y, m, w, h });

    const svg = svgEl("svg", {
      viewBox: `0 0 ${w} ${h}`, width: w, height: h, tabindex: 0, role: "img", focusable: "true",
      "aria-labelledby": "chart-heading chart-desc",
    });
    const desc = svgEl("desc", { id: "chart-desc" }, svg);
    desc.textContent = `Line chart of P(positive) after each of ${n} tokens, from ${fmt(probs[0])} to ${fmt(probs[n - 1])}. ` +
      "Use the left and right arrow keys to move along it.";

    // The line itself is dark (the scale is near-white around 0.5); the area under it carries the colour.
    const defs = svgEl("defs", {}, svg);
    svgEl("rect", { x: m.left, y: m.top, width: pw, height: y(0.5) - m.top }, svgEl("clipPath", { id: "clip-above" }, defs));
    svgEl("rect", { x: m.left, y: y(0.5), width: pw, height: m.top + ph - y(0.5) }, svgEl("clipPath", { id: "clip-below" }, defs));

    const grid = svgEl("g", { class: "grid" }, svg);
    const axis = svgEl("g", { class: "axis" }, svg);
    for (const p of [0, 0.25, 0.5, 0.75, 1]) {
      svgEl("line", { x1: m.left, x2: m.left + pw, y1: y(p), y2: y(p) }, grid);
      const t = svgEl("text", { x: m.left - 8, y: y(p) + 4, "text-anchor": "end" }, axis);
      t.textContent = p === 0 || p === 1 ? String(p) : p.toFixed(2);
    }
    for (const t of xTicks(n, w < 520 ? 4 : 8)) {
      svgEl("line", { x1: x(t - 1), x2: x(t - 1), y1: m.top, y2: m.top + ph }, grid);
      const label = svgEl("text", { x: x(t - 1), y: m.top + ph + 16, "text-anchor": "middle" }, axis);
      label.textContent = String(t);
    }
    const xl = svgEl("text", { class: "axis-label", x: m.left + pw, y: h - 3, "text-anchor": "end" }, svg);
    xl.textContent = "token position";
    const yl = svgEl("text", { class: "axis-label", x: 12, y: m.top + ph / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${m.top + ph / 2})` }, svg);
    yl.textContent = "P(positive)";

    // Shaded area between the trace and 0.5: blue above, red below.
    const pts = probs.map((p, i) => `${x(i).toFixed(2)},${y(p).toFixed(2)}`);
    const area = `M${x(0).toFixed(2)},${y(0.5)} L${pts.join(" L")} L${x(n - 1).toFixed(2)},${y(0.5)} Z`;
    svgEl("path", { d: area, fill: SCALE[SCALE.length - 1], "fill-opacity": 0.22, "clip-path": "url(#clip-above)" }, svg);
    svgEl("path", { d: area, fill: SCALE[0], "fill-opacity": 0.22, "clip-path": "url(#clip-below)" }, svg);
    svgEl("line", { class: "threshold", x1: m.left, x2: m.left + pw, y1: y(0.5), y2: y(0.5) }, svg);
    if (n === 1) {
      svgEl("circle", { cx: x(0), cy: y(probs[0]), r: 4, fill: colour(probs[0]), stroke: "#1c2430" }, svg);
    } else {
      svgEl("path", { class: "trace-line", d: `M${pts.join(" L")}` }, svg);
    }

    const cursor = svgEl("g", { class: "cursor-group", visibility: "hidden" }, svg);
    svgEl("line", { class: "cursor", y1: m.top, y2: m.top + ph }, cursor);
    svgEl("circle", { class: "cursor-dot", r: 5 }, cursor);

    // A transparent overlay catches the pointer over the whole plot area.
    const overlay = svgEl("rect", { x: m.left, y: m.top, width: pw, height: ph, fill: "transparent" }, svg);
    const indexAt = (clientX) => {
      const box = svg.getBoundingClientRect();
      const sx = ((clientX - box.left) / box.width) * w; // CSS px → SVG units
      return n === 1 ? 0 : Math.max(0, Math.min(n - 1, Math.round(((sx - m.left) / pw) * (n - 1))));
    };
    overlay.addEventListener("pointermove", (e) => {
      const i = indexAt(e.clientX);
      if (i !== state.active || $("tooltip").hidden) setActive(i, "chart", { tooltipAt: cursorRect(i) });
    });
    overlay.addEventListener("pointerleave", () => setActive(-1, "chart"));
    svg.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1, PageDown: 10, PageUp: -10 }[e.key];
      let i = null;
      if (step !== undefined) {
        const cur = state.active >= 0 ? state.active : step > 0 ? -1 : n;
        i = Math.max(0, Math.min(n - 1, cur + step));
      }
      else if (e.key === "Home") i = 0;
      else if (e.key === "End") i = n - 1;
      else if (e.key === "Escape") { setActive(-1, "chart"); return; }
      if (i === null) return;
      e.preventDefault();
      setActive(i, "chart", { tooltipAt: cursorRect(i) });
    });
    svg.addEventListener("focus", () => {
      const i = state.active < 0 ? 0 : state.active;
      setActive(i, "chart", { tooltipAt: cursorRect(i) });
    });
    svg.addEventListener("blur", () => setActive(-1, "chart"));

    chart.svg = svg;
    host.replaceChildren(svg);
  }

  /** Screen rectangle of the chart point for token i (for tooltip placement). */
  function cursorRect(i) {
    const box = chart.svg.getBoundingClientRect();
    const s = box.width / chart.w;
    const cx = box.left + chart.x(i) * s;
    const cy = box.top + chart.y(state.result.probs[i]) * s;
    return { left: cx - 6, top: cy - 6, width: 12, height: 12 };
  }

  function drawCursor(i) {
    if (!chart.svg) return;
    const g = chart.svg.querySelector(".cursor-group");
    if (i < 0 || !state.result) {
      g.setAttribute("visibility", "hidden");
      return;
    }
    const p = state.result.probs[i];
    const [line, dot] = g.children;
    line.setAttribute("x1", chart.x(i));
    line.setAttribute("x2", chart.x(i));
    dot.setAttribute("cx", chart.x(i));
    dot.setAttribute("cy", chart.y(p));
    dot.setAttribute("fill", colour(p));
    g.setAttribute("visibility", "visible");
  }

  // ---- largest moves ----------------------------------------------------------------------------------
  function renderMoves(tokens, probs) {
    const deltas = [];
    for (let i = 1; i < probs.length; i++) deltas.push({ i, d: probs[i] - probs[i - 1] });
    const fill = (list, items, emptyText) => {
      const el = $(list);
      if (!items.length) {
        const li = document.createElement("li");
        li.className = "empty";
        li.textContent = emptyText;
        el.replaceChildren(li);
        return;
      }
      el.replaceChildren(...items.map(({ i, d }) => {
        const li = document.createElement("li");
        const b = document.createElement("button");
        b.type = "button";
        b.className = "move";
        b.title = `Show token ${i + 1}`;
        const word = document.createElement("span");
        word.textContent = quote(tokens[i]);
        const delta = document.createElement("span");
        delta.className = `delta ${d >= 0 ? "pos-text" : "neg-text"}`;
        delta.textContent = signed(d);
        b.append(word, delta);
        b.setAttribute("aria-label", `${tokens[i]}, token ${i + 1}, changed P(positive) by ${signed(d)}; show it`);
        b.addEventListener("click", () => focusToken(i));
        li.append(b);
        return li;
      }));
    };
    // Strongest first, each word once (a repeated word shows where it moved the probability most).
    const top = (list) => {
      const seen = new Set();
      return list.filter(({ i }) => !seen.has(tokens[i]) && seen.add(tokens[i])).slice(0, 5);
    };
    const up = top(deltas.filter((x) => x.d > 0.005).sort((a, b) => b.d - a.d));
    const down = top(deltas.filter((x) => x.d < -0.005).sort((a, b) => a.d - b.d));
    fill("moves-up", up, "No token pushed it noticeably up.");
    fill("moves-down", down, "No token pushed it noticeably down.");
  }

  // ---- wiring --------------------------------------------------------------------------------------------
  function updateCount() {
    const n = $("review").value.length;
    $("char-count").textContent = `${n.toLocaleString("en")} character${n === 1 ? "" : "s"}`;
  }

  function init() {
    $("analyze-form").addEventListener("submit", (e) => {
      e.preventDefault();
      analyze();
    });
    $("review").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        analyze();
      }
    });
    $("review").addEventListener("input", updateCount);
    document.querySelectorAll("[data-example]").forEach((b) =>
      b.addEventListener("click", () => {
        $("review").value = EXAMPLES[b.dataset.example];
        updateCount();
        $("review").focus();
      }));
    wireTokens();
    document.querySelectorAll("input[name=token-view]").forEach((radio) =>
      radio.addEventListener("change", () => {
        if (!radio.checked) return;
        state.view = radio.value;
        applyView();
      }));
    let width = 0;
    new ResizeObserver((entries) => {
      const w = Math.round(entries[0].contentRect.width);
      if (w !== width && state.result) {
        width = w;
        hideTooltip();
        renderChart();
        renderGates(state.result.prediction.trace.gates);
      }
      width = w;
    }).observe($("chart"));
    window.addEventListener("scroll", followAnchor, { passive: true });
    $("tokens").addEventListener("scroll", followAnchor, { passive: true });
    updateCount();
    loadModelInfo();
  }

  init();
})();
