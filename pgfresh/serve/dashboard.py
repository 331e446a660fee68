"""The dashboard: one page the API server serves at `/`, with its JS bundled (no CDN, works offline).

What an operator checks each morning: pipeline lag and commit->searchable percentiles over time
(sampled by the page from `/v1/status` while it is open), slot WAL, counts per stage, the
quarantine (release with an admin key), slices with versions, gate results and rollback, a search
box showing each hit's lineage (table, key, LSN, commit time), and the latest arena reports.
The page only calls the public API, with the key typed into it (kept in the browser's storage).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from fastapi.responses import HTMLResponse, Response

STATIC = ("dashboard.html", "dashboard.js", "dashboard.css")


def _read(name: str) -> str:
    return resources.files("pgfresh.serve").joinpath("static", name).read_text()


def mount(app, config) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(_read("dashboard.html"))

    @app.get("/static/dashboard.js", include_in_schema=False)
    def script():
        return Response(_read("dashboard.js"), media_type="application/javascript")

    @app.get("/static/dashboard.css", include_in_schema=False)
    def style():
        return Response(_read("dashboard.css"), media_type="text/css")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(b"", media_type="image/x-icon")


def reports(config) -> list[dict]:
    """Arena results (`pgfresh arena --json FILE`) in `serve.reports_dir`, newest first: verdict lines per strategy."""
    from pgfresh import serve

    base = Path(serve.setting(config, "reports_dir")).expanduser()
    base = base if base.is_absolute() else config.path.parent / base
    out = []
    for f in sorted(base.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[:50]:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("strategies"), dict):
            continue
        rows = []
        for name, s in data["strategies"].items():
            s = s if isinstance(s, dict) else {}
            rows.append({"strategy": name, "kind": s.get("kind"), "accuracy": s.get("accuracy"),
                         "stale_rate": s.get("stale_rate"), "p50_latency_s": (s.get("latency") or {}).get("p50_s")
                         if isinstance(s.get("latency"), dict) else None})
        out.append({"file": f.name, "modified": f.stat().st_mtime, "strategies": rows})
    return out
