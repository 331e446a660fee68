"""The arena report: one self-contained HTML file (works offline) and the same data as JSON.

Plotly's own bundled JavaScript (from the installed plotly package) is embedded once, every plot's
data inline, and the full results document in a `<script type="application/json"
id="pgfresh-results">` element, so the file needs no network and carries its own evidence. The
verdict table is `results["verdict"]` (built from measured numbers by pgfresh.arena.verdict).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

PLOTS = ("accuracy-over-time", "accuracy-by-class", "accuracy-by-staleness", "time-to-fresh", "latency", "cost",
         "forgetting", "db-xmin", "db-export", "db-oltp")


def _fig(title: str, **layout):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, template="plotly_white", height=380, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      **layout)
    return fig


def _empty(fig, reason: str = "not measured"):
    fig.add_annotation(text=reason, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 16})
    return fig


def _strategies(results: dict) -> list[tuple[str, dict]]:
    return list(results["strategies"].items())


def accuracy_over_time(results):
    fig = _fig("Accuracy over time", xaxis_title="seconds into the live phase", yaxis_title="accuracy",
               yaxis_range=[0, 1.05])
    for name, s in _strategies(results):
        fig.add_scatter(x=[p["t_s"] for p in s["over_time"]], y=[p["accuracy"] for p in s["over_time"]],
                        mode="lines+markers", name=name)
    return fig if results["strategies"] else _empty(fig)


def accuracy_by_class(results):
    fig = _fig("Accuracy by question class", yaxis_title="accuracy", yaxis_range=[0, 1.05], barmode="group")
    classes = ["changed", "unchanged", "deleted", "never", "noisy", "held_out"]
    for name, s in _strategies(results):
        acc = [s["by_class"].get(c, {}).get("accuracy") for c in classes]
        ci = [(s["by_class"].get(c, {}).get("ci") or {}).get("accuracy") for c in classes]
        fig.add_bar(x=classes, y=acc, name=name, error_y={
            "type": "data", "symmetric": False,
            "array": [None if a is None or i is None else i[1] - a for a, i in zip(acc, ci)],
            "arrayminus": [None if a is None or i is None else a - i[0] for a, i in zip(acc, ci)]})
    return fig if results["strategies"] else _empty(fig)


def accuracy_by_staleness(results):
    fig = _fig("Accuracy by staleness of the fact (time since its value last changed)", yaxis_title="accuracy",
               yaxis_range=[0, 1.05], barmode="group")
    for name, s in _strategies(results):
        fig.add_bar(x=[b["bucket"] for b in s["by_staleness"]], y=[b["accuracy"] for b in s["by_staleness"]],
                    name=name, customdata=[b["n"] for b in s["by_staleness"]],
                    hovertemplate="%{x}: %{y:.0%} of %{customdata} answers")
    return fig if results["strategies"] else _empty(fig)


def time_to_fresh(results):
    fig = _fig("Time-to-fresh: commit of a change to the first right answer about it", yaxis_title="seconds")
    for name, s in _strategies(results):
        t = s["time_to_fresh"]
        fig.add_box(y=t["samples_s"], name=f"{name} ({t['resolved']}/{t['watched']} fresh)", boxpoints="all")
    return fig if any(s["time_to_fresh"]["samples_s"] for _, s in _strategies(results)) else _empty(fig)


def latency(results):
    samples = {name: [x * 1000 for x in s["latency"]["samples_s"]] for name, s in _strategies(results)}
    flat = [x for xs in samples.values() for x in xs]
    # Log scale only where it can show every sample (a 0 ms answer has no logarithm).
    log = bool(flat) and min(flat) > 0 and max(flat) / min(flat) > 100
    fig = _fig("Answer latency", yaxis_title="milliseconds", yaxis_type="log" if log else "linear")
    for name, xs in samples.items():
        fig.add_box(y=xs, name=name)
    return fig if results["strategies"] else _empty(fig)


def cost(results):
    fig = _fig("Cost: CPU-seconds", yaxis_title="CPU-seconds", barmode="group")
    names = [n for n, _ in _strategies(results)]
    fig.add_bar(x=names, y=[s["cost"]["cpu_s_per_1k_questions"] for _, s in _strategies(results)],
                name="per 1,000 questions")
    fig.add_bar(x=names, y=[s["cost"]["cpu_s_per_1k_changes"] for _, s in _strategies(results)],
                name="per 1,000 changes (own refresh + background)")
    fig.add_bar(x=names, y=[s["cost"]["prepare_cpu_s"] for _, s in _strategies(results)], name="build")
    return fig if names else _empty(fig)


def forgetting(results):
    fig = _fig("Forgetting: accuracy on the unchanged panel, first vs last third", yaxis_title="accuracy",
               yaxis_range=[0, 1.05], barmode="group")
    names = [n for n, _ in _strategies(results)]
    fig.add_bar(x=names, y=[s["forgetting"]["start_accuracy"] for _, s in _strategies(results)], name="start")
    fig.add_bar(x=names, y=[s["forgetting"]["end_accuracy"] for _, s in _strategies(results)], name="end")
    return fig if names else _empty(fig)


def db_xmin(results):
    fig = _fig("Source: oldest xmin held by pgfresh backends", xaxis_title="seconds since the workload started",
               yaxis_title="xmin age (transactions)")
    samples = (results["dbimpact"].get("sampler") or {}).get("samples") or []
    fig.add_scatter(x=[s["t_s"] for s in samples], y=[s["xmin_age"] for s in samples], mode="lines",
                    name="xmin age")
    fig.add_scatter(x=[s["t_s"] for s in samples], y=[s["longest_xact_s"] for s in samples], mode="lines",
                    name="longest transaction (s)", yaxis="y2")
    fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "title": "seconds"})
    return fig if samples else _empty(fig)


def db_export(results):
    fig = _fig("Training export: dead tuples VACUUM could not remove", yaxis_title="dead tuples after VACUUM")
    export = results["dbimpact"].get("export")
    if not export:
        return _empty(fig)
    modes = ["one long transaction (naive)", "short chunks (pgfresh)"]
    fig.add_bar(x=modes, y=[export["naive"]["dead_tuples_after_vacuum"], export["chunked"]["dead_tuples_after_vacuum"]],
                name=export["table"])
    return fig


def db_oltp(results):
    fig = _fig("OLTP throughput (pgbench-style load)", yaxis_title="transactions per second")
    oltp = results["dbimpact"].get("oltp") or {}
    x = ["without pgfresh", "with pgfresh"]
    y = [(oltp.get("without_pgfresh") or {}).get("tps"), (oltp.get("with_pgfresh") or {}).get("tps")]
    fig.add_bar(x=x, y=y)
    return fig if any(v is not None for v in y) else _empty(fig)


FIGURES = dict(zip(PLOTS, (accuracy_over_time, accuracy_by_class, accuracy_by_staleness, time_to_fresh, latency,
                           cost, forgetting, db_xmin, db_export, db_oltp)))


def _fmt(v, kind: str = "", ci=None) -> str:
    """A number for a table; with `ci` ([lo, hi], hi None: unbounded) its 95% interval after it."""
    if v is None:
        return "not measured"
    if kind == "pct":
        return f"{100 * v:.0f}%" + (f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else "")
    if kind == "s":
        text = f"{v * 1000:.1f} ms" if v < 1 else f"{v:.1f} s"
        if ci and ci[0] is not None:
            text += f" [{_fmt(ci[0], 's')}-{'never' if ci[1] is None else _fmt(ci[1], 's')}]"
        return text
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _fresh(t: dict, q: str) -> str:
    """A time-to-fresh percentile; 'never' (not 'not measured') when that share never became fresh."""
    if not t["watched"]:
        return "not measured"
    if t[f"{q}_s"] is None:
        return f"never ({t['watched'] - t['resolved']}/{t['watched']} not fresh)"
    return _fmt(t[f"{q}_s"], "s", t.get(f"{q}_ci_s"))


def _ci_of(summary: dict, key: str):
    return (summary.get("ci") or {}).get(key)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def strategy_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, s in _strategies(results):
        o, hit = s["overall"], s["retrieval"]["hit_at_k"].get("5")
        changed = s["by_class"].get("changed", {})
        t, lat = s["time_to_fresh"], s["latency"]
        rows.append([name, s["kind"], str(o["n"]), _fmt(o["accuracy"], "pct", _ci_of(o, "accuracy")),
                     _fmt(changed.get("accuracy"), "pct", _ci_of(changed, "accuracy")),
                     _fmt(o["stale_rate"], "pct", _ci_of(o, "stale_rate")),
                     _fmt(o["hallucination_rate"], "pct", _ci_of(o, "hallucination_rate")),
                     _fmt(o["polluted_rate"], "pct", _ci_of(o, "polluted_rate")),
                     _fmt(hit, "pct", s["retrieval"].get("hit_at_k_ci", {}).get("5")), _fresh(t, "p50"), _fresh(t, "p99"),
                     _fmt(lat["p50_s"], "s", lat.get("p50_ci_s")), _fmt(lat["p99_s"], "s", lat.get("p99_ci_s")),
                     _fmt(s["cost"]["cpu_s_per_1k_questions"]), _fmt(s["cost"]["cpu_s_per_1k_changes"]),
                     _fmt(s["forgetting"]["forgetting"], "pct"), _fmt(s["fuar"]["value"])])
    return rows


def router_rows(results: dict) -> list[list[str]]:
    """The router against its two parts, per class, on the same questions (verdict.router_table)."""
    from pgfresh.arena.verdict import router_table

    return [[c["cls"], str(c["n"]), _fmt(c["router"], "pct", c["router_ci"]),
             f"{c['tuned_name']} {_fmt(c['tuned'], 'pct', c['tuned_ci'])}",
             f"{c['rag_name']} {_fmt(c['rag'], 'pct', c['rag_ci'])}",
             f"{'worse than' if c['worse'] else 'not measurably worse than'} {c['best']}"
             f" (McNemar p = {c['against_best']['p_value']:.2g})"] for c in router_table(results)]


ROUTER_HEAD = ["class", "questions", "router", "tuned", "best RAG", "router vs the better part"]
STRATEGY_HEAD = ["strategy", "kind", "questions", "accuracy", "changed", "stale", "hallucinated", "polluted", "hit@5",
                 "fresh p50", "fresh p99", "latency p50", "latency p99", "CPU-s/1k questions", "CPU-s/1k changes",
                 "forgetting", "FUAR"]


def _wal(wal: dict | None) -> str:
    """The source's WAL per workload change without and with pgfresh (dbimpact.wal_window)."""
    if not wal or wal.get("added_share") is None:
        return f"not measured ({wal['not_measured']})" if wal and wal.get("not_measured") else "not measured"
    return (f"{wal['without_pgfresh']['bytes_per_change']:.0f} bytes without pgfresh, "
            f"{wal['with_pgfresh']['bytes_per_change']:.0f} with it: {100 * wal['added_share']:+.2f}% "
            f"(goal under {100 * wal['goal_share']:.0f}%; {wal['seconds']:g} s windows)")


