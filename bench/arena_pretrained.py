"""The arena with a real pretrained model (SmolLM2-135M-Instruct) as base and reader: the GPU run of issue 13.

    .venv/bin/python bench/arena_pretrained.py [--workdir DIR] [--minutes 2] [--reader-steps 300]
                                               [--out DIR] [--builtin-too] [--smoke]

On an embedded server of its own (in --workdir), the `shop` workload with `train.base_model =
"smollm2-135m"` and `[rag.reader] kind = "hf", path = "smollm2-135m"` (the offline wheel,
converted once into the workdir's data directory):

1. the reader adapter: the shop seeded and synced once, then `pgfresh model reader-adapter --steps
   --reader-steps` drills reading on its facts (the CLI users run; skipped with 0);
2. the arena (`rag-hybrid`, `tuned`, `tuned-gate-off`, `hybrid`, `stale`), the adapter on the reader,
   every round a LoRA round on SmolLM2 (`train.device`: the GPU when there is one);
3. with --builtin-too, the same arena (same seed and workload; the questions follow the run's
   timing) with the built-in model, as the baseline in the same process.

Prints per strategy: accuracy overall, on changed and on unchanged facts with 95% intervals, p50
answer latency, and the rounds each lineage published and rejected; writes results.json and
report.html of each run (and a summary.json) into --out. --smoke: a CPU-sized run that only
checks the path works (a live phase of 20 s, one question batch, rounds of 2 steps, 2 drill
steps): its accuracies mean nothing. On 2 CPU cores SmolLM2 trains below 25 tokens/s, so the real
run is for a GPU (docs/TRAINING.md, "A pretrained base", says what the device machine needs
carried). Never asserts.

Smoke run here (2 CPU cores, a test suite beside it): the whole path works; the reader adapter
(35 steps, 89 tokens/s) lifted open-book exact match from 0.00 to 0.48 on 23 facts; 3 rounds
published and 1 rejected on SmolLM2; 6 questions a strategy (nothing to conclude from).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psycopg  # noqa: E402

from pgfresh import config as cfg  # noqa: E402
from pgfresh.arena import runner, workload  # noqa: E402
from pgfresh.arena.settings import settings as arena_settings  # noqa: E402
from pgfresh.capture import sync  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402

STRATEGIES = ["rag-hybrid", "tuned", "tuned-gate-off", "hybrid", "stale"]
SMOKE = {"batches": 1, "questions_per_batch": 6, "min_questions": 0, "oltp_seconds": 0.0, "export_seconds": 0.0,
         "wal_seconds": 0.0, "scale": {"shops": 2, "products_per_shop": 4, "notes_per_shop": 1}}


def write_config(workdir: Path, dsn: str, pretrained: bool, train: dict, adapter: Path | None) -> Path:
    """The shop's pgfresh.toml, with the pretrained base and reader (or the built-in model)."""
    text = workload.shop_config_text({"dsn": dsn, "max_txn_seconds": 5.0, "slot": "bench"})
    for key in train:  # the shop's own value of a key given here goes
        text = re.sub(rf"^{key} = .*\n", "", text, flags=re.M)
    lines = [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    if pretrained:
        lines.insert(0, 'base_model = "smollm2-135m"')
    text = text.replace("\n[train]\n", "\n[train]\n" + "".join(line + "\n" for line in lines), 1)
    if pretrained:
        text += '\n[rag.reader]\nkind = "hf"\npath = "smollm2-135m"\n'
        if adapter is not None:
            text += f'adapter = "{adapter}"\n'
    path = workdir / ("pretrained.toml" if pretrained else "builtin.toml")
    path.write_text(f'store = {{ dsn = "{dsn}" }}\n' + text.replace('[source]\n', f'[source]\ndata_dir = "{workdir / "data"}"\n', 1))
    return path


def reader_adapter(path: Path, dsn: str, steps: int, out: Path, overrides: dict) -> dict:
    """Seed the shop, sync it once and drill the reader adapter through the CLI."""
    config = cfg.load(path)
    s = replace(arena_settings(config), **overrides)
    with psycopg.connect(dsn, autocommit=True) as conn:
        workload.load_workload(config, s).setup(conn)
    sync.run(config, once=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pgfresh", "model", "reader-adapter", "--steps", str(steps), "--out",
                           str(out), "--json", "--config", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"reader-adapter failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def summary(name: str, r: dict) -> dict:
    """Print and return, per strategy, what the arena's results already hold: accuracy overall, on
    changed and on unchanged facts (with intervals), p50 latency; and the rounds of each lineage."""
    out = {"rounds": {lineage: {k: t[k] for k in ("published", "rejected")} | {"all": len(t["rounds"])}
                      for lineage, t in r.get("training", {}).items()}}
    print(f"\n{name}: rounds {out['rounds']}")
    for strategy in STRATEGIES:
        st = r["strategies"].get(strategy)
        if st is None:
            continue
        row = {"all": st["overall"], **{c: st["by_class"].get(c, {"n": 0}) for c in ("changed", "unchanged")}}
        out[strategy] = {c: {"n": v["n"], "accuracy": v.get("accuracy"), "ci": (v.get("ci") or {}).get("accuracy")}
                         for c, v in row.items()}
        out[strategy]["p50_ms"] = round(st["latency"]["p50_s"] * 1000, 1)
        cells = [f"{c} {v['accuracy']:.0%} [{v['ci'][0]:.0%}-{v['ci'][1]:.0%}] n={v['n']}" if v["n"] else f"{c} -"
                 for c, v in out[strategy].items() if c != "p50_ms"]
        print(f"  {strategy:15} " + "; ".join(cells) + f"; p50 {out[strategy]['p50_ms']} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pgfresh-arena-pretrained"))
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--reader-steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--builtin-too", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    import torch

    workdir = a.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = (a.out or workdir / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(SMOKE) if a.smoke else {}
    minutes = 0.3 if a.smoke else a.minutes
    train = {"min_steps": 2, "epochs": 1, "batch_size": 4, "max_facts_per_round": 6} if a.smoke else {}
    steps = 2 if a.smoke else a.reader_steps
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
          f" ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}); load {os.getloadavg()[0]:.1f}")
    server = EmbeddedServer(workdir / "pg")
    with psycopg.connect(server.start(), autocommit=True) as c:
        c.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = 'bench'")
        c.execute("drop database if exists bench with (force)")
        c.execute("create database bench")
    dsn = server.dsn("bench")
    results = {}
    try:
        runs = [("pretrained", True)] + ([("builtin", False)] if a.builtin_too else [])
        for name, pretrained in runs:
            adapter = workdir / "adapters" / "reader" if pretrained and steps else None
            path = write_config(workdir, dsn, pretrained, train, adapter)
            if adapter is not None:
                t = time.time()
                meta = reader_adapter(path, dsn, steps, adapter, overrides)
                results["reader_adapter"] = {**{k: meta.get(k) for k in ("steps", "tokens_per_s", "final_loss",
                                                                         "open_book_before", "open_book_after", "device")},
                                             "wall_s": round(time.time() - t, 1)}
                print(f"reader adapter: {results['reader_adapter']}")
            t = time.time()
            r = runner.run_arena(cfg.load(path), minutes=minutes, strategies=STRATEGIES, json_path=out / f"{name}.json",
                                 report=out / f"{name}.html", overrides=overrides)
            results[name] = {"wall_s": round(time.time() - t, 1), **summary(name, r)}
    finally:
        server.stop("fast")
        (out / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    shutil.copy(Path(__file__), out / "arena_pretrained.py")  # what produced the figures, beside them


if __name__ == "__main__":
    main()
