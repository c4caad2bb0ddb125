// A session's terminal: xterm.js over the terminal WebSocket, which reconnects to the same PTY.
const id = location.pathname.split("/").pop();
const mode = new URLSearchParams(location.search).get("mode") === "shell" ? "shell" : "agent";
document.getElementById("title").textContent = `${id} · ${mode}`;
document.getElementById(`mode-${mode}`).classList.add("on");
const state = document.getElementById("state");

const term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false });
const fit = new FitAddon.FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("terminal"));
fit.fit();

const scheme = location.protocol === "https:" ? "wss" : "ws";
const socket = new WebSocket(`${scheme}://${location.host}/api/v1/code/session/${id}/terminal?mode=${mode}`);
socket.binaryType = "arraybuffer";
const send = (message) => socket.readyState === WebSocket.OPEN && socket.send(JSON.stringify(message));

socket.onopen = () => {
  state.textContent = "connected";
  send({ rows: term.rows, cols: term.cols });
  term.focus();
};
socket.onmessage = (event) => term.write(new Uint8Array(event.data));
socket.onclose = () => {
  state.textContent = "disconnected — reload to reconnect";
};
term.onData((data) => send({ data }));
term.onResize(({ rows, cols }) => send({ rows, cols }));
new ResizeObserver(() => fit.fit()).observe(document.getElementById("terminal"));
window.codestationTerminal = term; // for tests and curious people
