"""The built-in model build: seconds and tokens/s by thread count, on a finished arena's snapshot.

    .venv/bin/python bench/build.py --arena DIR [--threads 1,2] [--epochs 3] [--reading-steps 60]

`--arena DIR`: a finished bench/arena_tuned.py directory (copied first, as bench/rounds.py does);
`--config PATH`: a project whose facts are read in place (its built-in model is replaced).
Builds the model on the snapshot's facts with the cache off, once per thread count, alternating
the order between repeats (`--repeats`), with the build shortened to `--epochs` mixed epochs and
`--reading-steps` drill steps (the throughput, not the model, is measured). Prints a Markdown
table with the ratio of each setting's tokens/s to the first's, measured in this process, and
the load average. Never asserts.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--arena", type=Path, help="a finished bench/arena_tuned.py directory (copied)")
    src.add_argument("--config", type=Path, help="a project's pgfresh.toml: its facts are read, its model is replaced")
    ap.add_argument("--workdir", type=Path, default=Path(".pgfresh/bench-build"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reading-steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    config = cfg.load(copy_arena(a.arena.resolve(), a.workdir.resolve()) if a.arena else a.config)
    threads = [int(t) for t in a.threads.split(",")]
    runs: dict[int, list] = {t: [] for t in threads}
    for rep in range(a.repeats):
        for t in (threads if rep % 2 == 0 else threads[::-1]):
            spec = {**config.train.get("model", {}), "threads": t, "cache_dir": "", "epochs": a.epochs,
                    "reading_steps": a.reading_steps, "min_steps": 0}
            meta = model.build(dataclasses.replace(config, train={**config.train, "model": spec}))
            runs[t].append(meta)
            print(f"threads {t}: {meta['train_seconds']} s, {meta['tokens_per_s']} tokens/s, {meta['steps']} steps;"
                  f" load {os.getloadavg()[0]:.1f}", flush=True)
    base = sum(m["tokens_per_s"] for m in runs[threads[0]]) / a.repeats
    print("\n| threads | steps | train s (mean) | tokens/s (mean) | ratio to first |\n| --- | --- | --- | --- | --- |")
    for t in threads:
        tps = sum(m["tokens_per_s"] for m in runs[t]) / a.repeats
        print(f"| {t} | {runs[t][0]['steps']} | {sum(m['train_seconds'] for m in runs[t]) / a.repeats:.1f} | {tps:.0f}"
              f" | {tps / base:.2f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
