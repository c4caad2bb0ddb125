// The login page: a token in, a login cookie out (set by the service), then on to where we were headed.
const params = new URLSearchParams(location.search);
const errors = {
  invalid: "That token is not valid: unknown, revoked or expired.",
  cross_site: "That login link came from another site, so it was not used. Paste the token instead.",
};
const shown = document.getElementById("login-error");
if (errors[params.get("error")]) {
  shown.hidden = false;
  shown.textContent = errors[params.get("error")];
}

document.getElementById("login-form").onsubmit = async (event) => {
  event.preventDefault();
  shown.hidden = true;
  const response = await fetch("/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: document.getElementById("token").value.trim(), next: params.get("next") ?? "/" }),
  });
  const data = await response.json();
  if (!response.ok) {
    shown.hidden = false;
    shown.textContent = data.error ?? response.statusText;
    return;
  }
  location.assign(data.next); // a path on this origin: the service chose it
};
