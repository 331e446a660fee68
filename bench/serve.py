"""What the HTTP layer costs: /v1/search and /v1/chat/completions vs the same calls in-process.

On one embedded server, a table of `--docs` generated items (default 10,000) is captured and
indexed through the real pipeline. Then, at 1, 8 and 32 concurrent clients, each endpoint is driven
for `--seconds` seconds:
- in-process: `pgfresh.serve.search` / `pgfresh.serve.answer(mode="rag")` from client threads of
  this process (one registry, as the server has);
- HTTP: the same questions over HTTP, keep-alive connections, one per client thread, against the
  same app `pgfresh serve` runs (`create_app`), served by uvicorn in a thread of this process on the
  same registry (`--server thread`, the default: the only difference is the HTTP layer), or by a
  `pgfresh serve` process (`--server process`: a second process, its own models and pool).
The two sides alternate (`--repeats` pairs, in-process first) so load that drifts during the run
(a shared machine) falls on both; the machine's load average is printed beside each row.
Chat is rag mode with the built-in reader (`[rag.reader] kind = "builtin"`) and the answer cache
off, so every request retrieves and generates. The reader is a tiny 1-layer model built here unless
`--base-model DIR` names a real one (generation cost is then the model's, not the HTTP layer's).

Printed: requests/s, p50 and p99 latency (ms) per endpoint, concurrency and side, and the HTTP
layer's cost as 1 - HTTP throughput / in-process throughput (goal: under 10%), over the summed
requests of all pairs. The client threads share the machine's cores with the server, so on a small
machine the throughput ratio also pays for the client's own HTTP work; the CPU columns separate it:
the whole machine's CPU per request (/proc/stat) in-process, and on the HTTP side less the client
threads' own CPU (`time.thread_time`), and the layer's cost as 1 - in-process / HTTP server side.

Run: .venv/bin/python bench/serve.py [--docs 10000] [--seconds 10] [--clients 1,8,32] [--repeats 2]
     [--server thread|process] [--base-model DIR] [--threads N] [--endpoints search,chat]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgfresh import config as cfg  # noqa: E402
from pgfresh import serve  # noqa: E402
from pgfresh.capture import sync  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402

SYL = ["ka", "vo", "ri", "len", "ta", "mo", "zu", "bel", "si", "dra", "quo", "ne", "pa", "lix", "ro", "ven", "ul", "mi"]
CITIES = ["Lyon", "Porto", "Osaka", "Quito", "Leeds", "Turin", "Gdansk", "Austin", "Perth", "Cork"]
KINDS = ["sofa", "lamp", "mug", "rug", "desk", "bicycle", "jacket", "backpack", "kettle", "sneakers"]


def items(n: int, rng: random.Random) -> list[tuple]:
    names = set()
    out = []
    while len(out) < n:
        name = "".join(rng.choice(SYL) for _ in range(rng.randint(3, 4))).capitalize()
        if name in names:
            continue
        names.add(name)
        out.append((len(out) + 1, name, rng.choice(KINDS), rng.choice(CITIES), round(rng.uniform(5, 900), 2)))
    return out


def tiny_model(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "D:", "Q:", "A:", "the", "is", "made", "in", "costs", "a", "."] + CITIES + KINDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
                     ).save_pretrained(directory)
    return directory


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent (every process, every core: /proc/stat, user + system)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def drive(clients: int, seconds: float, call) -> dict:
    """`clients` threads calling `call(i)` for `seconds`; requests/s and latency percentiles (ms),
    with the machine's CPU over the run and the client threads' own share of it."""
    lat: list[float] = []
    lock, stop = threading.Lock(), time.monotonic() + seconds
    errors, client_cpu = [], []

    def worker(w: int):
        i, mine = w, []
        state = {}
        cpu0 = time.thread_time()
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                call(i, state)
            except Exception as exc:  # a bench counts failures, it does not stop on them
                errors.append(repr(exc)[:200])
            mine.append((time.perf_counter() - t) * 1000)
            i += clients
        with lock:
            lat.extend(mine)
            client_cpu.append(time.thread_time() - cpu0)

    started, cpu_started = time.monotonic(), machine_cpu_seconds()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    lat.sort()
    return {"rps": len(lat) / wall, "p50": statistics.median(lat) if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"), "n": len(lat),
            "errors": len(errors), "first_error": errors[0] if errors else None, "lat": lat, "wall": wall,
            "cpu": machine_cpu_seconds() - cpu_started, "client_cpu": sum(client_cpu)}


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def alternate(n: int, seconds: float, repeats: int, a_call, b_call) -> tuple[dict, dict]:
    """`repeats` pairs of (in-process, HTTP) runs of `seconds / repeats` each, summed per side."""
    runs = {"a": [], "b": []}
    for _ in range(repeats):
        runs["a"].append(drive(n, seconds / repeats, a_call))
        runs["b"].append(drive(n, seconds / repeats, b_call))
    return tuple(_merge(runs[k]) for k in ("a", "b"))


def _merge(parts: list[dict]) -> dict:
    lat = sorted(x for p in parts for x in p["lat"])
    wall = sum(p["wall"] for p in parts)
    errors = sum(p["errors"] for p in parts)
    return {"rps": len(lat) / wall if wall else 0.0, "p50": statistics.median(lat) if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"), "n": len(lat),
            "errors": errors, "first_error": next((p["first_error"] for p in parts if p["first_error"]), None),
            "cpu": sum(p["cpu"] for p in parts), "client_cpu": sum(p["client_cpu"] for p in parts)}


def in_thread_server(config, reg, port: int):
    """The app `pgfresh serve` runs, served by uvicorn in a thread of this process, on `reg`."""
    import uvicorn

    from pgfresh.serve.http import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(config, reg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def http_post(port: int):
    def call(i, state, path, body):
        conn = state.get("conn")
        if conn is None:
            conn = state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--base-model", default=None, help="a local HF model directory as the reader (default: a tiny one)")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--threads", type=int, default=None, help="serve.threads (default: the server's own default)")
    ap.add_argument("--endpoints", default="search,chat")
    ap.add_argument("--repeats", type=int, default=2, help="alternating (in-process, HTTP) pairs per row")
    ap.add_argument("--server", choices=("thread", "process"), default="thread",
                    help="HTTP served in this process on the same registry, or by a `pgfresh serve` process")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pgfresh-bench-serve-"))
    server = EmbeddedServer(work / "pg")
    admin = server.start()
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute("drop database if exists bench_serve with (force)")
        c.execute("create database bench_serve")
    dsn = server.dsn("bench_serve")
    rng = random.Random(0)
    rows = items(args.docs, rng)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("create table items (id int primary key, name text, kind text, city text, price numeric(10,2))")
        with c.cursor().copy("copy items from stdin") as cp:
            for r in rows:
                cp.write_row(r)
    model_dir = Path(args.base_model).resolve() if args.base_model else tiny_model(work / "tiny")
    path = work / "pgfresh.toml"
    path.write_text(f'[source]\ndsn = "{dsn}"\ndata_dir = "data"\n[[tables]]\nname = "items"\n'
                    'document = "{name} is a {kind} made in {city}. It costs ${price}."\n'
                    f'[rag]\nembedder = "{args.embedder}"\n[rag.reader]\nkind = "builtin"\n'
                    f'[train]\nbase_model = "{model_dir}"\n'
                    + (f"[serve]\nthreads = {args.threads}\n" if args.threads else ""))
    config = cfg.load(path)
    t = time.monotonic()
    sync.run(config, once=True)
    print(f"indexed {args.docs} documents in {time.monotonic() - t:.1f} s ({args.embedder}); reader: {model_dir}")

    questions = [f"Where is the {name} made?" for _, name, *_ in rng.sample(rows, min(500, len(rows)))]
    reg = serve.Registry(pool_size=64)
    opts = serve.Options(cache=False)
    inproc = {
        "search": lambda i, s: serve.search(config, questions[i % len(questions)], registry=reg),
        "chat": lambda i, s: serve.answer(config, questions[i % len(questions)], None, "rag", options=opts, registry=reg),
    }
    serve.answer(config, questions[0], None, "rag", options=opts, registry=reg)  # load the models once

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = thread_server = None
    if args.server == "process":
        proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "serve", "--port", str(port), "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    else:
        thread_server, _ = in_thread_server(config, reg, port)
    print(f"HTTP: {'a `pgfresh serve` process' if proc else 'uvicorn in this process, same registry'}; "
          f"{os.cpu_count()} CPUs; load average {load_average()} (1/5/15 min)")
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        post = http_post(port)
        over_http = {
            "search": lambda i, s: post(i, s, "/v1/search", {"text": questions[i % len(questions)]}),
            "chat": lambda i, s: post(i, s, "/v1/chat/completions", {
                "model": "rag", "cache": False, "messages": [{"role": "user", "content": questions[i % len(questions)]}]}),
        }
        post(0, {}, "/v1/chat/completions", {"model": "rag", "cache": False,
                                             "messages": [{"role": "user", "content": questions[0]}]})  # warm up
        print(f"\n{'endpoint':8} {'clients':>7} | {'in-process rps':>14} {'p50 ms':>8} {'p99 ms':>8} | "
              f"{'HTTP rps':>9} {'p50 ms':>8} {'p99 ms':>8} | HTTP cost | CPU ms/req: in-process, HTTP server side,"
              " cost | load avg")
        for name in args.endpoints.split(","):
            for n in levels:
                a, b = alternate(n, args.seconds, args.repeats, inproc[name], over_http[name])
                cost = 1 - b["rps"] / a["rps"] if a["rps"] else float("nan")
                errs = f"  errors: in-process {a['errors']}, HTTP {b['errors']} {b['first_error'] or a['first_error'] or ''}" \
                    if a["errors"] or b["errors"] else ""
                # By CPU: what a request costs the machine, less the client threads' own CPU on the HTTP
                # side (their request formatting and response parsing; in production the client runs elsewhere).
                # In-process, the client threads *are* the search, so nothing is taken off.
                cpu_a = a["cpu"] * 1000 / max(1, a["n"])
                cpu_b = (b["cpu"] - b["client_cpu"]) * 1000 / max(1, b["n"])
                print(f"{name:8} {n:>7} | {a['rps']:>14.1f} {a['p50']:>8.1f} {a['p99']:>8.1f} | "
                      f"{b['rps']:>9.1f} {b['p50']:>8.1f} {b['p99']:>8.1f} | {cost:>9.1%} | "
                      f"{cpu_a:6.1f} {cpu_b:6.1f} {1 - cpu_a / cpu_b:6.1%} | {load_average()}{errs}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if thread_server is not None:
            thread_server.should_exit = True
        reg.close()
        EmbeddedServer(config.data_dir / "store").destroy()  # the store db.store_dsn started (no [store] dsn)
        server.destroy()


if __name__ == "__main__":
    main()
