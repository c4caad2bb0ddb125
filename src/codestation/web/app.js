// The sessions page: a live table fed by the server-sent event stream, and the Code dialog.
const API = "/api/v1/code";
const STEPS = ["queued", "preparing the sandbox", "launching OpenCode", "waiting for OpenCode", "running"];
const sessions = new Map();
let watching = null; // the session the Code dialog follows
let me = null; // who is logged in, and the CSRF token every change must carry

const $ = (id) => document.getElementById(id);

function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  Object.assign(node.dataset, dataset);
  for (const child of children) node.append(child);
  return node;
}

function age(iso) {
  const seconds = Math.max(0, Math.round((Date.now() - new Date(iso)) / 1000));
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size) return `${Math.floor(seconds / size)}${unit}`;
  }
  return `${seconds}s`;
}

async function call(method, path, body, base = API) {
  const headers = body ? { "Content-Type": "application/json" } : {};
  if (method !== "GET" && me?.csrf_token) headers["X-CSRF-Token"] = me.csrf_token;
  const response = await fetch(base + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  if (response.status === 401) {
    location.assign(`/login?next=${encodeURIComponent(location.pathname)}`);
    throw new Error("logged out");
  }
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(data?.error ?? response.statusText);
  return data;
}

function agentState(s) {
  const doing = { busy: "agent working", idle: "agent idle" }[s.agent] ?? "agent: not known yet";
  const last = s.last_activity ? `, last active ${age(s.last_activity)} ago` : "";
  return el("div", { className: `detail agent ${s.agent ?? ""}`, textContent: doing + last });
}

function row(s) {
  const status = el("span", { className: `status ${s.status}`, textContent: s.status });
  const state = el("td", { dataset: { label: "Status" } }, status);
  const note = s.status === "failed" ? s.error : s.step ?? (s.reason && s.status === "stopped" ? `reason: ${s.reason}` : "");
  if (note) state.append(el("div", { className: `detail${s.status === "failed" ? " error" : ""}`, textContent: note.split("\n")[0] }));
  if (s.status === "running") state.append(agentState(s));
  const actions = el("td", { className: "actions" });
  if (s.status === "running") {
    actions.append(
      // The session's own host name: it fetches its login from this origin by itself.
      el("a", { className: "button", href: s.web_url, target: "_blank", rel: "noopener", textContent: "Open" }),
      el("a", { className: "button", href: `/terminal/${s.id}`, target: "_blank", textContent: "Terminal" }),
    );
  }
  actions.append(el("button", { textContent: "Logs", onclick: () => showLogs(s.id) }));
  if (["starting", "running"].includes(s.status)) {
    actions.append(el("button", { textContent: "Stop", onclick: (e) => stop(s.id, e.target) }));
  }
  const tr = el(
    "tr",
    { id: `row-${s.id}` },
    el("td", { className: "id", textContent: s.id, dataset: { label: "Session" } }),
    el("td", { className: "ws", textContent: s.workspace, dataset: { label: "Workspace" } }),
    el("td", { textContent: s.environment, dataset: { label: "Environment" } }),
    el("td", { textContent: s.runtime, dataset: { label: "Runtime" } }),
    state,
    el("td", { className: "age", textContent: age(s.created_at), dataset: { label: "Age", created: s.created_at } }),
    actions,
  );
  tr.dataset.status = s.status;
  return tr;
}

function render() {
  const list = [...sessions.values()].sort((a, b) => b.created_at.localeCompare(a.created_at));
  $("empty").hidden = list.length > 0;
  $("sessions").hidden = list.length === 0;
  $("sessions").tBodies[0].replaceChildren(...list.map(row));
}

function follow(s) {
  if (!watching || s.id !== watching) return;
  const now = s.status === "running" ? STEPS.length - 1 : STEPS.indexOf(s.step);
  $("progress").hidden = false;
  $("progress").replaceChildren(
    ...STEPS.map((step, i) =>
      el("li", { className: i < now || s.status === "running" ? "done" : i === now ? "now" : "", textContent: step }),
    ),
  );
  if (s.status === "failed") {
    $("start-error").hidden = false;
    $("start-error").textContent = s.error;
  }
  if (s.status !== "starting") {
    $("start-go").disabled = false;
    watching = null;
  }
}

function listen() {
  const stream = new EventSource(`${API}/events`);
  stream.addEventListener("snapshot", (e) => {
    sessions.clear();
    for (const s of JSON.parse(e.data).sessions) sessions.set(s.id, s);
    render();
  });
  stream.addEventListener("session", (e) => {
    const s = JSON.parse(e.data);
    sessions.set(s.id, s);
    render();
    follow(s);
  });
  stream.addEventListener("deleted", (e) => {
    sessions.delete(JSON.parse(e.data).id);
    render();
  });
}

async function stop(id, button) {
  button.disabled = true;
  try {
    await call("POST", `/session/${id}/stop`);
  } catch (error) {
    alert(error.message);
    button.disabled = false;
  }
}

async function showLogs(id) {
  $("logs-title").textContent = `Logs of ${id}`;
  $("logs-text").textContent = "…";
  $("logs").showModal();
  const response = await fetch(`${API}/session/${id}/logs?tail=300`);
  if (response.status === 401) return location.assign("/login");
  $("logs-text").textContent = (await response.text()) || "(nothing logged)";
}

async function openStart() {
  $("progress").hidden = true;
  $("start-error").hidden = true;
  $("start-go").disabled = false;
  $("start").showModal();
  $("workspace").focus();
}

async function submitStart(event) {
  event.preventDefault();
  $("start-error").hidden = true;
  $("start-go").disabled = true;
  try {
    const s = await call("POST", "/start", { workspace: $("workspace").value.trim(), environment: $("environment").value });
    watching = s.id;
    sessions.set(s.id, s);
    render();
    follow(sessions.get(s.id));
  } catch (error) {
    $("start-error").hidden = false;
    $("start-error").textContent = error.message;
    $("start-go").disabled = false;
  }
}

function showCapacity(c) {
  const gib = (bytes) => (bytes / 2 ** 30).toFixed(1);
  $("capacity").textContent =
    `${c.sessions} of ${c.max_sessions} sessions · ${gib(c.memory_reserved)} of ${gib(c.memory_budget)} GiB reserved`;
}

async function logout() {
  await call("POST", "/logout", undefined, "");
  location.assign("/login");
}

async function main() {
  me = await call("GET", "/me");
  const [health, environments] = await Promise.all([
    fetch("/healthz").then((r) => r.json()),
    call("GET", "/environments"),
  ]);
  $("runtime").textContent = `sessions run in ${health.runtime}`;
  showCapacity(health.capacity);
  setInterval(async () => showCapacity((await fetch("/healthz").then((r) => r.json())).capacity), 5000);
  $("who").textContent = me.admin ? `${me.user} (admin)` : me.user;
  $("logout").onclick = logout;
  $("environment").replaceChildren(
    ...environments.environments.map((e) =>
      el("option", { value: e.name, textContent: e.description ? `${e.name} — ${e.description}` : e.name }),
    ),
  );
  $("code").onclick = openStart;
  $("start-form").onsubmit = submitStart;
  $("start-cancel").onclick = () => $("start").close();
  $("logs-close").onclick = () => $("logs").close();
  setInterval(() => {
    for (const cell of document.querySelectorAll("td.age")) cell.textContent = age(cell.dataset.created);
  }, 10000);
  listen();
}

main();
