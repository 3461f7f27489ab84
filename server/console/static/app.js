// peftserve console: a single page over the public API. No build step, no dependencies.
// The API key lives in `state.key` (page memory) only: never in a URL, a cookie or web storage.
"use strict";

const state = {
  key: "",
  authed: false,       // the last /v1/models call with this key succeeded
  admin: false,
  models: [],          // /v1/models data
  baseModel: null,     // the id whose `parent` is null/absent
  metrics: [],         // [{t, samples: Map<string, number>}], newest last, ~6 minutes kept
  pollTimer: null,
  screen: null,
  running: [],         // AbortControllers of playground streams
  ftJob: null,         // job id shown in the fine-tuning detail
  ftAvailable: false,  // the server has /v1/fine_tuning/jobs (polled only then)
};

const WINDOW_MS = 5 * 60 * 1000;
const POLL_MS = 2000;
const PROBE_NAME = "~console-admin-probe~";  // never a valid adapter name: the probe can change nothing

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) e.append(c);
  return e;
}

// ---- API ------------------------------------------------------------------------------------------
function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

class ApiError extends Error {
  constructor(status, message, param) { super(message); this.status = status; this.param = param; }
}

async function errorOf(res) {
  let msg = `${res.status} ${res.statusText}`, param = null;
  try {
    const body = await res.json();
    if (body && body.error) { msg = `${res.status}: ${body.error.message}`; param = body.error.param; }
  } catch (_) { /* not JSON */ }
  return new ApiError(res.status, msg, param);
}

async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (!res.ok) throw await errorOf(res);
  if (res.status === 204) return null;
  return res.json();
}

function showError(e) {
  const box = $("#global-error");
  box.textContent = e ? String(e.message || e) : "";
  box.hidden = !e;
}

// ---- key and admin detection -------------------------------------------------------------------------
async function useKey(key) {
  state.key = key;
  const status = $("#key-status");
  try {
    const models = await api("GET", "/v1/models");
    state.models = models.data || [];
    state.baseModel = (state.models.find((m) => !m.parent) || state.models[0] || {}).id || null;
  } catch (e) {
    state.models = [];
    state.authed = false;
    state.admin = false;
    status.textContent = e.status === 401 ? "key needed or wrong" : "server error";
    status.dataset.role = "none";
    applyRole();
    showError(e.status === 401 ? new Error("Enter the API key (Bearer key) the server was started with.") : e);
    return;
  }
  state.authed = true;
  showError(null);
  // A harmless admin-only call: replacing an adapter whose name can never exist. The admin key gets past
  // authentication to a 404; a user key gets 403. Nothing is read or written either way.
  const probe = await fetch(`/v1/adapters/${encodeURIComponent(PROBE_NAME)}`, { method: "PUT", headers: headers() });
  state.admin = probe.status !== 401 && probe.status !== 403;
  status.textContent = state.admin ? "admin" : "user (read-only adapters)";
  status.dataset.role = state.admin ? "admin" : "user";
  applyRole();
  render();
}

function applyRole() {
  document.body.dataset.role = state.admin ? "admin" : "user";
  $("#upload-panel").hidden = !state.admin;
  $("#adapters-readonly").hidden = state.admin;
  $("#as-form").hidden = !state.admin;
}

// ---- routing -----------------------------------------------------------------------------------------
const SCREENS = ["adapters", "playground", "assistants", "fine-tuning", "health"];

