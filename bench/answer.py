"""Answer latency per mode, with the embedded store's liveness check as it is and as it was, and
per mode under load, in-process and over HTTP.

    .venv/bin/python bench/answer.py --config .pgfresh/demo/pgfresh.toml [--questions 20]
    .venv/bin/python bench/answer.py --config .pgfresh/demo/pgfresh.toml --load 1,8,32 [--seconds 10]

On a synced project with a built model (the demo's after `make demo`), asks `--questions`
"What is the price of <name>?" questions of `shop.products` rows (tenant: their shop) in modes
`rag` and `tuned`, answer cache off, one torch thread, after one warm-up answer per mode. Twice:
with `EmbeddedServer.running()` as it is (postmaster.pid), and with the `pg_ctl status` call it
made before (the baseline, patched in for the run), which every store connection paid. Prints ms
per answer and the answer's own step timings (embed, retrieve, generate). Never asserts.

`--load N,M,...`: instead, for each mode (`rag`, `tuned`, `hybrid`) and each number of concurrent
clients, requests/s and p50 / p99 latency of the same questions asked in-process (`serve.answer`)
and over HTTP (`POST /v1/chat/completions`, the app `pgfresh serve` runs, served by uvicorn in a
thread of this process on the same registry; bench/serve.py's driver). Cache off throughout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psycopg  # noqa: E402

from pgfresh import config as cfg  # noqa: E402
from pgfresh import serve  # noqa: E402
from pgfresh.capture.setup import resolve_dsn  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402
from pgfresh.serve.answer import Options  # noqa: E402
from pgfresh.train import fit  # noqa: E402


def pg_ctl_status(self) -> bool:
    """The liveness check before: a `pg_ctl status` process per call."""
    return self._run("pg_ctl", "-D", str(self.pgdata), "status").returncode == 0


def under_load(config, questions, levels: list[int], seconds: float, reg) -> None:
    """Per mode and number of clients: in-process and HTTP requests/s, p50 / p99 ms."""
    import socket

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve as serve_bench  # bench/serve.py: its client driver and in-thread server

    opts = Options(cache=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, _ = serve_bench.in_thread_server(config, reg, port)
    post = serve_bench.http_post(port)
    print(f"{len(questions)} questions; serve.threads default; load average {os.getloadavg()[0]:.1f}\n")
    print("| mode | clients | in-process req/s | p50 / p99 ms | HTTP req/s | p50 / p99 ms | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    try:
        for mode in ("rag", "tuned", "hybrid"):
            def inproc(i, state, mode=mode):
                tenant, q = questions[i % len(questions)]
                serve.answer(config, q, tenant, mode, options=opts, registry=reg)

            def http(i, state, mode=mode):
                tenant, q = questions[i % len(questions)]
                post(i, state, "/v1/chat/completions", {"model": mode, "tenant": tenant, "cache": False,
                                                        "messages": [{"role": "user", "content": q}]})
            inproc(0, {})
            http(0, {})  # warm up: models loaded on both sides
            for n in levels:
                a, b = serve_bench.alternate(n, seconds, 2, inproc, http)
                errs = f" errors: {a['errors']} / {b['errors']} {a['first_error'] or b['first_error']}" \
                    if a["errors"] or b["errors"] else ""
                print(f"| {mode} | {n} | {a['rps']:.1f} | {a['p50']:.0f} / {a['p99']:.0f} | {b['rps']:.1f} | "
                      f"{b['p50']:.0f} / {b['p99']:.0f} | {os.getloadavg()[0]:.1f} |{errs}", flush=True)
    finally:
        server.should_exit = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--load", default="", help="numbers of concurrent clients, e.g. 1,8,32: latency per mode under load")
    ap.add_argument("--seconds", type=float, default=10.0, help="per side, mode and number of clients (--load)")
    a = ap.parse_args()
    config = cfg.load(a.config)
    fit.set_threads(1)
    with psycopg.connect(resolve_dsn(config)) as c:
        rows = c.execute("select shop_id::text, name from shop.products order by product_id limit %s",
                         (a.questions,)).fetchall()
    questions = [(tenant, f"What is the price of {name}?") for tenant, name in rows]
    opts, reg = Options(cache=False), serve.Registry()
    if a.load:
        under_load(config, questions, [int(x) for x in a.load.split(",")], a.seconds, reg)
        return
    current = EmbeddedServer.running
    print(f"{len(questions)} questions per mode; load average {os.getloadavg()[0]:.1f}\n")
    print("| mode | running() | ms per answer | embed / retrieve / generate ms |\n| --- | --- | --- | --- |")
    for label, check in (("pg_ctl status (before)", pg_ctl_status), ("postmaster.pid (now)", current)):
        EmbeddedServer.running = check
        try:
            for mode in ("rag", "tuned"):
                serve.answer(config, questions[0][1], questions[0][0], mode, options=opts, registry=reg)  # warm up
                t, timings = time.perf_counter(), []
                for tenant, q in questions:
                    timings.append(serve.answer(config, q, tenant, mode, options=opts, registry=reg)["timings"])
                ms = (time.perf_counter() - t) / len(questions) * 1000
                steps = " / ".join(f"{statistics.mean(x.get(k, 0.0) for x in timings):.1f}"
                                   if any(k in x for x in timings) else "-"
                                   for k in ("embed_ms", "retrieve_ms", "generate_ms"))
                print(f"| {mode} | {label} | {ms:.1f} | {steps} |", flush=True)
        finally:
            EmbeddedServer.running = current
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