def _oltp(oltp: dict | None) -> str:
    """OLTP throughput without and with pgfresh, and how many cores the source had to itself."""
    without, with_ = ((oltp or {}).get(k) or {} for k in ("without_pgfresh", "with_pgfresh"))
    if without.get("tps") is None or with_.get("tps") is None:
        return "not measured"
    cores = with_.get("cores") or {}
    return (f"{without['tps']:.0f} tps without pgfresh, {with_['tps']:.0f} with it ({with_['tps'] / without['tps']:.0%}); "
            + (cores.get("note") or "cores not recorded"))


def render_html(results: dict) -> str:
    """The whole report as one HTML string."""
    from plotly.offline import get_plotlyjs

    run = results["run"]
    plots = "".join(
        f'<section class="plot">{FIGURES[p](results).to_html(full_html=False, include_plotlyjs=False, div_id=p, config={"displaylogo": False})}</section>'
        for p in PLOTS)
    machine = run["machine"]
    facts = [["workload", run["workload"]], ["seed", run["seed"]], ["live phase", f"{run['minutes']:g} min"],
             ["noise", f"{100 * run['noise']:.0f}%"], ["rate", f"{run['rate_per_s']:g} changes/s"],
             ["changes in the live phase", results["workload"]["changes"]],
             ["questions", f"{results['questions']['asked']} in {results['questions']['batches']} batches"],
             ["strategies", ", ".join(run["strategies"]) or "none"], ["started", run["started_at"]],
             ["machine", f"{machine['cpus']} CPUs, {(machine['memory_bytes'] or 0) / 2**30:.1f} GiB, "
                         f"{machine['platform']}, GPU: {machine['gpu'] or 'none'}"],
             ["PostgreSQL", machine["postgres"]], ["Python", machine["python"]],
             ["versions", ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)],
             ["source WAL per workload change", _wal(results["dbimpact"].get("wal"))],
             ["OLTP throughput (pgbench)", _oltp(results["dbimpact"].get("oltp"))]]
    verdict = _table(["claim", "measured evidence", "what it means for this workload"],
                     [[v["claim"], v["evidence"], v["meaning"]] for v in results["verdict"]])
    errors = "".join(f"<li>{html.escape(e)}</li>" for e in results.get("errors", []))
    router = router_rows(results)
    data = json.dumps(results, default=str).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgfresh arena report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
section.plot {{ margin: 1em 0; }}
</style>
<script>{get_plotlyjs()}</script>
</head><body>
<h1>pgfresh arena report</h1>
{_table(["run", ""], facts)}
<h2>Verdict</h2>
{verdict}
<h2>Strategies</h2>
<p>Rates with their 95% Wilson interval in brackets, latencies and time-to-fresh with their 95% bootstrap
interval; "never" where that share of the changes never became fresh within the run.</p>
{_table(STRATEGY_HEAD, strategy_rows(results))}
{f"<h3>The router and its parts</h3>{_table(ROUTER_HEAD, router)}" if router else ""}
{f"<h3>Errors</h3><ul>{errors}</ul>" if errors else ""}
<h2>Plots</h2>
{plots}
<script type="application/json" id="pgfresh-results">{data}</script>
</body></html>
"""


def write_report(results: dict, path: Path) -> Path:
    path = Path(path)
    path.write_text(render_html(results), encoding="utf-8")
    return path
