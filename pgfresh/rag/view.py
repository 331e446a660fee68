"""How search hits and answers look on a terminal (the CLI's `--json` prints the dicts instead)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text


def show_hits(hits, console) -> None:
    if not hits:
        console.print("no matching document")
        return
    t = Table("#", "score", "table", "key", "lsn", "committed", "document")
    for i, h in enumerate(hits, start=1):
        text = h.text if len(h.text) <= 160 else h.text[:157] + "..."
        t.add_row(*(Text(str(v)) for v in (i, f"{h.score:.4f}", h.tbl, h.key, h.lsn,
                  h.commit_time.strftime("%Y-%m-%d %H:%M:%S") if h.commit_time else "snapshot", text)))
    console.print(t)


def show_answer(result: dict, console) -> None:
    if result.get("answer") is not None:
        console.print(Text(str(result["answer"]), style="bold"))  # Text: the answer is data, never markup
    if result.get("note"):
        console.print(Text(str(result["note"]), style="yellow"))
    route = result.get("route") or {}
    if route.get("reason"):
        console.print(f"route: {route['taken']} ({route['reason']})", highlight=False, markup=False)
    cache = result.get("cache")
    console.print(f"cache: {cache}" + (f", {result['timings']['total_ms']} ms" if result.get("timings") else ""))
    for i, s in enumerate(result.get("sources", []), start=1):
        console.print(Text(f"[{i}] {s['tbl']} {s['key']} (lsn {s['lsn']}): {s['text']}"), highlight=False)
