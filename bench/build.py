"""The built-in model build: seconds, tokens/s and accuracy, one setting against another.

    .venv/bin/python bench/build.py --demo DIR [--compare batching] [--full] [--repeats 1]
    .venv/bin/python bench/build.py --arena DIR [--compare threads --threads 1,2] [--epochs 3] [--reading-steps 60]

Where the facts come from: `--demo DIR` seeds the demo's shop (`pgfresh demo`'s size and seed) on
an embedded server in DIR and syncs it once, so the build sees what the demo's build sees;
`--arena DIR`: a finished bench/arena_tuned.py directory (copied first, as bench/rounds.py does);
`--config PATH`: a project whose facts are read in place (its built-in model is replaced).

What is compared (`--compare`): `threads` (torch threads, `--threads`) or `batching` (each step's batch
padded as one, as before, against micro-batches of about one length: `fit.MICRO_RATIO`). Each setting
builds with the cache off, the order alternating between repeats. `--full` builds with the
configured sizes (the model is measured too: accuracy on own facts, held-out phrasings and
open-book); otherwise the build is shortened to `--epochs` mixed epochs and `--reading-steps`
drill steps (throughput only). Prints a Markdown table with each setting's ratio to the first,
measured in this process, and the load average. Never asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.rounds import copy_arena  # noqa: E402
from pgfresh import config as cfg  # noqa: E402
from pgfresh import model  # noqa: E402
from pgfresh.train import fit  # noqa: E402


def demo_snapshot(workdir: Path) -> Path:
    """The demo's database right before its build phase: seeded and synced once."""
    from pgfresh.arena import runner
    from pgfresh.arena.progress import Progress
    from pgfresh.capture.setup import resolve_dsn

    path = runner.demo_database(workdir)
    config = cfg.load(path)
    s = dataclasses.replace(runner.arena_settings(config), seed=7, **runner.DEMO_SIZE)
    pipe = runner.CapturePipeline(config)
    run = runner.ArenaRun(config, s, resolve_dsn(config), [], pipe, Progress(None, s.minutes))
    try:
        runner.reset_pgfresh(run.conn, config)
        run.seed()
        run.initial_sync()
    finally:
        pipe.close()
        run.conn.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", type=Path, help="a directory for the demo's snapshot (made afresh)")
    src.add_argument("--arena", type=Path, help="a finished bench/arena_tuned.py directory (copied)")
    src.add_argument("--config", type=Path, help="a project's pgfresh.toml: its facts are read, its model is replaced")
    ap.add_argument("--workdir", type=Path, default=Path(".pgfresh/bench-build"))
    ap.add_argument("--compare", choices=["threads", "batching"], default="threads")
    ap.add_argument("--threads", default="1,2", help="with --compare threads; otherwise the first is used")
    ap.add_argument("--full", action="store_true", help="the configured sizes, accuracy measured")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reading-steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if a.demo:
        path = demo_snapshot(a.demo.resolve())
    else:
        path = copy_arena(a.arena.resolve(), a.workdir.resolve()) if a.arena else a.config
    config = cfg.load(path)
    threads = [int(t) for t in a.threads.split(",")]
    settings = threads if a.compare == "threads" else ["one padded batch", "micro-batches"]
    runs: dict = {x: [] for x in settings}
    micro = fit.MICRO_RATIO
    for rep in range(a.repeats):
        for x in (settings if rep % 2 == 0 else settings[::-1]):
            spec = {**config.train.get("model", {}), "cache_dir": "",
                    "threads": x if a.compare == "threads" else threads[0]}
            if not a.full:
                spec.update(epochs=a.epochs, reading_steps=a.reading_steps, min_steps=0)
            fit.MICRO_RATIO = float("inf") if x == "one padded batch" else micro
            meta = model.build(dataclasses.replace(config, train={**config.train, "model": spec}))
            runs[x].append(meta)
            print(f"{a.compare} {x}: {meta['train_seconds']} s, {meta['tokens_per_s']} tokens/s, {meta['steps']} steps,"
                  f" accuracy {meta['accuracy']}; load {os.getloadavg()[0]:.1f}", flush=True)
    base = sum(m["train_seconds"] for m in runs[settings[0]]) / a.repeats

    def mean(x, f):
        return sum(f(m) for m in runs[x]) / a.repeats

    print(f"\n| {a.compare} | facts | steps | train s (mean) | tokens/s (mean) | padding | speed-up | own | held-out | open-book |"
          "\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in settings:
        acc = [mean(x, lambda m, k=k: m["accuracy"].get(k) or 0.0) for k in ("own", "held_out", "open_book")]
        seconds = mean(x, lambda m: m["train_seconds"])
        print(f"| {x} | {runs[x][0]['facts']} | {runs[x][0]['steps']} | {seconds:.1f} | {mean(x, lambda m: m['tokens_per_s']):.0f}"
              f" | {mean(x, lambda m: m['padding_share']):.0%} | {base / seconds:.2f} | "
              + " | ".join(f"{v:.2f}" for v in acc) + " |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