function route() {
  const h = location.hash;
  if (h && !h.startsWith("#/")) return;  // an in-page anchor (the skip link)
  const name = SCREENS.includes(h.slice(2)) ? h.slice(2) : "adapters";
  state.screen = name;
  for (const s of SCREENS) $(`#screen-${s}`).hidden = s !== name;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.screen === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${$(`#screen-${name} h2`).textContent} · peftserve console`;
  render();
}

function render() {
  const s = state.screen;
  if (!state.authed) return;
  if (s === "adapters") renderAdapters().catch(showError);
  else if (s === "playground") renderPlayground();
  else if (s === "assistants") renderAssistants().catch(showError);
  else if (s === "fine-tuning") renderFineTuning().catch(showError);
  else if (s === "health") renderHealth().catch(showError);
  schedulePoll();
}

function schedulePoll() {
  clearTimeout(state.pollTimer);
  const s = state.screen;
  if (s !== "adapters" && s !== "health" && !(s === "fine-tuning" && state.ftAvailable)) return;
  state.pollTimer = setTimeout(async () => {
    if (document.hidden) { schedulePoll(); return; }
    try {
      if (s === "adapters") await renderAdapters(true);
      else if (s === "health") await renderHealth();
      else if (s === "fine-tuning") await refreshJobs();
    } catch (e) { showError(e); }
    schedulePoll();
  }, s === "adapters" ? 3000 : POLL_MS);
}

// ---- /metrics ----------------------------------------------------------------------------------------
function parseProm(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const l of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

async function scrape() {
  const res = await fetch("/metrics", { headers: headers() });
  if (!res.ok) throw await errorOf(res);
  const samples = parseProm(await res.text());
  const now = Date.now();
  state.metrics.push({ t: now, samples });
  while (state.metrics.length > 2 && state.metrics[1].t < now - WINDOW_MS - 60000) state.metrics.shift();
  return samples;
}

function sum(samples, name, filter = {}) {
  let total = 0;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (Object.entries(filter).every(([k, v]) => s.labels[k] === v)) total += s.value;
  }
  return total;
}

function gauge(samples, name) {
  const s = samples.find((x) => x.name === name);
  return s ? s.value : null;
}

/** Requests and tokens of one adapter label between the oldest sample inside the window and now. */
function adapterActivity(label) {
  const h = state.metrics;
  if (!h.length) return { requests: 0, tokens: 0 };
  const now = h[h.length - 1];
  const base = h.find((x) => x.t >= now.t - WINDOW_MS) || h[0];
  const req = (x) => sum(x.samples, "peftserve_http_requests_total", { adapter: label });
  const tok = (x) => sum(x.samples, "peftserve_prompt_tokens_total", { adapter: label }) +
    sum(x.samples, "peftserve_generation_tokens_total", { adapter: label });
  return { requests: req(now) - req(base), tokens: tok(now) - tok(base) };
}

// ---- Adapters ------------------------------------------------------------------------------------------
function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

async function renderAdapters(quiet = false) {
  const [list] = await Promise.all([api("GET", "/v1/adapters"), scrape().catch((e) => { if (!quiet) showError(e); })]);
  const tbody = $("#adapters-table tbody");
  const rows = [];
  for (const a of list.data) {
    const act = adapterActivity(a.name);
    const actions = el("td");
    if (state.admin) {
      if (a.stored !== false) actions.append(el("button", { type: "button", class: "small", text: "Replace",
        "aria-label": `Replace ${a.name}`, onclick: () => replaceAdapter(a.name) }), " ");
      actions.append(el("button", { type: "button", class: "small danger", text: "Delete",
        "aria-label": `Delete ${a.name}`, onclick: () => deleteAdapter(a.name) }));
    }
    rows.push(el("tr", { "data-adapter": a.name },
      el("th", { scope: "row", text: a.name }),
      el("td", { text: a.version ?? "—" }),
      el("td", { text: a.type || a.peft_type || "—" }),
      el("td", { text: a.rank ?? "—" }),
      el("td", { text: fmtBytes(a.size_bytes) }),
      el("td", { class: "tier", "data-tier": a.residency, text: a.residency }),
      el("td", { class: "num req", text: String(act.requests) }),
      el("td", { class: "num tok", text: String(act.tokens) }),
      actions));
  }
  tbody.replaceChildren(...rows);
  $("#adapters-empty").hidden = rows.length > 0;
}

const upload = { files: [], folder: null };

function setUploadFiles(files, folder = null) {
  upload.files = files;
  upload.folder = folder;
  $("#upload-list").replaceChildren(...files.map((f) => el("li", { text: `${f.name} (${fmtBytes(f.size)})` })));
  const name = $("#upload-name");
  if (!name.value) {
    let guess = folder;
    if (!guess && files.length === 1 && isArchive(files[0].name)) guess = files[0].name.replace(/\.(tar\.gz|tgz|tar|zip)$/i, "");
    if (guess) name.value = guess;
  }
}

function isArchive(n) { return /\.(tar\.gz|tgz|tar|zip)$/i.test(n); }

/** Files of a dropped folder (its top level and sub-folders), through the entries API. */
async function entryFiles(entry, out) {
  if (entry.isFile) {
    out.push(await new Promise((ok, bad) => entry.file(ok, bad)));
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
      if (!batch.length) break;
      for (const e of batch) await entryFiles(e, out);
    }
  }
}

async function onDrop(ev) {
  ev.preventDefault();
  $("#drop-zone").classList.remove("over");
  const items = [...(ev.dataTransfer.items || [])].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (items.length) {
    const files = [];
    for (const e of items) await entryFiles(e, files);
    const folder = items.length === 1 && items[0].isDirectory ? items[0].name : null;
    setUploadFiles(files, folder);
  } else {
    setUploadFiles([...ev.dataTransfer.files]);
  }
}

function formFor(name, files) {
  const form = new FormData();
  form.append("name", name);
  const field = files.length === 1 && isArchive(files[0].name) ? "archive" : "files";
  for (const f of files) form.append(field, f, f.name);
  return form;
}

/** XHR rather than fetch: only XHR reports upload progress. */
function send(method, url, form) {
  const bar = $("#upload-progress");
  const msg = $("#upload-msg");
  bar.hidden = false;
  bar.value = 0;
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    if (state.key) xhr.setRequestHeader("Authorization", "Bearer " + state.key);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) { bar.value = Math.round((100 * e.loaded) / e.total); msg.textContent = `Uploading… ${bar.value}%`; }
    };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* empty */ }
      if (xhr.status >= 200 && xhr.status < 300) { bar.value = 100; resolve(body); }
      else reject(new ApiError(xhr.status, `${xhr.status}: ${body && body.error ? body.error.message : xhr.statusText}`));
    };
    xhr.onerror = () => reject(new Error("the upload failed (network error)"));
    xhr.send(form);
  });
}

async function doUpload() {
  const name = $("#upload-name").value.trim();
  const msg = $("#upload-msg");
  if (!upload.files.length) { msg.textContent = "Choose or drop the adapter's files first."; return; }
  if (!name) { msg.textContent = "Give the adapter a name."; $("#upload-name").focus(); return; }
  try {
    const rec = await send("POST", "/v1/adapters", formFor(name, upload.files));
    msg.textContent = `Stored ${rec.name} v${rec.version} (${rec.type}, ${fmtBytes(rec.size_bytes)}).`;
    setUploadFiles([]);
    $("#upload-name").value = "";
    $("#upload-files").value = "";
    await refreshModels();
    await renderAdapters(true);
  } catch (e) { msg.textContent = `Upload refused: ${e.message}`; }
}

function replaceAdapter(name) {
  const input = $("#replace-files");
  input.value = "";
  input.onchange = async () => {
    const files = [...input.files];
    if (!files.length) return;
    try {
      const rec = await send("PUT", `/v1/adapters/${encodeURIComponent(name)}`, formFor(name, files));
      $("#upload-msg").textContent = `Replaced ${rec.name}: now v${rec.version}.`;
      await renderAdapters(true);
    } catch (e) { $("#upload-msg").textContent = `Replace refused: ${e.message}`; }
  };
  input.click();
}

function confirmDialog(text, okLabel) {
  const dlg = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    const done = (v) => { dlg.close(); resolve(v); };
    $("#confirm-ok").onclick = () => done(true);
    $("#confirm-cancel").onclick = () => done(false);
    dlg.oncancel = () => resolve(false);
    dlg.showModal();
    $("#confirm-cancel").focus();
  });
}

async function deleteAdapter(name) {
  if (!(await confirmDialog(`Delete adapter ${name}? Requests using it finish first; its files are removed.`, "Delete"))) return;
  try {
    await api("DELETE", `/v1/adapters/${encodeURIComponent(name)}`);
    $("#upload-msg").textContent = `Deleted ${name}.`;
    await refreshModels();
    await renderAdapters(true);
  } catch (e) { showError(e); }
}

async function refreshModels() {
  const models = await api("GET", "/v1/models");
  state.models = models.data || [];
}

// ---- Playground ----------------------------------------------------------------------------------------
function modelSelects() { return [...document.querySelectorAll("#pg-models select")]; }

function addColumn(value) {
  const n = modelSelects().length;
  if (n >= 4) return;
  const id = `pg-model-${n + 1}`;
  const sel = el("select", { id, "data-column": n + 1 });
  fillModels(sel, value);
  $("#pg-models").append(el("span", { class: "pick" }, el("label", { for: id, text: `Column ${n + 1} model` }), sel));
}

function fillModels(sel, value) {
  const keep = value ?? sel.value;
  sel.replaceChildren(...state.models.map((m) => el("option", { value: m.id, text: m.parent ? m.id : `${m.id} (base)` })));
  if (keep && state.models.some((m) => m.id === keep)) sel.value = keep;
}

function renderPlayground() {
  if (!modelSelects().length) {
    addColumn(state.baseModel);
    const other = state.models.find((m) => m.id !== state.baseModel);
    addColumn(other ? other.id : state.baseModel);
  }
  for (const s of modelSelects()) fillModels(s);
}

function requestFor(model) {
  const chat = $("#pg-mode-chat").checked;
  const body = { model, stream: true, stream_options: { include_usage: true },
    temperature: Number($("#pg-temperature").value), top_p: Number($("#pg-top-p").value),
    max_tokens: Number($("#pg-max-tokens").value) };
  const seed = $("#pg-seed").value;
  if (seed !== "") body.seed = Number(seed);
  const prompt = $("#pg-prompt").value;
  if (chat) {
    const sys = $("#pg-system").value.trim();
    body.messages = [...(sys ? [{ role: "system", content: sys }] : []), { role: "user", content: prompt }];
    return ["/v1/chat/completions", body];
  }
  body.prompt = prompt;
  return ["/v1/completions", body];
}

async function stream(col, model, ctrl) {
  const [path, body] = requestFor(model);
  const text = col.querySelector(".pg-text");
  const usage = col.querySelector(".pg-usage");
  const t0 = performance.now();
  let chunks = 0, out = "", first = null;
  col.dataset.state = "streaming";
  try {
    const res = await fetch(path, { method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body), signal: ctrl.signal });
    if (!res.ok) throw await errorOf(res);
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const choice = (obj.choices || [])[0];
          const piece = choice ? (choice.delta ? choice.delta.content || "" : choice.text || "") : "";
          if (piece) {
            if (first === null) first = performance.now();
            out += piece;
            chunks++;
            text.textContent = out;
            col.dataset.chunks = String(chunks);
          }
          if (obj.usage) {
            const secs = (performance.now() - t0) / 1000;
            usage.textContent = `prompt ${obj.usage.prompt_tokens} · completion ${obj.usage.completion_tokens} tokens · ` +
              `${secs.toFixed(1)} s` + (first !== null ? ` · first token ${((first - t0) / 1000).toFixed(2)} s` : "");
            col.dataset.completionTokens = String(obj.usage.completion_tokens);
          }
        }
      }
    }
    col.dataset.state = "done";
  } catch (e) {
    col.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    usage.textContent = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
  }
  return out;
}

async function runPlayground(ev) {
  ev.preventDefault();
  const models = modelSelects().map((s) => s.value).filter(Boolean);
  if (!models.length) return;
  const outputs = $("#pg-outputs");
  const cols = models.map((m, i) => el("article", { class: "pg-col", "data-column": i + 1, "data-model": m, "data-state": "waiting",
    "aria-label": `Answer from ${m}` }, el("h3", { text: `${i + 1}. ${m}` }),
    el("pre", { class: "pg-text", "aria-live": "polite" }), el("p", { class: "pg-usage" })));
  outputs.replaceChildren(...cols);
  $("#pg-diff").hidden = true;
  $("#pg-run").disabled = true;
  $("#pg-stop").disabled = false;
  $("#pg-status").textContent = "Streaming…";
  state.running = models.map(() => new AbortController());
  const texts = await Promise.all(models.map((m, i) => stream(cols[i], m, state.running[i])));
  state.running = [];
  $("#pg-run").disabled = false;
  $("#pg-stop").disabled = true;
  $("#pg-status").textContent = "Done.";
  const allDone = cols.every((c) => c.dataset.state === "done");
  if (allDone && Number($("#pg-temperature").value) === 0 && texts.length > 1) showDiff(models, texts);
}

function pieces(s) { return s.match(/\s+|[^\s]+/g) || []; }

/** Longest-common-subsequence diff: [{op: "=", "-", "+", text}]. Words, or characters for short texts. */
function diff(a, b) {
  let x = pieces(a), y = pieces(b);
  if (x.length < 8 && y.length < 8 && a.length * b.length <= 250000) { x = [...a]; y = [...b]; }
  if (x.length * y.length > 4000000) return [{ op: "-", text: a }, { op: "+", text: b }];
  const n = x.length, m = y.length;
  const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  const push = (op, t) => { if (out.length && out[out.length - 1].op === op) out[out.length - 1].text += t; else out.push({ op, text: t }); };
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { push("=", x[i]); i++; j++; } else if (L[i + 1][j] >= L[i][j + 1]) { push("-", x[i]); i++; } else { push("+", y[j]); j++; }
  }
  while (i < n) push("-", x[i++]);
  while (j < m) push("+", y[j++]);
  return out;
}

function showDiff(models, texts) {
  const body = $("#pg-diff-body");
  body.replaceChildren();
  for (let k = 1; k < texts.length; k++) {
    const parts = diff(texts[0], texts[k]);
    const same = parts.every((p) => p.op === "=");
    const pre = el("pre", { class: "diff", "data-column": k + 1 });
    for (const p of parts) {
      pre.append(p.op === "=" ? document.createTextNode(p.text) : el(p.op === "+" ? "ins" : "del", { text: p.text }));
    }
    body.append(el("h4", { text: `${models[0]} → ${models[k]}${same ? " (identical)" : ""}` }), pre);
  }
  $("#pg-diff").hidden = false;
}

// ---- Assistants ------------------------------------------------------------------------------------------
function unavailable(id, what, e) {
  const p = $(id);
  p.textContent = `${what} are not available on this server (${e.message}).`;
  p.hidden = false;
}

async function renderAssistants() {
  let list;
  try {
    list = await api("GET", "/v1/assistants?limit=100");
  } catch (e) {
    if (e.status === 404 || e.status === 405) {
      $("#as-body").hidden = true;
      unavailable("#as-unavailable", "Assistants", e);
      return;
    }
    throw e;
  }
  $("#as-unavailable").hidden = true;
  $("#as-body").hidden = false;
  const sel = $("#as-model");
  fillModels(sel);
  const rows = (list.data || []).map((a) => {
    const actions = el("td");
    if (state.admin) {
      actions.append(el("button", { type: "button", class: "small", text: "Edit", "aria-label": `Edit ${a.name}`, onclick: () => editAssistant(a) }), " ",
        el("button", { type: "button", class: "small danger", text: "Delete", "aria-label": `Delete ${a.name}`, onclick: () => deleteAssistant(a) }));
    }
    return el("tr", { "data-assistant": a.id },
      el("th", { scope: "row", text: a.name || a.id }), el("td", { text: a.model }),
      el("td", { class: "clip", text: a.instructions || "" }), el("td", { text: a.temperature ?? "—" }),
      el("td", { text: a.top_p ?? "—" }), el("td", { text: a.max_tokens ?? "—" }), actions);
  });
  $("#as-table tbody").replaceChildren(...rows);
}

function editAssistant(a) {
  $("#as-form-title").textContent = `Edit ${a.name}`;
  $("#as-id").value = a.id;
  $("#as-name").value = a.name || "";
  fillModels($("#as-model"), a.model);
  $("#as-instructions").value = a.instructions || "";
  $("#as-temperature").value = a.temperature ?? "";
  $("#as-top-p").value = a.top_p ?? "";
  $("#as-max-tokens").value = a.max_tokens ?? "";
  $("#as-stop").value = (a.stop ? [].concat(a.stop) : []).join("\n");
  $("#as-metadata").value = JSON.stringify(a.metadata || {});
  $("#as-name").focus();
}

function clearAssistantForm() {
  $("#as-form-title").textContent = "New assistant";
  for (const id of ["#as-id", "#as-name", "#as-instructions", "#as-temperature", "#as-top-p", "#as-max-tokens", "#as-stop"]) $(id).value = "";
  $("#as-metadata").value = "{}";
}

async function saveAssistant(ev) {
  ev.preventDefault();
  const msg = $("#as-msg");
  const body = { name: $("#as-name").value.trim(), model: $("#as-model").value, instructions: $("#as-instructions").value };
  for (const [id, key] of [["#as-temperature", "temperature"], ["#as-top-p", "top_p"], ["#as-max-tokens", "max_tokens"]]) {
    if ($(id).value !== "") body[key] = Number($(id).value);
  }
  const stop = $("#as-stop").value.split("\n").filter((s) => s.length);
  if (stop.length) body.stop = stop;
  try {
    body.metadata = JSON.parse($("#as-metadata").value || "{}");
  } catch (e) { msg.textContent = `metadata: not valid JSON (${e.message})`; return; }
  const id = $("#as-id").value;
  try {
    const a = await api("POST", id ? `/v1/assistants/${encodeURIComponent(id)}` : "/v1/assistants", body);
    msg.textContent = `Saved ${a.name}.`;
    clearAssistantForm();
    await refreshModels();
    await renderAssistants();
  } catch (e) { msg.textContent = `Refused: ${e.message}`; }
}

async function deleteAssistant(a) {
  if (!(await confirmDialog(`Delete assistant ${a.name}?`, "Delete"))) return;
  try {
    await api("DELETE", `/v1/assistants/${encodeURIComponent(a.id)}`);
    await refreshModels();
    await renderAssistants();
  } catch (e) { showError(e); }
}

// ---- Fine-tuning -------------------------------------------------------------------------------------------
async function renderFineTuning() {
  try {
    await refreshJobs();
    state.ftAvailable = true;
  } catch (e) {
    if (e.status === 404 || e.status === 405) {
      state.ftAvailable = false;
      $("#ft-body").hidden = true;
      unavailable("#ft-unavailable", "Fine-tuning jobs", e);
      return;
    }
    throw e;
  }
  $("#ft-unavailable").hidden = true;
  $("#ft-body").hidden = false;
  fillModels($("#ft-model"), state.baseModel);
  await refreshFiles();
  schedulePoll();  // route() asked before this screen knew the API is there: poll jobs (live loss curve) now
}

async function refreshFiles() {
  const files = await api("GET", "/v1/files?purpose=fine-tune");
  const data = files.data || [];
  $("#ft-files tbody").replaceChildren(...data.map((f) => el("tr", {},
    el("th", { scope: "row", text: f.id }), el("td", { text: f.filename }), el("td", { text: f.bytes }), el("td", { text: f.status || "" }))));
  for (const [id, optional] of [["#ft-train", false], ["#ft-valid", true]]) {
    const sel = $(id);
    const keep = sel.value;
    sel.replaceChildren(...(optional ? [el("option", { value: "", text: "none" })] : []),
      ...data.map((f) => el("option", { value: f.id, text: `${f.filename} (${f.id})` })));
    if (keep) sel.value = keep;
  }
}

async function uploadTrainingFile() {
  const input = $("#ft-file");
  const msg = $("#ft-file-msg");
  const errors = $("#ft-file-errors");
  errors.replaceChildren();
  if (!input.files.length) { msg.textContent = "Choose a JSONL file first."; return; }
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", input.files[0], input.files[0].name);
  const res = await fetch("/v1/files", { method: "POST", headers: headers(), body: form });
  if (!res.ok) {
    const e = await errorOf(res);
    msg.textContent = "The file was refused.";
    // The server names the line of each problem ("line 3: ..."): list them one per line.
    const lines = e.message.replace(/^\d+: /, "").split(/\n|;\s*(?=line \d+)/);
    errors.replaceChildren(...lines.map((l) => el("li", { text: l })));
    return;
  }
  const f = await res.json();
  msg.textContent = `Uploaded ${f.filename} as ${f.id}.`;
  input.value = "";
  await refreshFiles();
}

async function createJob(ev) {
  ev.preventDefault();
  const msg = $("#ft-create-msg");
  const body = { model: $("#ft-model").value, training_file: $("#ft-train").value };
  if ($("#ft-valid").value) body.validation_file = $("#ft-valid").value;
  if ($("#ft-suffix").value.trim()) body.suffix = $("#ft-suffix").value.trim();
  if ($("#ft-epochs").value) body.hyperparameters = { n_epochs: Number($("#ft-epochs").value) };
  try {
    const job = await api("POST", "/v1/fine_tuning/jobs", body);
    msg.textContent = `Created ${job.id} (${job.status}).`;
    state.ftJob = job.id;
    await refreshJobs();
  } catch (e) { msg.textContent = `Refused: ${e.message}`; }
}

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

async function refreshJobs() {
  const jobs = await api("GET", "/v1/fine_tuning/jobs?limit=50");
  $("#ft-jobs tbody").replaceChildren(...(jobs.data || []).map((j) => el("tr", { "data-job": j.id },
    el("th", { scope: "row" }, el("button", { type: "button", class: "link", text: j.id, onclick: () => { state.ftJob = j.id; refreshJobs().catch(showError); } })),
    el("td", { text: j.model }), el("td", { class: "job-state", "data-state": j.status, text: j.status }),
    el("td", { text: j.fine_tuned_model || "—" }),
    el("td", {}, FINAL.has(j.status) ? "" : el("button", { type: "button", class: "small danger", text: "Cancel",
      "aria-label": `Cancel ${j.id}`, onclick: () => cancelJob(j.id) })))));
  if (state.ftJob) await showJob(state.ftJob);
}

async function cancelJob(id) {
  if (!(await confirmDialog(`Cancel fine-tuning job ${id}?`, "Cancel job"))) return;
  try { await api("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`); await refreshJobs(); } catch (e) { showError(e); }
}

