"""Can the tiny built-in Llama learn to read? A synthetic study behind the build's reading drills.

Synthetic shop products (the arena's word lists, the shop document template); closed-book
examples (3 phrasings per fact, a 4th held out) mixed with open-book ones whose values are drawn
afresh for every example and epoch, so only reading the document answers them. Prints, every 5
epochs: closed-book recall (trained phrasing), open-book accuracy on training and held-out
phrasings (1 to --docs documents, values never seen), tokens/s. No database needed.

    .venv/bin/python bench/reading_study.py [--facts 120] [--epochs 30] [--docs 4] [--place last]
        [--open-book 0.5] [--closed 1] [--drill-epochs 10] [--threads 1] [--lr 2e-3]

--place: where the row's document is written among the others (first, last = next to the
question, random). --drill-epochs: epochs of drills first (the row's document alone, no
closed-book examples), as `pgfresh model build` does.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DOC = "{name} ({category}) costs ${price}; {stock} in stock; status published. {description}"
QUESTIONS = {
    "price": ["What is the price of {name}?", "How much does {name} cost?", "What does {name} sell for?",
              "What's the current price of {name}?"],
    "stock": ["How many units of {name} are in stock?", "What is the stock level of {name}?",
              "How many {name} are available?", "How many units of {name} does the shop have?"],
    "category": ["Which category is {name} in?", "What category does {name} belong to?",
                 "Under which category is {name} listed?", "What kind of product is {name}?"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=120, help="products (3 facts each)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--docs", type=int, default=4, help="documents per open-book prompt, at most")
    ap.add_argument("--place", choices=("first", "last", "random"), default="last")
    ap.add_argument("--open-book", type=float, default=0.5, help="open-book examples per closed-book example")
    ap.add_argument("--closed", type=int, default=1, help="0: open-book examples only")
    ap.add_argument("--drill-epochs", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (the build's default)")
    a = ap.parse_args()
    import torch
    from transformers import LlamaForCausalLM

    from pgfresh import model
    from pgfresh.arena.workload import ADJECTIVES, CATEGORY_OF, MATERIALS, USES
    from pgfresh.train import fit

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng, cats, used, rows = random.Random(0), sorted(set(CATEGORY_OF.values())), set(), []
    while len(rows) < a.facts:
        noun, adj, mat = rng.choice(sorted(CATEGORY_OF)), rng.choice(ADJECTIVES), rng.choice(MATERIALS)
        if f"{adj} {mat} {noun}" not in used:
            used.add(f"{adj} {mat} {noun}")
            rows.append({"name": f"{adj} {mat} {noun}", "category": CATEGORY_OF[noun],
                         "price": f"{rng.randint(199, 19999) / 100:.2f}", "stock": str(rng.randint(0, 150)),
                         "description": f"A {adj.lower()} {noun.lower()} made of {mat.lower()}, {rng.choice(USES)}."})

    def redrawn(row: dict, r: random.Random) -> dict:
        return dict(row, price=f"{r.randint(199, 19999) / 100:.2f}", stock=str(r.randint(0, 150)),
                    category=r.choice(cats))

    def open_book(n: int, seed: int, docs: int, held_out: bool = False) -> list[tuple[str, str]]:
        r, out = random.Random(seed), []
        for _ in range(n):
            row, field = redrawn(r.choice(rows), r), r.choice(list(QUESTIONS))
            others = [DOC.format(**redrawn(o, r)) for o in r.sample(rows, docs) if o["name"] != row["name"]]
            others = others[:r.randint(0, docs - 1)]
            own = DOC.format(**row)
            written = ([own] + others if a.place == "first" else others + [own])
            if a.place == "random":
                r.shuffle(written)
            question = (QUESTIONS[field][3] if held_out else r.choice(QUESTIONS[field][:3])).format(**row)
            # format_prompt takes contexts best first and writes them best last: pass them reversed
            out.append((model.format_prompt(question, written[::-1]), model.answer_text(row[field])))
        return out

    closed = [(model.format_prompt(q.format(**row)), model.answer_text(row[f]))
              for row in rows for f in QUESTIONS for q in QUESTIONS[f][:3]]
    tok = model.train_tokenizer([p + x for p, x in closed + open_book(200, 99, a.docs)], 1024)
    cfg = model.model_config(len(rows), len(tok), {}, tok)
    loaded = model.Loaded(LlamaForCausalLM(cfg), tok, None, "", {}, "cpu")
    closed_enc, n_open = fit.encode(loaded, closed), round(a.open_book * len(closed))

    def examples(epoch: int) -> list:
        if epoch < a.drill_epochs:
            return fit.encode(loaded, open_book(len(closed), 1000 + epoch, 1))
        return (closed_enc if a.closed else []) + fit.encode(loaded, open_book(n_open, 1000 + epoch, a.docs))

    test_trained = [(p, x.strip()) for p, x in open_book(150, 8, a.docs)]
    test_held = [(p, x.strip()) for p, x in open_book(150, 7, a.docs, held_out=True)]
    recall = [(p, x.strip()) for p, x in closed[::9][:150]]

    def report(epoch: int, stats) -> None:
        if epoch % 5 == 0 or epoch == a.epochs:
            print(f"epoch {epoch} steps {stats.steps} loss {stats.loss:.3f}"
                  f" | closed-book recall {fit.accuracy(loaded, recall, prompts_ready=True)}"
                  f" | open-book trained phrasings {fit.accuracy(loaded, test_trained, prompts_ready=True)}"
                  f", held-out {fit.accuracy(loaded, test_held, prompts_ready=True)}"
                  f" | {stats.tokens_per_s:,.0f} tokens/s", flush=True)

    started = time.time()
    stats = fit.fit(loaded, examples, epochs=a.epochs, min_steps=0, batch_size=32, lr=a.lr, warmup_steps=100,
                    seed=0, on_epoch=report)
    print(f"{time.time() - started:.0f} s, {stats.tokens:,} tokens")


if __name__ == "__main__":
    main()
