// The chargpt serve page: model info, streamed generation and attention heatmaps.
// Model text is only ever written with textContent / text nodes or drawn on a canvas, never
// parsed as HTML, so whatever the model (or a prompt) contains cannot become markup.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let controller = null;
let selected = null; // {layer, head} of the enlarged map

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function visible(c) {
  if (c === "\n") return "⏎";
  if (c === " ") return "␣";
  if (c === "\t") return "⇥";
  return c;
}

function optionalNumber(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  return integer ? parseInt(raw, 10) : parseFloat(raw);
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON: fall through */ }
  return `HTTP ${resp.status}`;
}

async function loadInfo() {
  try {
    const resp = await fetch("/api/info");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    info = await resp.json();
  } catch (e) {
    setStatus(`cannot load model info: ${e.message}`, true);
    return;
  }
  $("info-name").textContent = `${info.name} (${info.checkpoint})`;
  $("info-params").textContent = `${(info.parameters / 1e6).toFixed(2)} M`;
  $("info-shape").textContent =
    `${info.n_layer} layers × ${info.n_head} heads, ${info.n_embd} wide, ` +
    `context ${info.block_size}, vocab ${info.vocab_size}`;
  $("info-step").textContent = info.step.toLocaleString("en-US");
  $("info-val").textContent = info.val_loss === null ? "n/a" : info.val_loss.toFixed(4);
  $("max-new-tokens").max = info.limits.max_new_tokens;
  $("attention").disabled = !info.has_attention;
  document.title = `chargpt: ${info.name}`;
}

// Server-sent events arrive in arbitrary pieces; this yields complete {event, data} records.
async function* readEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      yield { event, data: data.join("\n") };
    }
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

