// The first page of a session's own host name, served by codestation: it puts /workspace in
// the list of projects OpenCode's web UI keeps in this origin's localStorage (its home shows
// only those), so the UI opens on the workspace's sessions and files, not an empty home.
const KEY = "opencode.global.dat:server";
const WORKSPACE = "/workspace";

let state = null;
try {
  state = JSON.parse(localStorage.getItem(KEY));
} catch {
  state = null;
}
if (!state || typeof state !== "object") state = { list: [], projects: {}, lastProject: {}, recentlyClosed: {} };
if (!state.projects || typeof state.projects !== "object") state.projects = {};
const projects = Array.isArray(state.projects.local) ? state.projects.local : [];
if (!projects.some((p) => p && p.worktree === WORKSPACE)) projects.unshift({ worktree: WORKSPACE, expanded: true });
state.projects.local = projects;
state.lastProject = { ...(state.lastProject && typeof state.lastProject === "object" ? state.lastProject : {}), local: WORKSPACE };
localStorage.setItem(KEY, JSON.stringify(state));

// Only ever on to a page of this very origin, however `next` is written (URL parsers drop
// tabs and newlines, so a check of its first characters alone can be fooled).
let target = "/";
try {
  const next = new URL(new URLSearchParams(location.search).get("next") ?? "/", location.origin);
  const ours = next.pathname.startsWith("/_codestation/"); // never back here: no loop
  if (next.origin === location.origin && !ours) target = next.pathname + next.search + next.hash;
} catch {
  target = "/";
}
location.replace(target);
