// The login page: a token in, a login cookie out (set by the service), then on to where we were headed.
const params = new URLSearchParams(location.search);
const errors = {
  invalid: "That token or link is not valid: unknown, used already, revoked or expired.",
  token_in_url: "A token does not go in a link (links stay in history and logs): paste it here, or make a one-time link with `codestation token link ID`.",
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