async function generate() {
  if (controller) return; // one generation at a time per page
  const prompt = $("prompt").value;
  const body = {
    prompt,
    stream: true,
    temperature: parseFloat($("temperature").value),
    top_k: optionalNumber("top-k", true),
    top_p: optionalNumber("top-p", false),
    max_new_tokens: optionalNumber("max-new-tokens", true) ?? 200,
    seed: optionalNumber("seed", true),
  };
  const outText = $("out-text");
  $("out-prompt").textContent = prompt;
  outText.textContent = "";
  controller = new AbortController();
  setRunning(true);
  setStatus("generating…");
  const t0 = performance.now();
  let chars = 0;
  try {
    const resp = await fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const out = $("output");
    for await (const { event, data } of readEvents(resp)) {
      const msg = JSON.parse(data);
      if (event === "error") throw new Error(msg.error.message);
      if (event === "done") {
        const secs = (performance.now() - t0) / 1000;
        setStatus(`done: ${msg.tokens} characters in ${secs.toFixed(2)} s ` +
          `(${msg.finish_reason})`);
        break;
      }
      outText.appendChild(document.createTextNode(msg.text));
      chars += msg.text.length;
      setStatus(`generating… ${chars} characters`);
      out.scrollTop = out.scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") setStatus(`stopped after ${chars} characters`);
    else setStatus(e.message, true);
  } finally {
    controller = null;
    setRunning(false);
  }
}

function stop() {
  if (controller) controller.abort();
}

// --- attention ---------------------------------------------------------------------------

let attn = null; // the last /api/attention answer

function weightColor(w) {
  // sqrt spreads out the many small weights so that secondary patterns stay visible
  const t = Math.sqrt(Math.max(0, Math.min(1, w)));
  const r = Math.round(255 - t * (255 - 20));
  const g = Math.round(255 - t * (255 - 60));
  const b = Math.round(255 - t * (255 - 140));
  return `rgb(${r},${g},${b})`;
}

function drawMap(canvas, rows, cell, offset) {
  const ctx = canvas.getContext("2d");
  const scale = attn.scale; // weights arrive as whole thousandths
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(offset, offset, rows.length * cell, rows.length * cell);
  for (let i = 0; i < rows.length; i++) {
    const row = rows[i];
    for (let j = 0; j < row.length; j++) {
      ctx.fillStyle = weightColor(row[j] / scale);
      ctx.fillRect(offset + j * cell, offset + i * cell, cell, cell);
    }
  }
}

function showHover(layer, head, i, j) {
  const rows = attn.weights[layer][head];
  if (i < 0 || j < 0 || i >= rows.length || j >= rows.length) return;
  const w = j <= i ? rows[i][j] / attn.scale : 0;
  const q = visible(attn.tokens[i]);
  const k = visible(attn.tokens[j]);
  $("attn-hover").textContent =
    `layer ${layer + 1} head ${head + 1}: "${q}" (position ${i}) attends to ` +
    `"${k}" (position ${j}) with weight ${w.toFixed(3)}`;
}

const BIG_MARGIN = 14;

function bigCell(T) {
  return Math.max(4, Math.min(18, Math.floor(600 / T)));
}

function drawBig() {
  if (!attn || !selected) return;
  const { layer, head } = selected;
  const T = attn.tokens.length;
  const cell = bigCell(T);
  const canvas = $("attn-big");
  canvas.width = canvas.height = BIG_MARGIN + T * cell + 2;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  drawMap(canvas, attn.weights[layer][head], cell, BIG_MARGIN);
  if (cell >= 7) {
    ctx.fillStyle = "#444";
    ctx.font = `${Math.min(12, cell)}px ui-monospace, monospace`;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    for (let i = 0; i < T; i++) {
      const c = visible(attn.tokens[i]);
      const mid = BIG_MARGIN + i * cell + cell / 2;
      ctx.fillText(c, mid, BIG_MARGIN / 2); // keys along the top
      ctx.fillText(c, BIG_MARGIN / 2, mid); // queries down the side
    }
  }
  $("attn-focus-title").textContent = `layer ${layer + 1}, head ${head + 1} (enlarged)`;
  for (const c of document.querySelectorAll("#attn-grid canvas")) {
    c.classList.toggle("selected",
      Number(c.dataset.layer) === layer && Number(c.dataset.head) === head);
  }
}

function renderAttention() {
  const grid = $("attn-grid");
  grid.replaceChildren();
  const T = attn.tokens.length;
  const cell = Math.max(2, Math.floor(150 / T));
  grid.style.gridTemplateColumns = `repeat(${attn.n_head}, auto)`;
  for (let l = 0; l < attn.n_layer; l++) {
    for (let h = 0; h < attn.n_head; h++) {
      const fig = document.createElement("figure");
      const cap = document.createElement("figcaption");
      cap.textContent = `layer ${l + 1} · head ${h + 1}`;
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = T * cell;
      canvas.dataset.layer = String(l);
      canvas.dataset.head = String(h);
      canvas.title = `layer ${l + 1}, head ${h + 1}`;
      drawMap(canvas, attn.weights[l][h], cell, 0);
      canvas.addEventListener("mousemove", (ev) => {
        showHover(l, h, Math.floor(ev.offsetY / cell), Math.floor(ev.offsetX / cell));
      });
      canvas.addEventListener("click", () => { selected = { layer: l, head: h }; drawBig(); });
      fig.append(cap, canvas);
      grid.appendChild(fig);
    }
  }
  if (!selected || selected.layer >= attn.n_layer || selected.head >= attn.n_head) {
    selected = { layer: attn.n_layer - 1, head: 0 };
  }
  drawBig();
}

async function showAttention() {
  if (!info) return;
  // The prompt plus whatever was generated, cut to the model's context window (the server
  // crops it further to what its answer may hold).
  const shown = $("out-prompt").textContent + $("out-text").textContent;
  let text = shown || $("prompt").value;
  const keep = Math.min(info.block_size, info.limits.max_prompt_chars);
  text = Array.from(text).slice(-keep).join("");
  if (!text) {
    setStatus("type a prompt first", true);
    return;
  }
  setStatus("computing attention…");
  try {
    const resp = await fetch("/api/attention", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      // A byte model's text holds U+FFFD where the sampled bytes were not UTF-8; those are
      // not the model's bytes, and are dropped rather than refused.
      body: JSON.stringify(shown && info.unit === "byte" ? { prompt: text, unknown: "skip" }
        : { prompt: text }),
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    attn = await resp.json();
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  $("attention-section").hidden = false;
  renderAttention();
  const units = info.unit === "byte" ? "bytes" : "characters";
  setStatus(`attention over the last ${attn.tokens.length} ${units}`);
  $("attention-section").scrollIntoView({ behavior: "instant", block: "start" });
}

function init() {
  $("temperature").addEventListener("input", () => {
    $("temperature-out").textContent = $("temperature").value;
  });
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("attention").addEventListener("click", showAttention);
  $("attn-big").addEventListener("mousemove", (ev) => {
    if (!attn || !selected) return;
    const cell = bigCell(attn.tokens.length);
    const i = Math.floor((ev.offsetY - BIG_MARGIN) / cell);
    const j = Math.floor((ev.offsetX - BIG_MARGIN) / cell);
    showHover(selected.layer, selected.head, i, j);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) generate();
  });
  loadInfo();
}

init();
