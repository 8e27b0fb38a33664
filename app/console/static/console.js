// The edgebatch operator's console. Reads: the JSON endpoints every client may GET. Changes: the same
// endpoints the CLI's HTTP side uses, with the API token the operator types (kept in sessionStorage,
// sent as "Authorization: Bearer", never shown). All data goes into the page as text (textContent).
"use strict";

const POLL_MS = 2000;
const REGISTRY_POLL_MS = 10000;
const PREVIEW_MS = 1000;
const HISTORY = 150;            // points per chart (5 minutes at 2 s)
const TOKEN_KEY = "edgebatch.apiToken";
const COLORS = ["#2f5bd3", "#d94f3d", "#13795b", "#b54708", "#7a3fd1"];

const state = { view: "nodes", history: new Map(), detectors: [], streams: [], registry: [], lastRegistry: 0 };

// -- DOM helpers (text only) -------------------------------------------------------------
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const $ = id => document.getElementById(id);
function kv(pairs) {
  const dl = el("dl", { class: "kv" });
  for (const [k, v] of pairs) {
    if (v === undefined) continue;
    dl.append(el("dt", { text: k }), el("dd", {}, v === null ? "-" : v));
  }
  return dl;
}
function badge(text, kind) { return el("span", { class: "badge" + (kind ? " " + kind : ""), text: text }); }
function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}
function counts(obj) {
  const parts = Object.entries(obj || {}).map(([k, v]) => "size " + k + " \u00d7" + v);
  return parts.length ? parts.join(", ") : "-";
}
function clock(at) { return at ? new Date(at * 1000).toLocaleTimeString() : "-"; }
function ms(s) { return s === null || s === undefined ? "-" : (s * 1000).toFixed(1) + " ms"; }

// -- history for the charts --------------------------------------------------------------
function record(key, t, v) {
  if (v === null || v === undefined || !isFinite(v)) return;
  let h = state.history.get(key);
  if (!h) { h = []; state.history.set(key, h); }
  if (h.length && h[h.length - 1][0] === t) return;
  h.push([t, v]);
  if (h.length > HISTORY) h.splice(0, h.length - HISTORY);
}
function points(key) { return state.history.get(key) || []; }
function chart(title, unit, keys, opts) {
  return lineChart(title, unit, keys.map((k, i) => ({ label: k[1], color: COLORS[i % COLORS.length], points: points(k[0]) })), opts);
}

// -- HTTP ------------------------------------------------------------------------------
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
async function call(method, path, body) {
  const headers = {};
  if (method !== "GET") {
    if (token()) headers["Authorization"] = "Bearer " + token();
    if (body !== undefined) headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  } catch (err) {
    return { ok: false, status: 0, error: "the server did not answer (" + err.message + ")" };
  }
  let data = null;
  const text = await response.text();
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!response.ok) {
    const detail = data && (data.error || (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)));
    return { ok: false, status: response.status, error: detail || text.slice(0, 300) || response.statusText, data };
  }
  return { ok: true, status: response.status, data };
}
function show(target, result, okText) {
  const node = $(target);
  if (result.ok) {
    node.className = "msg ok";
    node.textContent = okText;
  } else {
    node.className = "msg error";
    node.textContent = "refused (" + (result.status || "no answer") + "): " + result.error;
  }
}
const notes = {};
function note(view, text) {
  notes[view] = text || "";
  $("banner").textContent = Object.entries(notes).filter(e => e[1]).map(e => e[0] + ": " + e[1]).join("  |  ");
}