async function showJob(id) {
  // OpenAI pages events (newest first, at most 100 a page, `after` = the last id seen): read them all
  const all = [];
  let after = null;
  for (let pages = 0; pages < 50; pages++) {
    const q = `limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`;
    const ev = await api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?${q}`);
    const data = ev.data || [];
    all.push(...data);
    if (!ev.has_more || !data.length) break;
    after = data[data.length - 1].id;
  }
  const events = all.reverse().sort((a, b) => a.created_at - b.created_at);  // oldest first, stable within a second
  $("#h-ft-detail").textContent = `Job ${id}`;
  $("#ft-events").replaceChildren(...events.slice().reverse().map((e) =>
    el("li", { "data-level": e.level || "info", text: `${new Date(e.created_at * 1000).toLocaleTimeString()} ${e.message}` })));
  const train = [], valid = [];
  for (const e of events) {
    const d = e.data || {};
    if (typeof d.step !== "number") continue;
    if (typeof d.train_loss === "number") train.push([d.step, d.train_loss]);
    if (typeof d.valid_loss === "number") valid.push([d.step, d.valid_loss]);
  }
  drawCurve($("#ft-curve"), train, valid);
  $("#ft-detail").hidden = false;
}

const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

function drawCurve(svg, train, valid) {
  svg.replaceChildren();
  const all = [...train, ...valid];
  if (!all.length) { svg.append(svgEl("text", { x: 10, y: 100, class: "muted" })); svg.lastChild.textContent = "no loss points yet"; return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => 40 + (550 * (x - x0)) / (x1 - x0 || 1), sy = (y) => 185 - (170 * (y - y0)) / (y1 - y0 || 1);
  svg.append(svgEl("line", { x1: 40, y1: 185, x2: 590, y2: 185, class: "axis" }), svgEl("line", { x1: 40, y1: 10, x2: 40, y2: 185, class: "axis" }));
  const label = (x, y, t) => { const e = svgEl("text", { x, y, class: "tick" }); e.textContent = t; svg.append(e); };
  label(2, 20, y1.toFixed(2)); label(2, 185, y0.toFixed(2)); label(40, 199, `step ${x0}`); label(530, 199, `step ${x1}`);
  for (const [pts, cls] of [[train, "train"], [valid, "valid"]]) {
    if (!pts.length) continue;
    svg.append(svgEl("polyline", { points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "), class: `line ${cls}`, "data-points": pts.length }));
  }
}

// ---- Health ----------------------------------------------------------------------------------------------
async function renderHealth() {
  const ready = await fetch("/ready").then((r) => r.json().then((b) => ({ ok: r.ok, body: b }))).catch(() => ({ ok: false, body: { reason: "no answer" } }));
  $("#hl-ready").textContent = ready.ok ? "ready" : `not ready: ${ready.body.reason || ready.body.status}`;
  const s = await scrape();
  const alive = gauge(s, "peftserve_engine_alive");
  $("#hl-engine").textContent = alive === 1 ? "alive" : "stopped";
  $("#hl-engine").dataset.ok = String(alive === 1);
  const used = gauge(s, "peftserve_kv_blocks_used"), total = gauge(s, "peftserve_kv_blocks_total");
  $("#hl-kv").textContent = `${used} / ${total}`;
  $("#hl-kv").dataset.used = used;
  $("#hl-kv").dataset.total = total;
  $("#hl-kv-meter").value = total ? used / total : 0;
  $("#hl-queue").textContent = `${gauge(s, "peftserve_num_requests_waiting")} / ${gauge(s, "peftserve_num_requests_running")}`;
  $("#hl-slots").textContent = `${gauge(s, "peftserve_adapter_slots_in_use")} / ${gauge(s, "peftserve_adapter_slots_total")}`;
  // tokens/s between consecutive scrapes, over the last 2 minutes
  const h = state.metrics.filter((x) => x.t >= Date.now() - 120000);
  const rates = [];
  for (let i = 1; i < h.length; i++) {
    const dt = (h[i].t - h[i - 1].t) / 1000;
    const d = sum(h[i].samples, "peftserve_generation_tokens_total") - sum(h[i - 1].samples, "peftserve_generation_tokens_total");
    if (dt > 0) rates.push(Math.max(0, d / dt));
  }
  $("#hl-tps").textContent = rates.length ? rates[rates.length - 1].toFixed(1) : "…";
  const svg = $("#hl-spark");
  svg.replaceChildren();
  if (rates.length) {
    const max = Math.max(...rates, 1);
    const step = rates.length > 1 ? 200 / (rates.length - 1) : 0;
    svg.append(svgEl("polyline", { class: "line train", "data-points": rates.length,
      points: rates.map((r, i) => `${(i * step).toFixed(1)},${(38 - (36 * r) / max).toFixed(1)}`).join(" ") }));
  }
}

// ---- wiring ---------------------------------------------------------------------------------------------------
function init() {
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("#api-key");
    useKey(input.value.trim());
  });
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => { onDrop(ev).catch(showError); });
  $("#upload-files").addEventListener("change", (ev) => setUploadFiles([...ev.target.files]));
  $("#upload-btn").addEventListener("click", () => doUpload());
  $("#pg-form").addEventListener("submit", (ev) => { runPlayground(ev).catch(showError); });
  $("#pg-stop").addEventListener("click", () => { for (const c of state.running) c.abort(); });
  $("#pg-add").addEventListener("click", () => addColumn(state.baseModel));
  $("#pg-remove").addEventListener("click", () => { const p = document.querySelectorAll("#pg-models .pick"); if (p.length > 1) p[p.length - 1].remove(); });
  $("#as-form").addEventListener("submit", (ev) => { saveAssistant(ev); });
  $("#as-new").addEventListener("click", clearAssistantForm);
  $("#ft-upload").addEventListener("click", () => { uploadTrainingFile().catch(showError); });
  $("#ft-create").addEventListener("submit", (ev) => { createJob(ev); });
  window.addEventListener("hashchange", route);
  applyRole();
  useKey("").finally(route);
}

document.addEventListener("DOMContentLoaded", init);
