"""Benchmark of the training stage: knowledge injection into the built-in model, then continual rounds.

    .venv/bin/python bench/train.py [--products 400] [--changes 20] [--rounds 5] [--threads 2]
                                    [--replay 0,0.1,0.25] [--ranks 8,32] [--workdir .pgfresh/bench-train]

1. Build: a products table (N rows, random prices) is captured, then `model build` runs with
   recall measured after every few epochs (own phrasing and a held-out paraphrase): tokens/s and
   recall per epoch.
2. Rounds: for each (replay ratio, LoRA rank), a database of its own with the same rows and the
   same base model; `--rounds` times: change `--changes` prices (same changes for every setting),
   capture, run one round. Per round: seconds, CPU-seconds per 1,000 changed facts, new-fact
   accuracy (held-out phrasings), forgetting on the probe set, stale-answer rate, retention of
   the facts never changed (held-out, the whole set, against the base), and the time from the
   commit of the changes to the first correct tuned answer.

Prints a Markdown table for docs/BENCHMARKS.md. Never asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/TRAINING.md, CPU threads

import psycopg  # noqa: E402

from pgfresh import config as cfg  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402

ADJ = ("Brisk Calm Dusty Eager Fancy Gentle Hollow Icy Jolly Keen Lofty Mellow Noble Olive Proud Quiet Rusty Sunny "
       "Tidy Umber Vivid Witty Young Zesty Amber Bold Crisp Dapper Ember Frosty").split()
NOUN = ("Lamp Kettle Chair Table Mug Spoon Brush Candle Pillow Basket Clock Mirror Shelf Blanket Bottle Vase Stool Rug "
        "Fork Plate Bowl Jar Tray Hook Bench Crate Lantern Teapot Sieve Ladle").split()


def price(r: random.Random) -> str:
    return f"{r.randint(1, 999)}.{r.randint(0, 99):02d}"


def products(n: int) -> list[tuple[int, str, str]]:
    r = random.Random(0)
    names = [f"{a} {b}" for a in ADJ for b in NOUN]
    r.shuffle(names)
    return [(i, names[i], price(r)) for i in range(n)]


def new_db(server: EmbeddedServer, name: str, rows) -> str:
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        c.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s", (name,))
        c.execute(f'drop database if exists "{name}" with (force)')
        c.execute(f'create database "{name}"')
    dsn = server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("create table products (id int primary key, name text not null, price numeric(8,2) not null)")
        c.cursor().executemany("insert into products values (%s, %s, %s)", rows)
    return dsn


def project(workdir: Path, name: str, dsn: str, train: str) -> cfg.Config:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / "pgfresh.toml"
    path.write_text(f'[source]\ndsn = "{dsn}"\ndata_dir = "data"\nslot = "{name}"\n\n[[tables]]\nname = "public.products"\n'
                    f'[tables.gate.train]\nsettle_seconds = 0\n\n[train]\n{train}')
    return cfg.load(path)


def sync(config) -> None:
    from pgfresh.capture import sync as s

    s.run(config, once=True)


def build(args, server, workdir: Path) -> tuple[Path, dict, list]:
    from pgfresh import model
    from pgfresh.train import data, fit

    dsn = new_db(server, "bench_base", products(args.products))
    config = project(workdir, "bench_base", dsn, f"threads = {args.threads}\n[train.model]\nopen_book_ratio = 0.1\n")
    sync(config)
    curve = []

    def on_epoch(epoch, loaded, facts):
        if epoch % args.every and epoch != 1:
            return None
        sample = facts[:200]
        own = fit.accuracy(loaded, [(f.question, f.answer) for f in sample])
        held = fit.accuracy(loaded, [(data.held_out(f, 6), f.answer) for f in sample])
        curve.append({"epoch": epoch, "own": own, "held_out": held})
        print(f"  epoch {epoch}: recall own {own:.2f}, held-out {held:.2f}", flush=True)

    meta = model.build(config, on_epoch=on_epoch)
    return model.builtin_dir(config), meta, curve


def retention(config, unchanged_ids: set) -> float:
    """Held-out accuracy of the current version on the facts never changed (the whole set)."""
    from pgfresh.train import SHARED, data, fit, slices

    with slices.connect(config) as conn:
        facts = [f for f in data.load_facts(conn, None) if f.fact_id in unchanged_ids]
        loaded = slices.load_version(config, conn, slices.current(conn, SHARED))
    return fit.accuracy(loaded, [(data.held_out(f, 6), f.answer) for f in facts])


def rounds_for(args, server, workdir: Path, base_dir: Path, replay: float, rank: int) -> list[dict]:
    from pgfresh import serve
    from pgfresh.train import Settings, rounds, slices

    name = f"bench_r{int(replay * 100)}_k{rank}"
    rows = products(args.products)
    dsn = new_db(server, name, rows)
    # the gate is off so that every round publishes and five rounds accumulate; what the default
    # gate would have decided is reported next to each round
    config = project(workdir, name, dsn, f'base_model = "{base_dir}"\nthreads = {args.threads}\n'
                                         f"replay_ratio = {replay}\nlora_rank = {rank}\n"
                                         "gate_min_new_accuracy = 0.0\ngate_max_forgetting = 1.0\n")
    sync(config)
    with slices.connect(config) as conn:
        ids0 = {r[0] for r in conn.execute("select fact_id from pgfresh.facts where kind = 'qa'")}
        rounds.ensure_lineage(conn, config, "_shared", None)
    before = retention(config, ids0)
    print(f"  replay {replay:.2f} rank {rank}: base held-out accuracy {before}", flush=True)
    names = {i: n for i, n, _ in rows}
    r = random.Random(42)
    changed_ever, out = set(), []
    for k in range(1, args.rounds + 1):
        ids = r.sample(range(args.products), args.changes)
        new = {i: price(r) for i in ids}
        with psycopg.connect(dsn, autocommit=True) as c:
            for i in ids:
                c.execute("update products set price = %s where id = %s", (new[i], i))
        committed = time.time()
        changed_ever |= set(ids)
        sync(config)
        res = rounds.run_round(config, None)
        m = res["metrics"]
        # time from commit to the first correct tuned answer among the changed facts, asked in turn
        first = None
        for i in ids[:5]:
            a = serve.answer(config, f"What is the price of {names[i]}?", mode="tuned")
            if a["answer"] == new[i]:
                first = round(time.time() - committed, 1)
                break
        with slices.connect(config) as conn:
            unchanged = {f for f in ids0} - {
                x[0] for x in conn.execute("select fact_id from pgfresh.facts where kind = 'qa' and key = any(%s)",
                                           ([json.dumps([i]) for i in changed_ever],))}
        default_gate = rounds._gate(Settings(), m)
        row = {"round": k, "retention_before": before, "status": res["status"], "default_gate": "pass" if not default_gate else "reject",
               "seconds": m["seconds"],
               "cpu_s_per_1k": round(m["cpu_seconds"] / args.changes * 1000), "tokens_per_s": m["tokens_per_s"],
               "new_accuracy": m["new_accuracy"], "forgetting": m["forgetting"], "stale_rate": m["stale_rate"],
               "retention": retention(config, unchanged), "commit_to_answer_s": first, "replay": m["replay"]}
        print(f"  replay {replay:.2f} rank {rank} round {k}: {row}", flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=400)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=5, help="measure recall every N epochs of the build")
    ap.add_argument("--replay", default="0,0.1,0.25")
    ap.add_argument("--ranks", default="8,32")
    ap.add_argument("--workdir", type=Path, default=Path(".pgfresh/bench-train"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--base", type=Path, help="a model directory built before by this benchmark (skips the build)")
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    server = EmbeddedServer(workdir / "pg")
    server.start()
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"cuda {torch.cuda.is_available()}", flush=True)
    if args.base:
        base_dir, curve = args.base.resolve(), []
        meta = json.loads((base_dir / "pgfresh_model.json").read_text())
    else:
        base_dir, meta, curve = build(args, server, workdir)
    print(json.dumps({k: meta[k] for k in ("params", "facts", "training_tokens", "tokens_per_s", "train_seconds",
                                           "epochs", "accuracy")}), flush=True)
    results = {"build": meta, "curve": curve, "rounds": {}}
    for replay in [float(x) for x in args.replay.split(",")]:
        for rank in [int(x) for x in args.ranks.split(",")]:
            results["rounds"][f"replay={replay},rank={rank}"] = rounds_for(args, server, workdir, base_dir, replay, rank)
    print("\n| replay | rank | s/round | CPU-s per 1k changed | new acc (r1..rN) | forgetting | stale | retention "
          "(unchanged, end) | commit->answer s | default gate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, rows in results["rounds"].items():
        replay, rank = (x.split("=")[1] for x in key.split(","))
        med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
        print(f"| {replay} | {rank} | {med([r['seconds'] for r in rows])} | {med([r['cpu_s_per_1k'] for r in rows])} "
              f"| {' '.join(str(r['new_accuracy']) for r in rows)} | {' '.join(str(r['forgetting']) for r in rows)} "
              f"| {' '.join(str(r['stale_rate']) for r in rows)} | {rows[-1]['retention']} "
              f"| {med([r['commit_to_answer_s'] for r in rows if r['commit_to_answer_s'] is not None])} "
              f"| {' '.join(r['default_gate'] for r in rows)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    server.stop()


if __name__ == "__main__":
    main()
