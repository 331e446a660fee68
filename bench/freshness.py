"""Commit -> searchable freshness of the RAG index under a steady write load.

A real `pgfresh sync` process (capture + gate + index worker, as in production) follows a products
table while this script writes to it at a steady rate (inserts, updates and deletes in short
transactions, paced every 20 ms). For each rate it reports:
- the index's own figure: commit -> searchable delay of every change (pgfresh.rag_freshness, the
  histogram `pgfresh status` shows), p50 and p99 over the phase;
- an outside check: probe rows with a unique word, inserted every 2 s, and the time until a
  full-text query finds them in pgfresh.documents (end to end, as a client sees it);
- the backlog left at the end of the phase (changes not yet searchable).
- the CPU the pipeline spent per change, in all and by part (the sync process and the server backends of its
  connections), a figure that other work on a shared machine disturbs far less than the delays.
A rate is *sustained* when the backlog stays bounded and p99 < 1 s. `--find-max` then bisects
between the highest sustained and the lowest failed rate with shorter phases.

Run: .venv/bin/python bench/freshness.py [--rates 50,200,1000] [--seconds 60] [--embedder minilm]
                                         [--find-max] [--rows 2000] [--code DIR,DIR] [--profile]
                                         [--without-hnsw-too]
`--code` runs the whole measurement once per directory holding a `pgfresh` package (e.g. a checkout
of the previous commit, then this one), each on a fresh server, so before/after share one run and
one machine load. `--profile` samples the sync process with py-spy during the first phase and
prints where its time went. The static embedder's matrix is distilled once and kept in
~/.cache/pgfresh-bench (50 s of MiniLM otherwise spent by every run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pgfresh.embedded import EmbeddedServer  # noqa: E402
from pgfresh.rag import evalset  # noqa: E402
from pgfresh.rag.status import percentile_ms  # noqa: E402

TICK_SECONDS = 0.02
INSERT = ("insert into products (id, tenant, name, kind, color, material, city, price) values"
          " (%(id)s, %(tenant)s, %(name)s, %(kind)s, %(color)s, %(material)s, %(city)s, %(price)s)")


def histogram(conn) -> dict[int, int]:
    return dict(conn.execute("select bucket, n from pgfresh.rag_freshness").fetchall())


def backlog(conn) -> int:
    """Changes captured but not yet searchable (unread by the index worker, or queued for the embedder)."""
    return conn.execute(
        "select (select count(*) from pgfresh.changes where seq > coalesce((select seq from pgfresh.consumers"
        " where name = 'index'), 0)) + (select count(*) from pgfresh.index_queue)").fetchone()[0]


class Writer:
    """Writes `rate` changes/s: 40% inserts, 50% updates, 10% deletes, one transaction per 20 ms tick."""

    def __init__(self, dsn: str, next_id: int, seed: int = 0):
        self.conn = psycopg.connect(dsn)
        self.rng = random.Random(seed)
        self.next_id = next_id
        self.live = list(range(1, next_id))
        self.base = evalset.products(640, seed=5)

    def tick(self, n: int) -> None:
        with self.conn.transaction():
            for _ in range(n):
                r = self.rng.random()
                if r < 0.4 or len(self.live) < 100:
                    row = dict(self.rng.choice(self.base), id=self.next_id, name=f"Item{self.next_id}")
                    self.conn.execute(INSERT, row)
                    self.live.append(self.next_id)
                    self.next_id += 1
                elif r < 0.9:
                    self.conn.execute("update products set price = price + 1, city = %s where id = %s",
                                      (self.rng.choice(evalset.CITIES), self.rng.choice(self.live)))
                else:
                    victim = self.live.pop(self.rng.randrange(len(self.live)))
                    self.conn.execute("delete from products where id = %s", (victim,))

    def run(self, rate: float, seconds: float, stop_backlog: int, monitor) -> tuple[int, float]:
        """Write for `seconds` (or until the backlog passes stop_backlog); returns (changes, seconds)."""
        start = time.perf_counter()
        written, carry = 0, 0.0
        next_check = start + 1
        while (now := time.perf_counter()) - start < seconds:
            due = rate * (now - start) - written + carry
            n = int(due)
            if n > 0:
                self.tick(n)
                written += n
            if now >= next_check:
                next_check = now + 1
                if backlog(monitor) > stop_backlog:
                    break
            time.sleep(max(0.0, TICK_SECONDS - (time.perf_counter() - now)))
        return written, time.perf_counter() - start


class Prober(threading.Thread):
    """Every 2 s: insert a row with a unique word, time until full-text search finds its document."""

    def __init__(self, dsn: str, first_id: int):
        super().__init__(daemon=True)
        self.dsn, self.next_id = dsn, first_id
        self.stop = threading.Event()
        self.delays: list[float] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                word = f"probe{self.next_id}x"
                row = dict(evalset.products(1, seed=self.next_id)[0], id=self.next_id, name=word)
                conn.execute(INSERT, row)
                committed = time.perf_counter()
                self.next_id += 1
                while not self.stop.is_set():
                    if conn.execute("select exists (select 1 from pgfresh.documents where tsv @@ to_tsquery('simple', %s))",
                                    (word,)).fetchone()[0]:
                        self.delays.append((time.perf_counter() - committed) * 1000)
                        break
                    if time.perf_counter() - committed > 120:
                        break
                    time.sleep(0.01)
                self.stop.wait(max(0.0, 2 - (time.perf_counter() - committed)))


def cpu_seconds(monitor, sync_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the sync process (all threads) and the server backends of its
    connections (application_name pgfresh-*), by part: the cost of the pipeline, whatever else loads
    the machine. The source's walsender for the slot counts as `pgfresh-stream`."""
    parts = [("sync", sync_pid)] + [(r[1], r[0]) for r in monitor.execute(
        "select pid, application_name from pg_stat_activity where application_name like 'pgfresh-%'")]
    total: dict[str, float] = {}
    for name, pid in parts:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total[name] = total.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def phase(dsn: str, monitor, writer: Writer, rate: float, seconds: float, prober_ids: int, sync_pid: int) -> dict:
    before = histogram(monitor)
    cpu_before = cpu_seconds(monitor, sync_pid)
    prober = Prober(dsn, prober_ids)
    prober.start()
    written, elapsed = writer.run(rate, seconds, stop_backlog=int(max(2000, rate * 10)), monitor=monitor)
    left = backlog(monitor)
    prober.stop.set()
    prober.join()
    t = time.perf_counter()
    while backlog(monitor) > 0 and time.perf_counter() - t < 600:
        time.sleep(0.2)
    drain = time.perf_counter() - t
    time.sleep(0.5)
    cpu_after = cpu_seconds(monitor, sync_pid)
    cpu_parts = {k: round((v - cpu_before.get(k, 0.0)) * 1000 / max(1, written), 2) for k, v in sorted(cpu_after.items())}
    after = histogram(monitor)
    diff = [(b, after.get(b, 0) - before.get(b, 0)) for b in after if after.get(b, 0) - before.get(b, 0) > 0]
    p50, p99 = percentile_ms(diff, 0.5), percentile_ms(diff, 0.99)
    probes = sorted(prober.delays)
    stopped_early = elapsed < seconds - 0.5
    return {"rate": rate, "achieved": round(written / elapsed, 1), "seconds": round(elapsed, 1),
            "changes": sum(n for _, n in diff), "p50_ms": p50, "p99_ms": p99,
            "probe_p50_ms": round(probes[len(probes) // 2], 1) if probes else None,
            "probe_max_ms": round(probes[-1], 1) if probes else None,
            "backlog_at_end": left, "drain_s": round(drain, 1),
            "cpu_ms_per_change": round(sum(cpu_parts.values()), 2), "cpu_ms_by_part": cpu_parts,
            "load": round(os.getloadavg()[0], 1),
            "sustained": (not stopped_early) and p99 is not None and p99 < 1000 and left < rate * 2}


STATIC_CACHE = Path.home() / ".cache" / "pgfresh-bench" / "static-minilm.npy"


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """py-spy samples `pid` (every thread, GIL holders or not) into `out` (collapsed stacks)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("(py-spy not installed: no profile)")
        return None
    return subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50", "-f", "raw",
                             "-o", str(out), "--threads", "--idle"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path: Path, top: int = 40) -> None:
    """Share of samples per thread, and per pgfresh function on the stack (inclusive)."""
    if not path.exists():
        return
    threads, funcs, total = {}, {}, 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        frames = stack.split(";")
        threads[frames[0]] = threads.get(frames[0], 0) + n
        seen = set()
        for f in frames[next((i for i, f in enumerate(frames) if f.startswith("_loop ")), 1):]:
            name = f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")" if " (" in f else f
            if name not in seen:
                seen.add(name)
                funcs[name] = funcs.get(name, 0) + n
    print(f"profile: {total} samples at 50/s across threads (waiting included: wall time)")
    for t, n in sorted(threads.items(), key=lambda x: -x[1]):
        print(f"  thread {t}: {n / 50:.1f} s")
    for f, n in sorted(funcs.items(), key=lambda x: -x[1])[:top]:
        print(f"  {n / 50:6.1f} s  {f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="50,200,1000")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rows", type=int, default=2000, help="rows in the table before the load starts")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--embed-threads", type=int, default=1)
    ap.add_argument("--find-max", action="store_true", help="bisect the highest sustained rate (20 s phases)")
    ap.add_argument("--all-rates", action="store_true", help="keep going after a rate is not sustained")
    ap.add_argument("--code", default="", help="directories holding a pgfresh package, one full run each")
    ap.add_argument("--profile", action="store_true", help="py-spy the sync process in the first phase")
    ap.add_argument("--without-hnsw-too", action="store_true",
                    help="then drop the HNSW index and run the same rates again (what its upkeep costs, same run)")
    args = ap.parse_args()
    for code in (args.code.split(",") if args.code else [None]):
        if code:
            print(f"== pgfresh from {code}", flush=True)
        measure(args, code)


def measure(args, code: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="pgfresh-bench-fresh-"))
    server = EmbeddedServer(work / "pg")
    dsn = server.start()
    proc = None
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(evalset.TABLE_SQL.format(table="products"))
            base = evalset.products(640, seed=5)
            c.cursor().executemany(INSERT, [dict(base[i % 640], id=i + 1, name=f"Item{i + 1}") for i in range(args.rows)])
        (work / "pgfresh.toml").write_text(
            f'[source]\ndsn = "{dsn}"\n\n[store]\ndsn = "{dsn}"\n\n[[tables]]\nname = "products"\ndocument = "{evalset.DOCUMENT}"\n\n'
            f'[rag]\nembedder = "{args.embedder}"\nembed_threads = {args.embed_threads}\n')
        if args.embedder == "static-minilm" and STATIC_CACHE.exists():
            (work / ".pgfresh" / "embedders").mkdir(parents=True, exist_ok=True)
            shutil.copy(STATIC_CACHE, work / ".pgfresh" / "embedders" / "static-minilm.npy")
        env = dict(os.environ, PYTHONPATH=os.path.abspath(code)) if code else None
        proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", str(work / "pgfresh.toml")],
                                stdout=subprocess.DEVNULL, stderr=open(work / "sync.log", "w"), env=env)
        monitor = psycopg.connect(dsn, autocommit=True)
        t = time.perf_counter()
        while True:
            ready = monitor.execute("select to_regclass('pgfresh.documents') is not null").fetchone()[0]
            if ready and monitor.execute("select count(*) from pgfresh.documents").fetchone()[0] >= args.rows:
                break
            if proc.poll() is not None:
                raise SystemExit(f"pgfresh sync exited: {(work / 'sync.log').read_text()[-2000:]}")
            time.sleep(0.5)
        if args.embedder == "static-minilm" and not STATIC_CACHE.exists():
            STATIC_CACHE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / ".pgfresh" / "embedders" / "static-minilm.npy", STATIC_CACHE)
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; embedder {args.embedder} "
              f"(threads {args.embed_threads}); initial {args.rows} rows searchable after {time.perf_counter() - t:.1f} s"
              " (process start, model load, snapshot)", flush=True)
        writer = Writer(dsn, args.rows + 1)
        results, probe_id = [], 10_000_000
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            spy = profile(proc.pid, args.seconds, work / "profile.txt") if args.profile and i == 0 else None
            r = phase(dsn, monitor, writer, rate, args.seconds, probe_id, proc.pid)
            if spy is not None:
                spy.wait()
                summarise_profile(work / "profile.txt")
            probe_id += 1000
            results.append(r)
            print(json.dumps(r), flush=True)
            if not r["sustained"] and not args.all_rates:
                break
        if args.without_hnsw_too:
            # The same rates again without the vector index: documents are still written (dense search
            # falls back to an exact scan); the difference is the HNSW insert of every upserted document.
            for (name,) in monitor.execute("select indexname from pg_indexes where indexname like 'documents_hnsw_%'").fetchall():
                monitor.execute(f"drop index pgfresh.{name}")
            for rate in (float(r) for r in args.rates.split(",")):
                r = phase(dsn, monitor, writer, rate, args.seconds, probe_id, proc.pid)
                probe_id += 1000
                print(json.dumps({"without_hnsw": True, **r}), flush=True)
        if args.find_max:
            ok = max((r["rate"] for r in results if r["sustained"]), default=10.0)
            bad = min((r["rate"] for r in results if not r["sustained"]), default=ok * 4)
            while bad / ok > 1.15:
                mid = round(math.sqrt(ok * bad))
                r = phase(dsn, monitor, writer, mid, 20, probe_id, proc.pid)
                probe_id += 1000
                print(json.dumps(r), flush=True)
                ok, bad = (mid, bad) if r["sustained"] else (ok, mid)
            print(f"highest sustained rate with p99 < 1 s: ~{ok:.0f} changes/s (failed at {bad:.0f})")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
