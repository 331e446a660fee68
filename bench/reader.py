"""The base model as a reader: open-book accuracy on the rows it was built on against rows it never saw.

Reads the current facts and documents of a pgfresh project (e.g. the demo's, after `make demo`)
and asks every active question/answer fact with its row's current document as the only context,
once as stored and once with the value redrawn (`counterfactual`, so memory cannot answer). Rows
are split by whether the base model learnt any fact of them. Prints accuracy per template.

Run: .venv/bin/python bench/reader.py --config .pgfresh/demo/pgfresh.toml [--distractors 0]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="pgfresh.toml")
    ap.add_argument("--distractors", type=int, default=0)
    args = ap.parse_args()
    from pgfresh import config as cfg, db, model
    from pgfresh.train import data, fit

    config = cfg.load(args.config)
    with db.connect(db.store_dsn(config), "bench-reader", autocommit=True) as conn:
        known_ids = set(model.known_facts(model.base_dir(config)))
        facts = data.load_facts(conn, tenant=data.ANY, kinds=("qa",), statuses=("active", "superseded"))
        docs = data.load_documents(conn, tenant=data.ANY)
    known_rows = {(f.tbl, f.key) for f in facts if f.fact_id in known_ids}
    loaded = model.load(model.base_dir(config))
    print(f"{len(facts)} facts, {len(docs)} documents; base model {model.base_dir(config)}")
    print("template | rows | as stored (known / new rows) | value redrawn (known / new rows)")
    for tbl, template in sorted({(f.tbl, f.template) for f in facts}):
        active = [f for f in facts if f.status == "active" and (f.tbl, f.template) == (tbl, template)]
        groups = [[f for f in active if (f.tbl, f.key) in known_rows], [f for f in active if (f.tbl, f.key) not in known_rows]]
        cells = []
        for cf in (0.0, 1.0):
            accs = []
            for group in groups:
                books = data.open_book(group, docs, 1.0, args.distractors, 3, 6, counterfactual=cf)
                books = [(p, a.strip()) for p, a in books]
                accs.append(fit.accuracy(loaded, books, prompts_ready=True) if books else None)
            cells.append(" / ".join("-" if a is None else f"{a:.2f}" for a in accs))
        print(f"{tbl}.{template} | {len(groups[0])} / {len(groups[1])} | {cells[0]} | {cells[1]}")


if __name__ == "__main__":
    main()
