// The xcore admin page. No build step, no dependencies, no inline code (the page's
// Content-Security-Policy forbids it). Everything from the server is inserted as text
// (text nodes, textContent): plugin names, errors, log lines and event data never
// become markup.
"use strict";

const state = {
  session: null,
  view: null,
  timers: [],
  poll: null,
  streams: [],
  selectedPlugin: null,
  selectedTask: null,
  selectedEvent: null,
  eventFilters: { type: "", stream: "", plugin: "" },
  logFilters: { plugin: "", level: "", q: "" },
};

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// -- small DOM helpers ---------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function setStatus(text, isError) {
  const node = document.getElementById("status");
  node.textContent = text || "";
  node.className = isError ? "status error" : "status";
}

function fmtTime(value) {
  if (value === null || value === undefined || value === "") return "—";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function fmtClock(value) {
  const full = fmtTime(value);
  return full.length > 11 ? full.slice(11) : full;
}

function fmtMs(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return value < 10 ? value.toFixed(2) + " ms" : Math.round(value) + " ms";
}

function table(caption, headers, rows) {
  return el(
    "table",
    {},
    el("caption", {}, caption),
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", class: h.cls }, h.label || h)))),
    el("tbody", {}, rows),
  );
}

function fields(pairs) {
  return el("dl", { class: "fields" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function sparkline(values, label) {
  const clean = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  const width = 120;
  const height = 24;
  const svg = svgEl("svg", { class: "spark", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
  if (clean.length < 2) return svg;
  const max = Math.max(...clean) || 1;
  const min = Math.min(...clean);
  const span = max - min || 1;
  const points = clean.map((v, i) => {
    const x = (i / (clean.length - 1)) * (width - 2) + 1;
    const y = height - 1 - ((v - min) / span) * (height - 2);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  svg.append(svgEl("polyline", { points: points.join(" ") }));
  return svg;
}

function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    document.getElementById("confirm-cancel").focus();
  });
}

// -- the API ---------------------------------------------------------------------------

async function api(path, options) {
  const opts = options || {};
  const method = opts.method || "GET";
  const headers = { accept: "application/json" };
  let body;
  if (method !== "GET") headers["x-csrf-token"] = state.session ? state.session.csrf : "";
  if (opts.form) body = opts.form;
  else if (opts.json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(opts.json);
  }
  const response = await fetch("api/" + path, { method, headers, body, credentials: "same-origin" });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (response.status === 401) {
    showLogin("Your session ended: log in again.");
    throw new ApiError(401, "not logged in");
  }
  if (!response.ok) throw new ApiError(response.status, describeError(data, response.status));
  return data;
}

function describeError(data, status) {
  if (data && typeof data.detail === "string") return data.detail;
  if (data && Array.isArray(data.detail)) {
    return data.detail.map((d) => (d.loc ? d.loc.join(".") + ": " : "") + (d.msg || JSON.stringify(d))).join("; ");
  }
  if (data && data.error) return typeof data.error === "string" ? data.error : JSON.stringify(data.error);
  if (data && data.data && data.data.error) return String(data.data.error);
  return "HTTP " + status;
}

async function act(label, fn) {
  setStatus(label + "…");
  try {
    const result = await fn();
    const outcome = result && result.type ? ` (${result.type})` : "";
    // 202: the loader accepted it behind other requests; it runs in turn
    const pending = result && (result.status === "queued" || result.status === "running");
    setStatus(label + (pending ? `: accepted, position ${result.queue_position} (runs in turn)` : ": done" + outcome));
    return result;
  } catch (err) {
    setStatus(label + " failed: " + err.message, true);
    return null;
  } finally {
    refreshSoon();
  }
}

// Server-Sent Events read with fetch: the admin streams name each frame after its event
// type, which EventSource can only catch by listing every type in advance. This reads
// every frame, resumes from the last id after a cut, and stops with the view.
function followStream(path, onFrame, onUnavailable) {
  const controller = new AbortController();
  let lastId = null;
  let stopped = false;
  state.streams.push({ close: () => { stopped = true; controller.abort(); } });
  const run = async () => {
    while (!stopped) {
      let response;
      try {
        const headers = { accept: "text/event-stream" };
        if (lastId !== null) headers["last-event-id"] = lastId;
        response = await fetch("api/" + path, { headers, credentials: "same-origin", signal: controller.signal });
      } catch (_) {
        if (stopped) return;
        await new Promise((r) => setTimeout(r, 2000));
        continue;
      }
      if (response.status === 401) {
        showLogin("Your session ended: log in again.");
        return;
      }
      if (!response.ok || !response.body) {
        onUnavailable(response.status);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const frame = { id: null, event: "message", data: [] };
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue;
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "id") frame.id = text;
              else if (field === "event") frame.event = text;
              else if (field === "data") frame.data.push(text);
            }
            if (frame.id !== null) lastId = frame.id;
            if (frame.data.length) onFrame(frame.event, frame.data.join("\n"));
          }
        }
      } catch (_) {
        if (stopped) return;
      }
      if (!stopped) await new Promise((r) => setTimeout(r, 1000));
    }
  };
  run();
}

// -- session ---------------------------------------------------------------------------

async function loadSession() {
  const response = await fetch("session", { credentials: "same-origin", headers: { accept: "application/json" } });
  const data = await response.json();
  return data && data.logged_in ? data : null;
}

function showLogin(message) {
  stopAll();
  state.session = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  clear(document.getElementById("view"));
  document.getElementById("login-view").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login-token").focus();
}

function showApp(session) {
  state.session = session;
  document.getElementById("login-view").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  document.body.classList.toggle("read-only", !session.can_write);
  document.getElementById("who-scope").textContent = session.can_write ? "read and write" : "read only";
  route();
}

async function login(event) {
  event.preventDefault();
  const input = document.getElementById("login-token");
  const error = document.getElementById("login-error");
  error.textContent = "";
  const response = await fetch("login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ token: input.value }),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  input.value = "";
  if (!response.ok) {
    error.textContent = describeError(data, response.status);
    input.focus();
    return;
  }
  showApp(data);
}

async function logout() {
  await fetch("logout", {
    method: "POST",
    credentials: "same-origin",
    headers: { "x-csrf-token": state.session ? state.session.csrf : "" },
  });
  showLogin("Logged out.");
}

// -- views -------------------------------------------------------------------------------

const VIEWS = {
  plugins: { title: "Plugins", render: renderPlugins, refresh: true },
  tasks: { title: "Tasks", render: renderTasks, refresh: true },
  events: { title: "Events", render: renderEvents },
  logs: { title: "Logs", render: renderLogs },
  alerts: { title: "Alerts", render: renderAlerts, refresh: true },
  health: { title: "Health", render: renderHealth, refresh: true },
  nodes: { title: "Nodes", render: renderNodes, refresh: true },
};

function stopAll() {
  clearTimeout(state.poll);
  state.poll = null;
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  for (const s of state.streams) s.close();
  state.streams = [];
}

function route() {
  if (!state.session) return;
  const name = (location.hash || "#plugins").slice(1);
  const view = VIEWS[name] ? name : "plugins";
  stopAll();
  state.view = view;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${VIEWS[view].title} · xcore admin`;
  const root = clear(document.getElementById("view"));
  root.append(el("h2", { id: "view-title" }, VIEWS[view].title));
  const body = el("div", { id: "view-body" });
  root.append(body);
  VIEWS[view].render(body);
  if (VIEWS[view].refresh) {
    state.timers.push(setInterval(() => refreshView(), state.session.refresh_ms || 2000));
  }
}

let refreshing = false;
async function refreshView() {
  if (refreshing || !state.session || !VIEWS[state.view].refresh) return;
  refreshing = true;
  try {
    const body = document.getElementById("view-body");
    if (body) await VIEWS[state.view].render(body, true);
  } finally {
    refreshing = false;
  }
}

function refreshSoon() {
  setTimeout(() => refreshView(), 150);
}

function writeButton(label, handler, attrs) {
  if (!state.session || !state.session.can_write) return null;
  return el("button", { type: "button", onclick: handler, ...(attrs || {}) }, label);
}

async function replaceBody(body, build) {
  try {
    const content = await build();
    const focused = document.activeElement && document.activeElement.id;
    append(clear(body), [content]);
    if (focused) {
      const again = document.getElementById(focused);
      if (again) again.focus();
    }
  } catch (err) {
    if (err.status === 401) return;
    if (err.status === 404) {
      clear(body).append(el("p", { class: "muted" }, "Not available on this server: " + err.message));
      return;
    }
    setStatus(err.message, true);
  }
}

// Plugins -----------------------------------------------------------------------------

function renderPlugins(body) {
  return replaceBody(body, async () => {
    const plugins = await api("plugins");
    const list = Array.isArray(plugins) ? plugins : plugins.plugins || [];
    const rows = list.map((p) =>
      el(
        "tr",
        { class: p.name === state.selectedPlugin ? "selected" : null, "data-plugin": p.name },
        el("td", {}, el("button", { type: "button", class: "link", id: `plugin-${p.name}`, onclick: () => selectPlugin(p.name) }, p.name)),
        el("td", { class: p.status === "loaded" ? "ok" : p.status === "failed" ? "bad" : "warn", "data-field": "status" }, p.status),
        el("td", {}, p.version || "—"),
        el("td", {}, p.mode || "trusted"),
        el("td", { class: "num", "data-field": "generation" }, p.generation ?? "—"),
        el("td", { class: "num" }, (p.routes || []).length),
        el("td", {}, p.enabled === false ? "disabled" : "enabled"),
        el("td", {}, p.last_error ? errorSummary(p.last_error) : "—"),
      ),
    );
    const parts = [
      table("Installed plugins", ["Name", "Status", "Version", "Mode", { label: "Generation", cls: "num" }, { label: "Routes", cls: "num" }, "Enabled", "Last error"], rows),
    ];
    const selected = list.find((p) => p.name === state.selectedPlugin);
    if (selected) parts.push(await pluginDetail(selected));
    if (state.session.can_write) parts.push(installForm());
    return parts;
  });
}

function errorSummary(error) {
  if (typeof error === "string") return error.split("\n")[0];
  const where = error.file ? ` (${error.file}${error.line ? ":" + error.line : ""})` : "";
  return `${error.stage ? error.stage + ": " : ""}${String(error.error || error.message || "").split("\n")[0]}${where}`;
}

function lastError(error) {
  if (typeof error === "string") return el("pre", { id: "plugin-last-error" }, error);
  const where = error.file ? `${error.file}${error.line ? ", line " + error.line : ""}` : null;
  return [
    fields([
      ["Stage", error.stage || "—"],
      ["Where", where || "—"],
      ["At", fmtTime(error.at)],
    ]),
    el("pre", { id: "plugin-last-error" }, String(error.error || error.message || JSON.stringify(error))),
  ];
}

function selectPlugin(name) {
  state.selectedPlugin = name;
  refreshSoon();
}

async function pluginDetail(p) {
  const history = await api(`events?stream=${encodeURIComponent("plugin-" + p.name)}&limit=200`).catch(() => ({ events: [] }));
  const lifecycle = (history.events || [])
    .filter((e) => /^Plugin(Loaded|Reloaded|ReloadFailed|LoadFailed|Unloaded|Enabled|Disabled|Installed)$/.test(e.type))
    .slice(-20)
    .reverse();
  const actions = el(
    "div",
    { class: "actions" },
    writeButton("Reload", () => act(`Reload ${p.name}`, () => api(`plugins/${encodeURIComponent(p.name)}/reload`, { method: "POST" })), { id: "action-reload" }),
    p.enabled === false
      ? writeButton("Enable", () => act(`Enable ${p.name}`, () => api(`plugins/${encodeURIComponent(p.name)}/enable`, { method: "POST" })), { id: "action-enable" })
      : writeButton("Disable", () => act(`Disable ${p.name}`, () => api(`plugins/${encodeURIComponent(p.name)}/disable`, { method: "POST" })), { id: "action-disable" }),
    writeButton(
      "Uninstall…",
      async () => {
        if (await confirmAction(`Uninstall the plugin "${p.name}"? Its files are removed and its routes and tasks stop.`)) {
          await act(`Uninstall ${p.name}`, () => api(`plugins/${encodeURIComponent(p.name)}`, { method: "DELETE" }));
          state.selectedPlugin = null;
        }
      },
      { id: "action-uninstall", class: "danger" },
    ),
  );
  return el(
    "section",
    { class: "panel", "aria-labelledby": "plugin-detail-title" },
    el("h3", { id: "plugin-detail-title" }, `Plugin ${p.name}`),
    actions,
    fields([
      ["Status", p.status],
      ["Version", p.version || "—"],
      ["Mode", p.mode || "trusted"],
      ["Generation", String(p.generation ?? "—")],
      ["Prefix", p.prefix || "—"],
      ["Digest", p.digest ? p.digest.slice(0, 16) + "…" : "—"],
      ["Loaded at", fmtTime(p.loaded_at)],
      ["Reloads", String(p.reloads ?? 0)],
    ]),
    el("h4", {}, "Routes"),
    (p.routes || []).length ? el("ul", {}, p.routes.map((r) => el("li", { class: "mono" }, r))) : el("p", { class: "muted" }, "none"),
    el("h4", {}, "Last error"),
    p.last_error ? lastError(p.last_error) : el("p", { class: "muted" }, "none"),
    table(
      "Load and reload history",
      ["Position", "Time", "Event", "Generation", "Detail"],
      lifecycle.map((e) =>
        el(
          "tr",
          {},
          el("td", { class: "num" }, e.position),
          el("td", {}, fmtTime(e.recorded_at)),
          el("td", {}, e.type),
          el("td", { class: "num" }, e.data.generation ?? "—"),
          el("td", {}, e.data.error ? String(e.data.error).split("\n")[0] : e.data.duration_ms !== undefined ? fmtMs(e.data.duration_ms) : ""),
        ),
      ),
    ),
  );
}

function installForm() {
  const file = el("input", { id: "install-file", name: "file", type: "file", accept: ".zip,.tar.gz,.tgz", required: true });
  const replace = el("input", { id: "install-replace", name: "replace", type: "checkbox", value: "true" });
  return el(
    "form",
    {
      class: "panel inline",
      id: "install-form",
      "aria-labelledby": "install-title",
      onsubmit: async (event) => {
        event.preventDefault();
        if (!file.files.length) return;
        const form = new FormData();
        form.append("file", file.files[0]);
        form.append("replace", replace.checked ? "true" : "false");
        await act(`Install ${file.files[0].name}`, () => api("plugins", { method: "POST", form }));
      },
    },
    el("h3", { id: "install-title" }, "Install a plugin"),
    el("label", { for: "install-file" }, "Archive (.zip, .tar.gz)", file),
    el("label", { for: "install-replace" }, "Replace an installed version", replace),
    el("button", { type: "submit" }, "Install"),
  );
}

// Tasks -------------------------------------------------------------------------------

function renderTasks(body) {
  return replaceBody(body, async () => {
    const tasks = await api("tasks");
    const list = Array.isArray(tasks) ? tasks : tasks.tasks || [];
    const rows = list.map((t) =>
      el(
        "tr",
        { class: t.id === state.selectedTask ? "selected" : null, "data-task": t.id },
        el("td", {}, el("button", { type: "button", class: "link", id: `task-${t.id}`, onclick: () => selectTask(t.id) }, t.id)),
        el("td", {}, t.trigger || "—"),
        el("td", {}, fmtTime(t.next_run)),
        el("td", {}, fmtTime(t.last_run)),
        el("td", { class: t.last_outcome === "succeeded" ? "ok" : t.last_outcome ? "bad" : "" }, t.last_outcome || "—"),
        el("td", { class: "num" }, `${t.successes ?? 0} / ${t.failures ?? 0}`),
        el("td", { "data-field": "paused" }, t.paused ? "paused" : t.rejected ? "rejected" : "active"),
      ),
    );
    const parts = [table("Scheduled tasks", ["Task", "Trigger", "Next run", "Last run", "Outcome", { label: "OK / failed", cls: "num" }, "State"], rows)];
    if (state.selectedTask && list.some((t) => t.id === state.selectedTask)) parts.push(await taskDetail(state.selectedTask));
    return parts;
  });
}

function selectTask(id) {
  state.selectedTask = id;
  refreshSoon();
}

function lateness(run) {
  if (run.lateness_ms !== undefined && run.lateness_ms !== null) return run.lateness_ms;
  if (!run.started_at || !run.scheduled_for) return null;
  return new Date(run.started_at).getTime() - new Date(run.scheduled_for).getTime();
}

async function taskDetail(id) {
  const t = await api(`tasks/${encodeURIComponent(id)}`);
  const runs = (t.recent_runs || t.runs || []).slice();
  const chronological = runs.slice().sort((a, b) => String(a.started_at).localeCompare(String(b.started_at)));
  const running = runs.find((r) => !r.outcome && !r.finished_at);
  const enc = encodeURIComponent(id);
  return el(
    "section",
    { class: "panel", "aria-labelledby": "task-detail-title" },
    el("h3", { id: "task-detail-title" }, `Task ${id}`),
    el(
      "div",
      { class: "actions" },
      writeButton("Run now", () => act(`Run ${id}`, () => api(`tasks/${enc}/run`, { method: "POST" })), { id: "action-run" }),
      t.paused
        ? writeButton("Resume", () => act(`Resume ${id}`, () => api(`tasks/${enc}/resume`, { method: "POST" })), { id: "action-resume" })
        : writeButton("Pause", () => act(`Pause ${id}`, () => api(`tasks/${enc}/pause`, { method: "POST" })), { id: "action-pause" }),
      running
        ? writeButton("Cancel run", () => act(`Cancel ${id}`, () => api(`tasks/${enc}/runs/${encodeURIComponent(running.run_id)}/cancel`, { method: "POST" })), { id: "action-cancel" })
        : null,
    ),
    fields([
      ["Trigger", t.trigger || "—"],
      ["State", t.paused ? "paused" : "active"],
      ["Next run", fmtTime(t.next_run)],
      ["Last run", fmtTime(t.last_run)],
      ["Mean duration", fmtMs(t.mean_duration_ms)],
      ["Duration", sparkline(chronological.map((r) => r.duration_ms), "duration of recent runs")],
      ["Lateness", sparkline(chronological.map(lateness), "lateness of recent runs")],
    ]),
    table(
      "Recent runs",
      ["Started", "Attempt", "Outcome", { label: "Duration", cls: "num" }, { label: "Lateness", cls: "num" }, "Result or error"],
      runs.map((r) =>
        el(
          "tr",
          {},
          el("td", {}, fmtTime(r.started_at)),
          el("td", { class: "num" }, r.attempt ?? "—"),
          el("td", { class: r.outcome === "succeeded" ? "ok" : r.outcome ? "bad" : "" }, r.outcome || "running"),
          el("td", { class: "num" }, fmtMs(r.duration_ms)),
          el("td", { class: "num" }, fmtMs(lateness(r))),
          el("td", {}, r.error ? el("pre", {}, String(r.error)) : r.result !== undefined && r.result !== null ? el("pre", {}, JSON.stringify(r.result)) : ""),
        ),
      ),
    ),
  );
}

// Events ------------------------------------------------------------------------------

function eventSummary(e) {
  const d = e.data || {};
  const keys = ["name", "plugin", "task", "task_id", "generation", "run_id", "error", "reason", "stage", "outcome", "duration_ms"];
  return keys
    .filter((k) => d[k] !== undefined && d[k] !== null)
    .map((k) => `${k}=${String(d[k]).split("\n")[0].slice(0, 80)}`)
    .join(" ");
}

function eventMatches(e, f) {
  if (f.type && e.type !== f.type) return false;
  if (f.stream && e.stream !== f.stream) return false;
  if (f.plugin) {
    const d = e.data || {};
    const streams = [`plugin-${f.plugin}`, `sandbox-${f.plugin}`];
    const byStream = streams.includes(e.stream) || e.stream.startsWith(`task-${f.plugin}.`);
    if (!byStream && d.plugin !== f.plugin && d.name !== f.plugin) return false;
  }
  return true;
}

function eventRow(e) {
  return el(
    "tr",
    { "data-position": e.position },
    el("td", { class: "num" }, el("button", { type: "button", class: "link", onclick: () => showEvent(e.position), "aria-label": `event ${e.position}: causes and effects` }, String(e.position))),
    el("td", { class: "time", title: fmtTime(e.recorded_at) }, fmtClock(e.recorded_at)),
    el("td", { class: "mono" }, e.stream),
    el("td", {}, e.type),
    el("td", { class: "mono" }, eventSummary(e)),
  );
}

function filterForm(filters, names, onchange) {
  return el(
    "form",
    {
      class: "filters",
      role: "search",
      onsubmit: (event) => {
        event.preventDefault();
        for (const name of names) filters[name] = event.target.elements[name].value.trim();
        onchange();
      },
    },
    names.map((name) => el("label", { for: `filter-${name}` }, name, el("input", { id: `filter-${name}`, name, value: filters[name] || "" }))),
    el("button", { type: "submit" }, "Apply"),
  );
}

function renderEvents(body) {
  const f = state.eventFilters;
  const tbody = el("tbody", { id: "events-body" });
  const detail = el("div", { id: "event-detail" });
  const counter = el("p", { class: "muted", id: "events-count" });
  append(body, [
    filterForm(f, ["type", "stream", "plugin"], () => route()),
    counter,
    el(
      "div",
      { class: "split" },
      el(
        "table",
        { id: "events-table" },
        el("caption", {}, "Live event stream (newest first)"),
        el("thead", {}, el("tr", {}, ["Position", "Time", "Stream", "Type", "Fields"].map((h) => el("th", { scope: "col" }, h)))),
        tbody,
      ),
      detail,
    ),
  ]);
  const max = state.session.max_rows || 500;
  let seen = 0;
  const add = (events) => {
    const frag = document.createDocumentFragment();
    for (const e of events) {
      if (!eventMatches(e, f)) continue;
      frag.prepend(eventRow(e));
      seen += 1;
    }
    tbody.prepend(frag);
    while (tbody.childElementCount > max) tbody.removeChild(tbody.lastElementChild);
    counter.textContent = `${seen} events received; showing the newest ${Math.min(seen, max)}`;
  };
  followEvents(f, add);
  if (state.selectedEvent) showEvent(state.selectedEvent);
}

async function followEvents(f, add) {
  const query = new URLSearchParams();
  if (f.type) query.append("type", f.type);
  if (f.stream) query.set("stream", f.stream);
  let after = 0;
  try {
    const head = await api(`events?limit=1&${query}`);
    after = Math.max(0, (head.last_position || 0) - 100);
    const first = await api(`events?after=${after}&limit=100&${query}`);
    add(first.events || []);
    after = first.next_after ?? after;
  } catch (err) {
    if (err.status !== 401) setStatus(err.message, true);
    return;
  }
  const view = state.view;
  const sq = new URLSearchParams(query);
  sq.set("after", String(after));
  if (f.plugin) sq.set("plugin", f.plugin);
  followStream(
    `events/stream?${sq}`,
    (_type, data) => {
      try {
        const e = JSON.parse(data);
        if (e && typeof e.position === "number" && e.position > after) {
          after = e.position;
          add([e]);
        }
      } catch (_) {
        /* not an event */
      }
    },
    () => {
      // no stream endpoint on this server (the monitoring service is off): page instead
      if (state.view === view) pollEvents(query, () => after, (v) => (after = v), add);
    },
  );
}

function pollEvents(query, getAfter, setAfter, add) {
  // Without a stream endpoint: page through the log, at once while pages come back
  // full (catching up), every half second once caught up.
  const view = state.view;
  const limit = 1000;
  const step = async () => {
    if (state.view !== view || !state.session) return;
    let full = false;
    try {
      const page = await api(`events?after=${getAfter()}&limit=${limit}&${query}`);
      const events = page.events || [];
      add(events);
      setAfter(page.next_after ?? getAfter());
      full = events.length === limit;
    } catch (err) {
      if (err.status === 401) return;
      setStatus(err.message, true);
    }
    clearTimeout(state.poll);
    state.poll = setTimeout(step, full ? 0 : 500);
  };
  step();
}

async function showEvent(position) {
  state.selectedEvent = position;
  const target = document.getElementById("event-detail");
  if (!target) return;
  try {
    const r = await api(`events/${position}/related`);
    const link = (e) =>
      el("li", {}, el("button", { type: "button", class: "link", onclick: () => showEvent(e.position) }, `#${e.position} ${e.type}`), " ", el("span", { class: "muted" }, e.stream));
    clear(target).append(
      el(
        "section",
        { class: "panel", "aria-labelledby": "event-detail-title" },
        el("h3", { id: "event-detail-title" }, `Event #${position} ${r.event.type}`),
        el("h4", {}, "Caused by"),
        r.causes.length ? el("ol", {}, r.causes.map(link)) : el("p", { class: "muted" }, r.causes_cut_by_window ? "older than the search window" : "nothing: this event started its chain"),
        el("h4", {}, "Caused in turn"),
        r.effects.length ? el("ol", {}, r.effects.map(link)) : el("p", { class: "muted" }, "nothing yet"),
        el("h4", {}, "Event"),
        el("pre", {}, JSON.stringify(r.event, null, 2)),
      ),
    );
  } catch (err) {
    if (err.status !== 401) clear(target).append(el("p", { class: "error" }, err.message));
  }
}

// Logs --------------------------------------------------------------------------------

function logLine(line) {
  return el(
    "tr",
    {},
    el("td", {}, fmtTime(line.time ?? line.timestamp ?? line.ts)),
    el("td", { class: /ERROR|CRITICAL/.test(line.level) ? "bad" : /WARN/.test(line.level) ? "warn" : "" }, line.level || ""),
    el("td", { class: "mono" }, line.plugin || line.logger || ""),
    el("td", { class: "mono" }, line.message ?? line.msg ?? "", line.exc || line.exception ? el("pre", {}, line.exc || line.exception) : null),
  );
}

function renderLogs(body) {
  const f = state.logFilters;
  const tbody = el("tbody", { id: "logs-body" });
  append(body, [
    filterForm(f, ["plugin", "level", "q"], () => route()),
    el(
      "table",
      { id: "logs-table" },
      el("caption", {}, "Log lines (newest first)"),
      el("thead", {}, el("tr", {}, ["Time", "Level", "Source", "Message"].map((h) => el("th", { scope: "col" }, h)))),
      tbody,
    ),
  ]);
  const max = state.session.max_rows || 500;
  const add = (lines) => {
    const frag = document.createDocumentFragment();
    for (const line of lines) frag.prepend(logLine(line));
    tbody.prepend(frag);
    while (tbody.childElementCount > max) tbody.removeChild(tbody.lastElementChild);
  };
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v) query.set(k, v);
  api(`logs?limit=200&${query}`)
    .then((page) => {
      // newest first: add them oldest first, so the newest ends on top
      const lines = (page.lines || []).slice().reverse();
      add(lines);
      const sq = new URLSearchParams(query);
      if (lines.length) sq.set("after", String(lines[lines.length - 1].id));
      followStream(
        `logs/stream?${sq}`,
        (_type, data) => {
          try {
            add([JSON.parse(data)]);
          } catch (_) {
            /* not a log line */
          }
        },
        () => {},
      );
    })
    .catch((err) => {
      if (err.status === 404) body.append(el("p", { class: "muted" }, "Log capture is not available on this server."));
      else if (err.status !== 401) setStatus(err.message, true);
    });
}

