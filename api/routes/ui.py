"""The dashboard at /ui: static HTML, CSS and vanilla JS shipped in the package (no build step,
no CDN). It talks to the /v1 API with the key the user enters once (kept in sessionStorage)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static" / "ui"

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/")
def index_slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=308)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC, check_dir=False), name="ui-static")
