"""What the HTTP layer costs: /v1/search and /v1/chat/completions vs the same calls in-process.

On one embedded server, a table of `--docs` generated items (default 10,000) is captured and
indexed through the real pipeline. Then, at 1, 8 and 32 concurrent clients, each endpoint is driven
for `--seconds` seconds:
- in-process: `pgfresh.serve.search` / `pgfresh.serve.answer(mode="rag")` from client threads of
  this process (one registry, as the server has);
- HTTP: the same questions against `pgfresh serve` (a uvicorn process), keep-alive connections,
  one per client thread.
Chat is rag mode with the built-in reader (`[rag.reader] kind = "builtin"`) and the answer cache
off, so every request retrieves and generates. The reader is a tiny 1-layer model built here unless
`--base-model DIR` names a real one (generation cost is then the model's, not the HTTP layer's).

Printed: requests/s, p50 and p99 latency (ms) per endpoint, concurrency and side, and the HTTP
layer's cost as 1 - HTTP throughput / in-process throughput (goal: under 10%).

Run: .venv/bin/python bench/serve.py [--docs 10000] [--seconds 10] [--clients 1,8,32] [--base-model DIR]
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


def drive(clients: int, seconds: float, call) -> dict:
    """`clients` threads calling `call(i)` for `seconds`; requests/s and latency percentiles (ms)."""
    lat: list[float] = []
    lock, stop = threading.Lock(), time.monotonic() + seconds
    errors = []

    def worker(w: int):
        i, mine = w, []
        state = {}
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

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    lat.sort()
    return {"rps": len(lat) / wall, "p50": statistics.median(lat) if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"), "n": len(lat),
            "errors": len(errors), "first_error": errors[0] if errors else None}


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
                    f'[train]\nbase_model = "{model_dir}"\n')
    config = cfg.load(path)
    t = time.monotonic()
    sync.run(config, once=True)
    print(f"indexed {args.docs} documents in {time.monotonic() - t:.1f} s ({args.embedder}); reader: {model_dir}")

    questions = [f"Where is the {name} made?" for _, name, *_ in rng.sample(rows, 500)]
    reg = serve.Registry(pool_size=64)
    opts = serve.Options(cache=False)
    inproc = {
        "search": lambda i, s: serve.search(config, questions[i % 500], registry=reg),
        "chat": lambda i, s: serve.answer(config, questions[i % 500], None, "rag", options=opts, registry=reg),
    }
    serve.answer(config, questions[0], None, "rag", options=opts, registry=reg)  # load the models once

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "serve", "--port", str(port), "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        post = http_post(port)
        over_http = {
            "search": lambda i, s: post(i, s, "/v1/search", {"text": questions[i % 500]}),
            "chat": lambda i, s: post(i, s, "/v1/chat/completions", {
                "model": "rag", "cache": False, "messages": [{"role": "user", "content": questions[i % 500]}]}),
        }
        post(0, {}, "/v1/chat/completions", {"model": "rag", "cache": False,
                                             "messages": [{"role": "user", "content": questions[0]}]})  # warm up
        print(f"\n{'endpoint':8} {'clients':>7} | {'in-process rps':>14} {'p50 ms':>8} {'p99 ms':>8} | "
              f"{'HTTP rps':>9} {'p50 ms':>8} {'p99 ms':>8} | HTTP cost")
        for name in ("search", "chat"):
            for n in levels:
                a = drive(n, args.seconds, inproc[name])
                b = drive(n, args.seconds, over_http[name])
                cost = 1 - b["rps"] / a["rps"] if a["rps"] else float("nan")
                errs = f"  errors: in-process {a['errors']}, HTTP {b['errors']} {b['first_error'] or a['first_error'] or ''}" \
                    if a["errors"] or b["errors"] else ""
                print(f"{name:8} {n:>7} | {a['rps']:>14.1f} {a['p50']:>8.1f} {a['p99']:>8.1f} | "
                      f"{b['rps']:>9.1f} {b['p50']:>8.1f} {b['p99']:>8.1f} | {cost:>6.1%}{errs}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reg.close()
        server.destroy()


if __name__ == "__main__":
    main()