// Alerts, health, nodes -------------------------------------------------------------

function renderAlerts(body) {
  return replaceBody(body, async () => {
    const data = await api("alerts");
    // "recent" holds every recent episode, open ones included; "open" alone otherwise
    const all = Array.isArray(data) ? data : data.recent || data.open || [];
    const rows = all.map((a) =>
      el(
        "tr",
        {},
        el("td", { class: a.resolved_at || a.state === "resolved" ? "ok" : "bad" }, a.resolved_at || a.state === "resolved" ? "resolved" : "open"),
        el("td", { class: "mono" }, a.key || ""),
        el("td", {}, a.rule || ""),
        el("td", { class: "num" }, a.count ?? ""),
        el("td", {}, fmtTime(a.raised_at)),
        el("td", {}, fmtTime(a.resolved_at)),
      ),
    );
    return table("Alerts", ["State", "Key", "Rule", { label: "Count", cls: "num" }, "Raised", "Resolved"], rows);
  });
}

function renderHealth(body) {
  return replaceBody(body, async () => {
    const response = await fetch(new URL("../../health", location.href), { headers: { accept: "application/json" } });
    const data = await response.json();
    const checks = data.checks || data.components || {};
    const rows = Object.entries(checks).map(([name, check]) => {
      const { ok, ...rest } = check || {};
      return el("tr", {}, el("th", { scope: "row" }, name), el("td", { class: ok ? "ok" : "bad" }, ok ? "ok" : "failing"), el("td", { class: "mono" }, JSON.stringify(rest)));
    });
    return [
      el("p", {}, "Overall: ", el("strong", { class: response.ok ? "ok" : "bad", id: "health-status" }, data.status || (response.ok ? "ok" : "failing"))),
      table("Components", ["Component", "State", "Detail"], rows),
    ];
  });
}

function renderNodes(body) {
  return replaceBody(body, async () => {
    const data = await api("nodes");
    const list = Array.isArray(data) ? data : data.nodes || [];
    const rows = list.map((n) =>
      el(
        "tr",
        {},
        el("td", { class: "mono" }, n.node || n.id || n.name || ""),
        el("td", { class: n.alive === false || n.stale ? "bad" : "ok" }, n.alive === false || n.stale ? "lost" : "alive"),
        el("td", {}, fmtTime(n.last_heartbeat || n.heartbeat_at)),
        el("td", {}, (n.plugins && typeof n.plugins === "object" ? Object.keys(n.plugins).length : n.plugins) ?? "—"),
      ),
    );
    return table("Nodes", ["Node", "State", "Last heartbeat", "Plugins"], rows);
  });
}

// -- start -----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  try {
    const session = await loadSession();
    if (session) showApp(session);
    else showLogin("");
  } catch (err) {
    showLogin("The server did not answer: " + err.message);
  }
});
