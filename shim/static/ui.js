// llmux operator page: polls /ui/api/state once a second, follows one engine log through
// server-sent events (read with fetch, so that the admin key can go in a header), and
// calls the control API for its buttons. No library, no build step; text is always set
// with textContent, never parsed as HTML (log lines and names come from elsewhere).
"use strict";

const POLL_MS = 1000;
const CHECKPOINTS_MS = 10000;
const LOG_LINES = 2000;
const SHIM_LINES = 500;
const KEY_STORE = "llmux.adminKey";
const LOG_MODEL_STORE = "llmux.logModel";
const STRATEGIES = ["offload+keep_running", "discard+keep_running", "retain+keep_running",
  "retain+cuda_suspend", "retain+checkpoint", "offload+cuda_suspend", "retain+stop"];

const $ = (id) => document.getElementById(id);
const errors = new Map(); // source -> message shown in the banner
let seq = 0;
let lastStatus = null;
let lastCameBack = {};
let logAbort = null;
let logModel = null;
const busy = new Set(); // models with an action running

function adminKey() {
  try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = adminKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setError(source, message) {
  if (message) errors.set(source, message); else errors.delete(source);
  const banner = $("banner");
  banner.textContent = Array.from(errors.values()).join("\n");
  banner.hidden = errors.size === 0;
}

function notice(message) {
  const n = $("notice");
  n.textContent = message || "";
  n.hidden = !message;
}

// what an error answer says, with a plain word for the access errors
async function describe(resp) {
  let detail = "";
  try {
    const body = await resp.json();
    detail = (body && body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    detail = resp.statusText;
  }
  if (resp.status === 401) {
    return "401 Unauthorized: the control API needs the admin key; type it above" +
      (detail ? " (" + detail + ")" : "");
  }
  if (resp.status === 403) {
    return "403 Forbidden: this key is not an admin key" + (detail ? " (" + detail + ")" : "");
  }
  return resp.status + " " + (detail || resp.statusText);
}

async function api(path, init) {
  const opts = Object.assign({ cache: "no-store" }, init || {});
  opts.headers = headers(opts.headers);
  return fetch(path, opts);
}

// ------------------------------------------------------------------ formatting

function dash(v) { return v === undefined || v === null || v === "" ? "—" : String(v); }

function secs(v) {
  if (v === undefined || v === null) return "—";
  const n = Number(v);
  if (!isFinite(n)) return "—";
  if (n < 10) return n.toFixed(2) + " s";
  if (n < 120) return n.toFixed(1) + " s";
  if (n < 7200) return Math.floor(n / 60) + " min " + Math.round(n % 60) + " s";
  return (n / 3600).toFixed(1) + " h";
}

function mb(v) {
  if (v === undefined || v === null) return "—";
  const n = Number(v);
  return n >= 10240 ? (n / 1024).toFixed(1) + " GB" : Math.round(n) + " MB";
}

function bytes(n) {
  if (n === undefined || n === null) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let x = Number(n);
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return (i ? x.toFixed(1) : String(x)) + " " + units[i];
}

function clock(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
}

function when(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleString([], { hour12: false });
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

// ------------------------------------------------------------------ models table

function modelRow(name) {
  const tr = el("tr");
  tr.dataset.model = name;
  const cells = ["name", "state", "eviction", "came-back", "pids", "memory", "load", "pinned",
    "priority", "ttl", "idle"];
  for (const c of cells) {
    const td = el("td", null, c);
    tr.appendChild(td);
  }
  const act = el("td", null, "actions-cell");
  const box = el("div", null, "actions");
  const sel = el("select");
  sel.className = "strategy";
  sel.setAttribute("aria-label", "sleep strategy for " + name);
  box.appendChild(sel);
  const sleep = el("button", "sleep", "sleep");
  sleep.type = "button";
  sleep.addEventListener("click", () => {
    const body = { model: name };
    if (sel.value) body.strategy = sel.value;
    control(name, "sleep", body);
  });
  const wake = el("button", "wake", "wake");
  wake.type = "button";
  wake.addEventListener("click", () => control(name, "wake", { model: name }));
  const stop = el("button", "stop", "stop");
  stop.type = "button";
  stop.addEventListener("click", () =>
    control(name, "sleep", { model: name, strategy: "retain+stop" }));
  box.append(sleep, wake, stop);
  act.appendChild(box);
  tr.appendChild(act);
  return tr;
}

function fillStrategies(sel, eviction) {
  const want = ["", ...STRATEGIES.filter((s) => s !== eviction)];
  if (sel.dataset.eviction === String(eviction)) return;
  const keep = sel.value;
  sel.textContent = "";
  for (const s of want) {
    const o = el("option", s === "" ? "as configured" : s);
    if (s === "") o.title = "as configured: " + dash(eviction);
    o.value = s;
    sel.appendChild(o);
  }
  sel.dataset.eviction = String(eviction);
  if (want.includes(keep)) sel.value = keep;
}

function renderModels(status, cameBack) {
  const tbody = $("models").querySelector("tbody");
  const models = status.models || {};
  const seen = new Set();
  const budget = status.memory_budget_mb;
  for (const [name, m] of Object.entries(models)) {
    seen.add(name);
    let tr = tbody.querySelector('tr[data-model="' + CSS.escape(name) + '"]');
    if (!tr) { tr = modelRow(name); tbody.appendChild(tr); }
    const cell = (c) => tr.querySelector("td." + c);
    const nameCell = cell("name");
    nameCell.textContent = name;
    if (m.active) nameCell.appendChild(el("span", "●", "active-mark")).title = "active";
    const st = cell("state");
    st.textContent = "";
    st.appendChild(el("span", dash(m.state), "badge state-" + m.state));
    if (m.last_error) st.title = m.last_error; else st.removeAttribute("title");
    tr.dataset.state = m.state || "";
    // the policy of the eviction that put it where it is, when not its configured one
    cell("eviction").textContent = dash(m.evicted_with && m.state !== "running" &&
      m.evicted_with !== m.eviction ? m.eviction + " (now " + m.evicted_with + ")" : m.eviction);
    const cb = cameBack[name];
    const how = m.last_wake || (cb && cb.how);
    cell("came-back").textContent = how
      ? how + (cb && cb.secs !== undefined ? " " + secs(cb.secs) : "") : "—";
    const pids = m.pids || [];
    // several GPUs: the ones its engine is on (or was last given) lead the cell
    const gpu = m.gpus && m.gpus.length ? "GPU " + m.gpus.join(",") + " · " : "";
    cell("pids").textContent = gpu + (pids.length
      ? pids.slice(0, 4).join(" ") + (pids.length > 4 ? " +" + (pids.length - 4) : "") : "—");
    cell("pids").title = pids.join(" ");
    let mem = mb(m.memory_mb);
    if (m.memory_source) mem += " (" + m.memory_source + ")";
    if (budget) mem += " / " + mb(budget);
    cell("memory").textContent = mem;
    cell("load").textContent = dash(m.in_flight) + " / " + dash(m.queued);
    cell("pinned").textContent = m.pinned === undefined || m.pinned === null ? "—"
      : (m.pinned ? "yes" : "no");
    cell("priority").textContent = dash(m.priority);
    cell("ttl").textContent = m.ttl_secs === undefined || m.ttl_secs === null ? "—"
      : (Number(m.ttl_secs) === 0 ? "never" : secs(m.ttl_secs));
    cell("idle").textContent = secs(m.idle_secs);
    fillStrategies(tr.querySelector("select.strategy"), m.eviction);
    for (const b of tr.querySelectorAll("button")) b.disabled = busy.has(name);
  }
  for (const tr of Array.from(tbody.children)) {
    if (!seen.has(tr.dataset.model)) tr.remove();
  }
}

function renderSummary(status) {
  $("active").textContent = (status.active_models && status.active_models.length)
    ? status.active_models.join(", ") : dash(status.active);
  $("queue-depth").textContent = dash(status.queue_depth);
  $("switching").hidden = !status.switching;
  const used = status.memory_used_mb;
  const budget = status.memory_budget_mb;
  const meter = $("memory-meter");
  // several GPUs: the budget is each GPU's, shown on the line of the GPUs
  const gpus = status.gpus || [];
  if (used === undefined || used === null) {
    $("memory").textContent = "—";
    meter.hidden = true;
  } else if (gpus.length) {
    $("memory").textContent = mb(used) + (budget ? " (budget " + mb(budget) + " per GPU)" : "");
    meter.hidden = true;
  } else {
    $("memory").textContent = mb(used) + (budget ? " / " + mb(budget) : " (no budget)");
    meter.hidden = !budget;
    if (budget) { meter.max = budget; meter.value = Math.min(used, budget); }
  }
  $("gpus-line").hidden = gpus.length === 0;
  $("gpus").textContent = gpus.map((g) => g.index + ": " + (g.models.length
    ? g.models.join("+") : "free") + " " + mb(g.memory_used_mb) +
    (g.memory_budget_mb ? " / " + mb(g.memory_budget_mb) : "")).join(" · ");
}

function renderSwitches(switches) {
  const tbody = $("switches").querySelector("tbody");
  tbody.textContent = "";
  for (const s of switches.slice().reverse().slice(0, 20)) {
    const tr = el("tr", null, s.ok ? "" : "bad");
    tr.dataset.to = s.to;
    tr.append(el("td", clock(s.at)), el("td", dash(s.from) + " → " + s.to),
      el("td", dash(s.strategy)), el("td", s.sleep_secs == null ? "—" : secs(s.sleep_secs), "num"),
      el("td", s.ok ? dash(s.wake) : "failed"),
      el("td", s.wake_secs == null ? "—" : secs(s.wake_secs), "num"),
      el("td", dash(s.waiting), "num"), el("td", secs(s.seconds), "num"));
    tbody.appendChild(tr);
  }
  $("switches-empty").hidden = switches.length > 0;
}

function appendLines(pre, lines, cap, cls) {
  if (!lines.length) return;
  const stick = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
  const frag = document.createDocumentFragment();
  for (const line of lines) frag.appendChild(el("span", line + "\n", cls));
  pre.appendChild(frag);
  while (pre.childNodes.length > cap) pre.removeChild(pre.firstChild);
  if (stick) pre.scrollTop = pre.scrollHeight;
}

function renderLogChoices(models) {
  const sel = $("log-model");
  const names = Object.keys(models);
  if (sel.dataset.names !== names.join("\n")) {
    sel.textContent = "";
    for (const n of names) { const o = el("option", n); o.value = n; sel.appendChild(o); }
    sel.dataset.names = names.join("\n");
  }
  if (logModel === null && names.length) {
    let want = null;
    try { want = sessionStorage.getItem(LOG_MODEL_STORE); } catch (_) { /* none */ }
    if (!names.includes(want)) want = (lastStatus && lastStatus.active) || names[0];
    sel.value = want;
    followLog(want);
  }
}

// ------------------------------------------------------------------ polling

async function poll() {
  if (document.hidden) { // a tab in the background costs the shim nothing
    setTimeout(poll, POLL_MS);
    return;
  }
  try {
    const resp = await api("/ui/api/state?since=" + seq);
    if (!resp.ok) {
      setError("poll", "status: " + await describe(resp));
    } else {
      const body = await resp.json();
      lastStatus = body.status;
      lastCameBack = body.came_back || {};
      renderSummary(body.status);
      renderModels(body.status, body.came_back || {});
      renderSwitches(body.switches || []);
      if (body.seq < seq) $("shim-log").textContent = ""; // the shim restarted
      appendLines($("shim-log"), (body.log || []).map((l) => l.text), SHIM_LINES);
      seq = body.seq;
      renderLogChoices(body.status.models || {});
      setError("poll", null);
    }
  } catch (e) {
    setError("poll", "cannot reach the shim: " + e.message);
  }
  setTimeout(poll, POLL_MS);
}

async function pollCheckpoints() {
  try {
    const resp = await api("/ui/api/checkpoints");
    if (!resp.ok) {
      $("checkpoints-reason").textContent = "checkpoints: " + await describe(resp);
    } else {
      renderCheckpoints(await resp.json());
    }
  } catch (e) {
    $("checkpoints-reason").textContent = "cannot reach the shim: " + e.message;
  }
  setTimeout(pollCheckpoints, CHECKPOINTS_MS);
}

function renderCheckpoints(body) {
  const host = body.host;
  $("host").textContent = host
    ? "llmuxd " + dash(host.version) + " on the " + host.bus + " bus: CRIU " +
      dash(host.criu_version) + ", kernel " + dash(host.kernel_release) + ", driver " +
      (host.driver_version || "none") + ", " + bytes(host.free_bytes) + " free"
    : "";
  const tbody = $("checkpoints").querySelector("tbody");
  tbody.textContent = "";
  for (const c of body.checkpoints || []) {
    const tr = el("tr");
    tr.dataset.model = c.model;
    const ok = el("td", c.restorable ? "yes" : "no: " + c.why_not, c.restorable ? "ok" : "bad");
    tr.append(el("td", c.model), el("td", bytes(c.size_bytes), "num"), el("td", when(c.created)),
      el("td", dash(c.criu_version)), el("td", dash(c.kernel_release)),
      el("td", c.cuda ? dash(c.driver_version) : "no CUDA"), ok);
    tbody.appendChild(tr);
  }
  $("checkpoints").hidden = !(body.checkpoints || []).length;
  $("checkpoints-reason").textContent = body.reason || "";
  $("checkpoints-reason").hidden = !body.reason;
}

// ------------------------------------------------------------------ actions

async function control(model, action, body) {
  busy.add(model);
  if (lastStatus) renderModels(lastStatus, lastCameBack);
  notice(model + ": " + action + (body.strategy ? " (" + body.strategy + ")" : "") + "…");
  try {
    const resp = await api("/control/" + action, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!resp.ok) {
      notice("");
      setError("action", model + ": " + action + " refused: " + await describe(resp));
    } else {
      const out = await resp.json();
      setError("action", null);
      notice(model + ": " + action + " done" + (out.changed === false ? " (nothing to do)" : "") +
        ", now " + dash(out.state) + " (" + secs(out.seconds) + ")");
    }
  } catch (e) {
    notice("");
    setError("action", model + ": " + action + " failed: " + e.message);
  } finally {
    busy.delete(model);
  }
}

// ------------------------------------------------------------------ log stream

function followLog(model) {
  if (logAbort) logAbort.abort();
  logModel = model;
  try { sessionStorage.setItem(LOG_MODEL_STORE, model); } catch (_) { /* none */ }
  $("engine-log").textContent = "";
  $("engine-log-title").textContent = "engine: " + model;
  const ctl = new AbortController();
  logAbort = ctl;
  streamLog(model, ctl);
}

async function streamLog(model, ctl) {
  while (!ctl.signal.aborted) {
    try {
      const resp = await api("/ui/api/logs/" + encodeURIComponent(model), { signal: ctl.signal });
      if (!resp.ok) {
        $("log-state").textContent = "log: " + await describe(resp);
      } else {
        $("log-state").textContent = "following";
        setError("logs", null);
        await readEvents(resp, ctl, (event, data) => onLogEvent(event, data));
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
      $("log-state").textContent = "log stream lost, reconnecting";
    }
    if (ctl.signal.aborted) return;
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function onLogEvent(event, data) {
  const pre = $("engine-log");
  if (event === "open") {
    $("log-state").textContent = "following " + data.path;
    return;
  }
  if (event !== "lines") return;
  if (data.reset) appendLines(pre, ["--- the log file was replaced or truncated"], LOG_LINES, "skip");
  if (data.missing) appendLines(pre, ["--- no log yet (the engine has not started)"], LOG_LINES, "skip");
  if (data.skipped_bytes) {
    appendLines(pre, ["--- " + bytes(data.skipped_bytes) + " skipped (written faster than shown)"],
      LOG_LINES, "skip");
  }
  appendLines(pre, data.lines, LOG_LINES);
}

// server-sent events from a fetch body: "event:" and "data:" lines, blocks split by a blank line
async function readEvents(resp, ctl, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  ctl.signal.addEventListener("abort", () => reader.cancel().catch(() => {}));
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      let parsed;
      try { parsed = JSON.parse(data.join("\n")); } catch (_) { continue; }
      onEvent(event, parsed);
    }
  }
}

// ------------------------------------------------------------------ start

function start() {
  const keyInput = $("admin-key");
  keyInput.value = adminKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try { sessionStorage.setItem(KEY_STORE, keyInput.value.trim()); } catch (_) { /* none */ }
    setError("action", null);
    notice(keyInput.value.trim() ? "admin key set for this tab" : "admin key cleared");
    if (logModel) followLog(logModel);
  });
  $("key-forget").addEventListener("click", () => {
    try { sessionStorage.removeItem(KEY_STORE); } catch (_) { /* none */ }
    keyInput.value = "";
    notice("admin key forgotten");
  });
  $("log-model").addEventListener("change", (ev) => followLog(ev.target.value));
  poll();
  pollCheckpoints();
}

document.addEventListener("DOMContentLoaded", start);
