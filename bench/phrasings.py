"""Paraphrase augmentation: does training each fact in several phrasings lift recall on a phrasing
never trained? (Allen-Zhu & Li, Physics of Language Models 3.1: 9.7% -> 96.6% with rewrites.)

    .venv/bin/python bench/phrasings.py [--products 100] [--phrasings 1,6] [--threads 1] [--min-steps 400]

One products table (random prices, bench/train.py's names), captured once; then for each
`max_phrasings` a closed-book build of the built-in model (`pgfresh model build` with
reading_steps = 0 and open_book_ratio = 0, so only stored knowledge is measured) and its exact-match
accuracy on the trained canonical question and on the held-out phrasing (the same phrasing for
every setting: `train.data.held_out` does not depend on max_phrasings). The build's `min_steps`
(400) gives a small table about the same optimizer steps either way; steps and tokens are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgfresh.embedded import EmbeddedServer  # noqa: E402


def main() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    from pgfresh import model
    from pgfresh.train import data, fit
    from pgfresh.train.slices import connect

    ap = argparse.ArgumentParser()
    ap.add_argument("--products", type=int, default=100)
    ap.add_argument("--phrasings", default="1,6")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-steps", type=int, default=400, help="[train.model] min_steps (the build's default: 400)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pgfresh-phrasings-"))
    server = EmbeddedServer(str(work / "pg"))
    server.start()
    rows = bt.products(args.products)
    results = []
    try:
        for k in [int(x) for x in args.phrasings.split(",")]:
            name = f"phrasings_{k}"
            dsn = bt.new_db(server, name, rows)
            config = bt.project(work, name, dsn, f"threads = {args.threads}\nmax_phrasings = {k}\n"
                                                 f"[train.model]\nreading_steps = 0\nopen_book_ratio = 0\nmin_steps = {args.min_steps}\n")
            bt.sync(config)
            meta = model.build(config)
            loaded = model.load(model.builtin_dir(config))
            with connect(config) as conn:
                facts = data.load_facts(conn, None)
            own = fit.accuracy(loaded, [(f.question, f.answer) for f in facts])
            held = fit.accuracy(loaded, [(data.held_out(f, k), f.answer) for f in facts])
            trained = {len(data.split_phrasings(f, k)[0]) for f in facts}
            results.append((k, sorted(trained), meta["steps"], meta["training_tokens"], own, held, len(facts)))
            print(f"max_phrasings {k}: trained phrasings per fact {sorted(trained)}, steps {meta['steps']},"
                  f" tokens {meta['training_tokens']}, own {own:.3f}, held-out {held:.3f} ({len(facts)} facts)", flush=True)
    finally:
        server.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| max_phrasings | trained phrasings / fact | steps | tokens | canonical | held-out phrasing |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, t, steps, tokens, own, held, n in results:
        print(f"| {k} | {t} | {steps} | {tokens} | {own:.3f} | {held:.3f} |")


if __name__ == "__main__":
    main()