// -- token -------------------------------------------------------------------------------
function showTokenState() {
  $("token-state").textContent = token() ? "token set for this tab" : "no token (read only)";
}
function setupToken() {
  $("token-save").addEventListener("click", () => {
    const value = $("token-input").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
    $("token-input").value = "";
    showTokenState();
  });
  $("token-forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showTokenState(); });
  showTokenState();
}

// -- 1. nodes ----------------------------------------------------------------------------
async function pollNodes() {
  const r = await call("GET", "/ui/api/nodes");
  if (!r.ok) { note("nodes", r.error); return; }
  note("nodes", "");
  $("nodes-note").textContent = r.data.samples_note ? "collectors: " + r.data.samples_note : "";
  for (const n of r.data.nodes) {
    const s = n.sample;
    if (!s) continue;
    const t = s.timestamp || r.data.at;
    record("cpu:" + n.node_id, t, s.cpu_percent);
    if (s.ram_total_bytes) record("ram:" + n.node_id, t, 100 * s.ram_used_bytes / s.ram_total_bytes);
    for (const d of s.devices) {
      const id = n.node_id + ":" + d.kind + d.index;
      record("dutil:" + id, t, d.util_percent);
      if (d.mem_total_bytes) record("dmem:" + id, t, 100 * d.mem_used_bytes / d.mem_total_bytes);
    }
  }
  if (state.view === "nodes") renderNodes(r.data.nodes);
}
function renderNodes(nodes) {
  const cards = nodes.map(n => {
    const s = n.sample;
    const head = el("h3", {}, (n.hostname || "?") + " ", el("span", { class: "mono", text: n.address || "" }), " ",
      n.head ? badge("head") : null, badge(n.alive ? "alive" : "dead", n.alive ? "ok" : "bad"));
    const tags = el("div", {}, ...n.kinds.map(k => badge(k, "kind")));
    const res = Object.entries(n.resources).map(([k, v]) => k + " " + (k.includes("memory") ? bytes(v) : fmtNum(v))).join(", ");
    const facts = kv([["node", el("span", { class: "mono", text: n.node_id })], ["resources", res || "-"],
      ["CPU", s ? fmtNum(s.cpu_percent) + " %" : "no collector reading"],
      ["RAM", s ? bytes(s.ram_used_bytes) + " of " + bytes(s.ram_total_bytes) : "-"]]);
    const charts = el("div", { class: "charts" },
      chart("CPU", "%", [["cpu:" + n.node_id, "cpu"]], { min: 0, max: 100 }),
      chart("RAM used", "%", [["ram:" + n.node_id, "ram"]], { min: 0, max: 100 }));
    const devices = [];
    for (const d of (s ? s.devices : [])) {
      const id = n.node_id + ":" + d.kind + d.index;
      devices.push(el("div", { class: "decision" }, badge(d.kind), d.name + ": ",
        "util " + (d.util_percent === null ? "-" : fmtNum(d.util_percent) + " %") + ", memory " +
        (d.mem_total_bytes ? bytes(d.mem_used_bytes) + " of " + bytes(d.mem_total_bytes) : "-") + (d.note ? " (" + d.note + ")" : "")));
      if (d.kind !== "cpu") {
        charts.append(chart(d.kind + d.index + " utilisation", "%", [["dutil:" + id, "util"]], { min: 0, max: 100 }),
          chart(d.kind + d.index + " memory", "%", [["dmem:" + id, "mem"]], { min: 0, max: 100 }));
      }
    }
    const notesEl = s && s.notes.length ? el("p", { class: "note", text: s.notes.join("; ") }) : null;
    return el("div", { class: "card node", "data-node": n.node_id }, head, tags, facts, ...devices, notesEl, charts);
  });
  $("nodes-list").replaceChildren(...cards);
}

// -- 2. placements -----------------------------------------------------------------------
async function pollPlacements() {
  const r = await call("GET", "/ui/api/placements");
  if (!r.ok) { note("placements", r.error); return; }
  note("placements", "");
  $("placements-note").textContent = r.data.pending_note ? "pending reasons unavailable: " + r.data.pending_note : "";
  const rows = r.data.deployments.map(d => {
    const nodes = el("td", {}, ...d.replicas.map(rep => el("div", {},
      badge(rep.state || "?", rep.state === "RUNNING" ? "ok" : "warn"), " ", rep.node || rep.node_id || "not placed")));
    const res = Object.entries(d.resources).map(([k, v]) => k + " " + fmtNum(v)).join(", ");
    return el("tr", { "data-deployment": d.app + "/" + d.deployment },
      el("td", {}, el("strong", { text: d.app }), " / " + d.deployment),
      el("td", { text: d.model || "-" }), el("td", { text: d.backend || "-" }),
      el("td", {}, badge(d.status, ["HEALTHY", "RUNNING"].includes(d.status) ? "ok" : "warn")),
      el("td", { text: d.running_replicas + " / " + (d.target_replicas ?? "?") }),
      el("td", { text: d.engine_instances ?? "-" }), el("td", { text: res || "-" }), nodes,
      el("td", { class: "problem" }, ...d.problems.map(p => el("div", { text: p }))));
  });
  $("placements-table").tBodies[0].replaceChildren(...rows);
}

// -- 3. detectors ------------------------------------------------------------------------
async function pollDetectors() {
  const r = await call("GET", "/ui/api/detectors");
  if (!r.ok) { note("detectors", r.error); return; }
  note("detectors", "");
  $("detectors-note").textContent = !r.data.controller ? "the batch controller (edgebatch-controller) is not running: sizes and policies cannot change here"
    : (r.data.controller_error ? "controller: " + r.data.controller_error : "");
  state.detectors = r.data.detectors;
  for (const d of r.data.detectors) {
    if (d.error) continue;
    const w = d.window, t = r.data.at, k = d.app;
    record("thr:" + k, t, w.batches ? w.throughput : 0);
    record("dbatch:" + k, t, w.d_batch_s !== null ? w.d_batch_s * 1000 : null);
    record("crit:" + k, t, w.criterion_s !== null ? w.criterion_s * 1000 : null);
    record("queue:" + k, t, w.queue_len_mean);
    record("formed:" + k, t, w.mean_batch_size);
    record("size:" + k, t, d.max_batch_size);
  }
  fillBatchForm(r.data);
  if (state.view === "detectors") renderDetectors(r.data.detectors);
}
function setOptions(select, values, labels) {
  const keep = select.value;
  const current = Array.from(select.options).map(o => o.value).join("\n");
  if (current === values.join("\n")) return;
  select.replaceChildren(...values.map((v, i) => el("option", { value: v, text: labels ? labels[i] : v })));
  if (values.includes(keep)) select.value = keep;
}
function fillBatchForm(data) {
  const models = data.detectors.filter(d => !d.error).map(d => d.model);
  setOptions($("batch-model"), models);
  const chosen = data.detectors.find(d => d.model === $("batch-model").value);
  setOptions($("batch-size"), chosen ? chosen.batch_sizes.map(String) : []);
  setOptions($("policy-select"), data.policies);
}
function renderDetectors(detectors) {
  const cards = detectors.map(d => {
    if (d.error) return el("div", { class: "card" }, el("h3", { text: d.app }), el("p", { class: "msg error", text: d.error }));
    const follows = d.pinned_version ? "pinned version " + d.pinned_version : (d.alias ? "alias " + d.alias : "-");
    const variants = el("table", {}, el("thead", {}, el("tr", {}, ...["batch", "backend", "device", "memory", "instances", "load s", "sha256"].map(h => el("th", { text: h })))),
      el("tbody", {}, ...Object.entries(d.loaded_variants).map(([size, v]) => el("tr", {},
        el("td", { text: size }), el("td", { text: v.backend }), el("td", { text: v.device }), el("td", { text: bytes(v.memory_bytes) }),
        el("td", { text: v.instances }), el("td", { text: fmtNum(v.load_s) }), el("td", { class: "mono", text: v.sha256 })))));
    const last = d.last_decision;
    const decision = last ? el("div", { class: "decision" }, badge(last.action), " " + (last.from ?? "-") + " \u2192 " + last.batch_size + " ",
      el("span", { class: "mono", text: "[" + last.reason_code + "]" }), " " + last.reason + " (" + clock(last.at) + ", " + last.policy + ")")
      : el("div", { class: "decision", text: d.policy ? "no decision yet" : "no controller" });
    const w = d.window;
    const margin = w.margin_s === null ? "-" : ms(w.margin_s);
    const facts = kv([
      ["model", d.model + " v" + d.version + " (" + follows + ")"], ["backend", d.backend],
      ["batch size in force", d.max_batch_size + " of " + d.batch_sizes.join(", ")],
      ["engine instances", d.engine_instances], ["resident variants", d.resident_variants],
      ["policy", (d.policy || "-") + (d.pin ? " (pinned at " + d.pin.batch_size + " by " + d.pin.by + ")" : "")],
      ["last window", w.batches ? w.batches + " batches, " + fmtNum(w.throughput) + " items/s, d_batch " + ms(w.d_batch_s) +
        ", N/F " + ms(w.criterion_s) + " (margin " + margin + "), queue " + fmtNum(w.queue_len_mean) + " (max " + (w.queue_len_max ?? "-") + ")" : "idle"],
      ["batches formed", w.batches ? counts(w.batch_sizes) : "-"],
      ["since start", (d.counters.requests ?? 0) + " requests, " + (d.counters.errors ?? 0) + " errors, " + (d.counters.batches ?? 0) +
        " batches, " + (d.counters.items ?? 0) + " items"],
    ]);
    const problems = [];
    if (d.last_load_failure) problems.push("last load failure: batch " + d.last_load_failure.batch_size + ": " + d.last_load_failure.error);
    if (d.controller_failure) problems.push("controller could not apply batch " + d.controller_failure.batch_size + ": " + d.controller_failure.error);
    if (d.config_refused) problems.push("config refused: " + d.config_refused);
    const k = d.app;
    const charts = el("div", { class: "charts" },
      chart("throughput", "items/s", [["thr:" + k, "items/s"]]),
      chart("d_batch vs N/F", "ms", [["dbatch:" + k, "d_batch"], ["crit:" + k, "N/F"]]),
      chart("queue length", "items", [["queue:" + k, "mean queue"]]),
      chart("batch sizes", "", [["formed:" + k, "formed (mean)"], ["size:" + k, "in force"]]));
    return el("div", { class: "card detector", "data-model": d.model }, el("h3", {}, d.model + " ", badge("app " + d.app)),
      facts, decision, ...problems.map(p => el("p", { class: "msg error", text: p })), variants, charts);
  });
  $("detectors-list").replaceChildren(...cards);
}
function setupBatchActions() {
  $("batch-model").addEventListener("change", () => fillBatchForm({ detectors: state.detectors, policies: Array.from($("policy-select").options).map(o => o.value) }));
  const model = () => encodeURIComponent($("batch-model").value);
  $("batch-set").addEventListener("click", async () => {
    const n = Number($("batch-size").value);
    const r = await call("PUT", "/v1/batch/" + model() + "/size", { batch_size: n });
    show("batch-message", r, r.ok ? $("batch-model").value + ": batch size " + r.data.current_batch_size + " (pinned)" : "");
    pollDetectors();
  });
  $("batch-release").addEventListener("click", async () => {
    const r = await call("DELETE", "/v1/batch/" + model() + "/size");
    show("batch-message", r, r.ok ? $("batch-model").value + ": released; policy " + r.data.policy + " at batch size " + r.data.current_batch_size : "");
    pollDetectors();
  });
  $("policy-apply").addEventListener("click", async () => {
    const body = { policy: $("policy-select").value };
    const fps = $("policy-fps").value.trim();
    if (fps !== "") body.fps = Number(fps);
    const r = await call("PUT", "/v1/batch/" + model() + "/policy", body);
    show("batch-message", r, r.ok ? $("batch-model").value + ": policy " + r.data.policy + " at batch size " + r.data.current_batch_size : "");
    pollDetectors();
  });
}

// -- 4. streams --------------------------------------------------------------------------
async function pollStreams() {
  const r = await call("GET", "/v1/streams");
  if (!r.ok) { note("streams", r.error); return; }
  note("streams", "");
  state.streams = r.data.streams;
  renderStreams(r.data.streams);
}
function criterion(s) {
  if (s.realtime_margin_s === null || s.realtime_margin_s === undefined) return badge("no reading yet");
  return s.realtime_margin_s >= 0 ? badge("met, margin " + ms(s.realtime_margin_s), "ok") : badge("missed by " + ms(-s.realtime_margin_s), "bad");
}
function renderStreams(streams) {
  const rows = streams.map(s => {
    const target = s.options ? s.options.fps : null;
    const remove = el("button", { type: "button", class: "stream-remove", "data-stream": s.id, text: "Remove", onclick: () => removeStream(s.id) });
    return el("tr", { "data-stream": s.id }, el("td", { class: "mono", text: s.id }),
      el("td", {}, badge(s.state, s.state === "running" ? "ok" : (s.state === "failed" ? "bad" : "warn")), s.reason ? " " + s.reason : ""),
      el("td", { class: "mono", text: s.source }),
      el("td", { text: fmtNum(target) + (s.effective_fps && s.effective_fps !== target ? " (paced " + fmtNum(s.effective_fps) + ")" : "") }),
      el("td", { text: fmtNum(s.fps_out) }), el("td", { text: s.drops ?? 0 }), el("td", { text: fmtNum(s.lag_s) }),
      el("td", { class: "criterion" }, criterion(s)), el("td", {}, remove));
  });
  $("streams-table").tBodies[0].replaceChildren(...rows);
  const box = $("streams-previews");
  const ids = streams.map(s => s.id);
  for (const node of Array.from(box.children)) if (!ids.includes(node.dataset.stream)) node.remove();
  for (const s of streams) {
    if (!box.querySelector('[data-stream="' + CSS.escape(s.id) + '"]')) {
      const img = el("img", { alt: "latest annotated frame of stream " + s.id });
      box.append(el("div", { class: "preview", "data-stream": s.id }, img, el("div", { class: "caption", text: s.id + ": " + s.source })));
    }
  }
}
function refreshPreviews() {
  if (state.view !== "streams") return;
  for (const node of Array.from($("streams-previews").children)) {
    const img = node.querySelector("img");
    if (img.dataset.loading === "1") continue;
    img.dataset.loading = "1";
    fetch("/v1/streams/" + encodeURIComponent(node.dataset.stream) + "/preview.jpg", { cache: "no-store" })
      .then(r => r.ok ? r.blob() : null)
      .then(blob => {
        if (blob) {
          const old = img.src;
          img.src = URL.createObjectURL(blob);
          if (old.startsWith("blob:")) URL.revokeObjectURL(old);
        }
      })
      .catch(() => {})
      .finally(() => { img.dataset.loading = "0"; });
  }
}
async function removeStream(id) {
  const r = await call("DELETE", "/v1/streams/" + encodeURIComponent(id));
  show("stream-message", r, r.ok ? "stream " + id + " removed" : "");
  pollStreams();
}
function setupStreamActions() {
  $("stream-add").addEventListener("click", async () => {
    const body = { source: $("stream-source").value.trim(), fps: Number($("stream-fps").value), loop: $("stream-loop").checked };
    const id = $("stream-id").value.trim();
    if (id) body.id = id;
    const r = await call("POST", "/v1/streams", body);
    show("stream-message", r, r.ok ? "stream " + r.data.id + " started: " + r.data.source : "");
    pollStreams();
  });
}

// -- 5. registry -------------------------------------------------------------------------
async function pollRegistry() {
  const r = await call("GET", "/v1/registry");
  state.lastRegistry = Date.now();
  if (!r.ok) { note("registry", r.error); return; }
  note("registry", "");
  state.registry = r.data.models;
  setOptions($("promote-model"), r.data.models.map(m => m.name));
  const cards = r.data.models.map(m => {
    const aliases = Object.entries(m.aliases).map(([a, v]) => a + " \u2192 v" + v).join(", ") || "none";
    const versions = m.versions.map(v => el("div", { class: "version", "data-version": v.version },
      el("h3", {}, "version " + v.version + " ", ...v.aliases.map(a => badge("@" + a, "ok")), v.in_use.length ? badge("in use: " + v.in_use.join(", ")) : null),
      el("div", { class: "note", text: "created " + v.created + (v.description ? " \u2014 " + v.description : "") }),
      el("table", {}, el("thead", {}, el("tr", {}, ...["backend", "batch", "input", "precision", "size", "sha256"].map(h => el("th", { text: h })))),
        el("tbody", {}, ...v.variants.map(x => el("tr", {}, el("td", { text: x.backend }), el("td", { text: x.batch_size }),
          el("td", { text: x.input_shape.join("\u00d7") }), el("td", { text: x.precision }), el("td", { text: bytes(x.size_bytes) }),
          el("td", { class: "mono", text: x.sha256 })))))));
    return el("div", { class: "card model", "data-model": m.name }, el("h3", {}, m.name + " ", badge("aliases: " + aliases)), ...versions);
  });
  $("registry-list").replaceChildren(...cards);
}
function setupPromote() {
  $("promote-apply").addEventListener("click", async () => {
    const name = $("promote-model").value, alias = $("promote-alias").value.trim();
    const r = await call("PUT", "/v1/registry/" + encodeURIComponent(name) + "/aliases/" + encodeURIComponent(alias),
      { version: $("promote-version").value.trim() });
    show("promote-message", r, r.ok ? r.data.model + "@" + r.data.alias + " \u2192 version " + r.data.version : "");
    pollRegistry();
  });
}

// -- the loop ----------------------------------------------------------------------------
function setupTabs() {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => {
      state.view = button.dataset.view;
      for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b === button);
      for (const v of document.querySelectorAll(".view")) v.classList.toggle("active", v.id === "view-" + state.view);
      tick();
      refreshPreviews();
    });
  }
}
let ticking = false;
async function tick() {
  if (ticking) return;
  ticking = true;
  try {
    const reads = [pollNodes(), pollDetectors()];  // always: their charts keep history
    if (state.view === "placements") reads.push(pollPlacements());
    if (state.view === "streams") reads.push(pollStreams());
    if (state.view === "registry" && Date.now() - state.lastRegistry > REGISTRY_POLL_MS) reads.push(pollRegistry());
    await Promise.all(reads);
    document.body.dataset.updated = String(Date.now());
  } finally {
    ticking = false;
  }
}
document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  setupTabs();
  setupBatchActions();
  setupStreamActions();
  setupPromote();
  pollStreams();
  pollRegistry();
  tick();
  setInterval(tick, POLL_MS);
  setInterval(refreshPreviews, PREVIEW_MS);
});
