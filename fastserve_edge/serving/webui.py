"""The web page `fastserve serve` shows at / : a chat and a live view of the cluster.

Plain files in static/ (package data), no build step, nothing from elsewhere: the page talks to
the same server's /v1/chat/completions (streamed) and /v1/status with the API key a person types
in it. The page itself holds no secret, so it needs no key (PUBLIC_PATHS); everything it fetches
does. A strict Content-Security-Policy: only this origin's script and style files run, no inline
script, no eval, no frames.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

FILES = {  # path -> (file in static/, Content-Type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/style.css": ("style.css", "text/css; charset=utf-8"),
    "/web/icon.svg": ("icon.svg", "image/svg+xml"),
}
PUBLIC_PATHS = frozenset(FILES)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",        # frame-ancestors, for browsers that predate it
    "Cache-Control": "no-cache",      # a new version of serve is seen on the next load
}


def add_routes(app: web.Application) -> None:
    """GET (and HEAD) of every file of the page; read once, here, from the installed package."""
    static = resources.files("fastserve_edge.serving") / "static"
    for path, (name, content_type) in FILES.items():
        body = (static / name).read_bytes()

        async def serve_file(request: web.Request, body: bytes = body, content_type: str = content_type) -> web.Response:
            return web.Response(body=body, headers={**HEADERS, "Content-Type": content_type})

        app.router.add_get(path, serve_file)


def openapi_paths() -> dict[str, Any]:
    """The page's routes for openapi.document: no key, not JSON."""
    return {path: {"get": {"operationId": "webPage" if path == "/" else f"webFile_{name.replace('.', '_')}",
                           "security": [],
                           "responses": {"200": {"description": "the web page (chat and cluster view)"
                                                 if path == "/" else f"the page's {name}",
                                                 "content": {content_type.split(";")[0]: {"schema": {"type": "string"}}}}}}}
            for path, (name, content_type) in FILES.items()}
