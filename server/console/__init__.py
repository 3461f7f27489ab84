"""The web console: a static single-page app bundled in the package, served from the API process.

`GET /` and `GET /ui/...` answer the files under `static/` (no build step, no CDN, nothing fetched at
run time). The page talks only to the public API with the key the user typed, held in page memory;
this module serves files and nothing else. `--no-ui` leaves the router out (404).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from server.api.errors import APIError

STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
# Everything the page loads comes from this origin; the API it calls is this origin too.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of every bundled file, read once; only these names are ever served."""
    out = {}
    for path in sorted(STATIC.iterdir()):
        if path.is_file() and path.suffix in _TYPES:
            out[path.name] = (path.read_bytes(), _TYPES[path.suffix])
    if "index.html" not in out:
        raise FileNotFoundError(f"the console's index.html is missing from {STATIC} (a broken install?)")
    return out


def _file(name: str) -> Response:
    data, media_type = _assets()[name]
    return Response(data, media_type=media_type, headers=_HEADERS)


@router.get("/")
async def console_index() -> Response:
    return _file("index.html")


@router.get("/ui")
async def console_ui_bare() -> Response:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/{path:path}")
async def console_asset(path: str) -> Response:
    """A bundled file by name; any other path without a file suffix is a screen of the app (index.html)."""
    if path in _assets():
        return _file(path)
    if "." not in path.rsplit("/", 1)[-1]:
        return _file("index.html")
    raise APIError(404, f"no console file {path!r}", param="path")
