"""``/docs`` and ``/redoc`` from files installed with xcore, never from a CDN.

FastAPI's documentation pages load Swagger UI and ReDoc from a CDN, so on a machine
without internet access (an air-gapped server, a CI runner, an operator's laptop on a
locked-down network) they render blank. The assets come with the ``fastapi-offline``
package (Swagger UI's bundle and stylesheet, ReDoc's standalone script); this module
re-points the app's documentation routes at copies served under ``/docs/assets/``.
An app that turned its docs off (``docs_url=None``) stays without them.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

__all__ = ["ASSETS", "serve_docs_locally"]

#: Where the assets are served.
ASSETS = "/docs/assets"
#: The pages may load nothing from elsewhere (ReDoc would fetch its logo from its CDN).
#: FastAPI's page templates hold inline scripts, and ReDoc starts a worker from a blob.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}


def _asset_root() -> Any:
    return resources.files("fastapi_offline") / "static"


def serve_docs_locally(app: FastAPI) -> None:
    """Serve ``app``'s Swagger UI and ReDoc pages with local assets."""
    if not app.docs_url and not app.redoc_url:
        return
    root = _asset_root()
    cache: dict[str, bytes] = {}

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        media = _FILES.get(name)
        if media is None:
            return Response(status_code=404)
        body = cache.get(name)
        if body is None:
            body = cache[name] = (root / name).read_bytes()
        return Response(body, media_type=media, headers={"cache-control": "public, max-age=86400"})

    def prefixed(request: Request, path: str) -> str:
        root: str = request.scope.get("root_path", "")
        return root.rstrip("/") + path

    async def swagger(request: Request) -> HTMLResponse:
        return _with_csp(
            get_swagger_ui_html(
                openapi_url=prefixed(request, app.openapi_url or "/openapi.json"),
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=prefixed(request, app.swagger_ui_oauth2_redirect_url or "")
                if app.swagger_ui_oauth2_redirect_url
                else None,
                swagger_js_url=prefixed(request, f"{ASSETS}/swagger-ui-bundle.js"),
                swagger_css_url=prefixed(request, f"{ASSETS}/swagger-ui.css"),
                swagger_favicon_url=prefixed(request, f"{ASSETS}/favicon.png"),
                swagger_ui_parameters=app.swagger_ui_parameters,
            )
        )

    async def redoc(request: Request) -> HTMLResponse:
        return _with_csp(
            get_redoc_html(
                openapi_url=prefixed(request, app.openapi_url or "/openapi.json"),
                title=f"{app.title} - ReDoc",
                redoc_js_url=prefixed(request, f"{ASSETS}/redoc.standalone.js"),
                redoc_favicon_url=prefixed(request, f"{ASSETS}/favicon.png"),
                with_google_fonts=False,
            )
        )

    replacements = {app.docs_url: swagger, app.redoc_url: redoc}
    routes = app.router.routes
    for i, route in enumerate(routes):
        path = getattr(route, "path", None)
        endpoint = replacements.get(path) if isinstance(path, str) else None
        if endpoint is not None and isinstance(route, Route) and isinstance(path, str):
            routes[i] = Route(path, endpoint, methods=["GET", "HEAD"], include_in_schema=False)
    routes.append(
        Route(f"{ASSETS}/{{name}}", asset, methods=["GET", "HEAD"], include_in_schema=False)
    )


def _with_csp(response: HTMLResponse) -> HTMLResponse:
    response.headers["content-security-policy"] = DOCS_CSP
    return response
