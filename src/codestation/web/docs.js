// The API's own documentation: Swagger UI from npm (swagger-ui-dist), on this origin, logged in by
// this browser's cookie; changes tried from here carry the CSRF token like the rest of the UI.
const me = await fetch("/api/v1/code/me").then((r) => r.json());
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  requestInterceptor: (request) => {
    if (me.csrf_token) request.headers["X-CSRF-Token"] = me.csrf_token;
    return request;
  },
});
