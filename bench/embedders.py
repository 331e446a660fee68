"""Embedding speed against retrieval quality, for every way pgfresh can embed on a CPU.

For each variant: sentences/s embedding the generated product documents (pgfresh.rag.evalset),
and hit@1 / hit@5 of dense retrieval (exact cosine, in numpy: this measures the embedding, not the
index) on the set's 2 questions per product, split by question class (`name`, `describe`).

Variants: MiniLM fp32 (1 and 2 threads, several batch sizes), MiniLM with int8 dynamic quantisation
of its Linear layers, and the static embedding distilled from MiniLM (built on first use, ~1 min).

Run: .venv/bin/python bench/embedders.py [--products 640] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgfresh.rag import embed, evalset  # noqa: E402


def hit_rates(doc_vecs: np.ndarray, q_vecs: np.ndarray, questions: list, ids: list[int]) -> dict:
    sims = q_vecs @ doc_vecs.T
    order = np.argsort(-sims, axis=1)[:, :5]
    out = {}
    for cls in ("name", "describe", "all"):
        rows = [i for i, q in enumerate(questions) if cls == "all" or q[2] == cls]
        h1 = np.mean([ids[order[i, 0]] == questions[i][1] for i in rows])
        h5 = np.mean([questions[i][1] in {ids[j] for j in order[i]} for i in rows])
        out[cls] = (round(float(h1), 3), round(float(h5), 3))
    return out


def timed(fn, texts: list[str]) -> tuple[np.ndarray, float]:
    fn(texts[:8])  # warm up (first call allocates)
    t = time.perf_counter()
    v = fn(texts)
    return v, len(texts) / (time.perf_counter() - t)


VARIANTS = {
    "fp32-t1-b16": "minilm fp32 threads=1 batch=16",
    "fp32-t1-b64": "minilm fp32 threads=1 batch=64",
    "fp32-t1-b256": "minilm fp32 threads=1 batch=256",
    "fp32-t2-b64": "minilm fp32 threads=2 batch=64",
    "int8-t1": "minilm int8 dynamic threads=1",
    "static": "static-minilm (distilled)",
}


def embedder_for(variant: str, data_dir: Path):
    if variant.startswith("fp32"):
        _, t, b = variant.split("-")
        return embed.load({"embed_threads": int(t[1:]), "embed_batch": int(b[1:])}, data_dir).embed
    if variant == "int8-t1":
        import torch

        base = embed.load({"embed_threads": 1, "embed_batch": 64}, data_dir)
        quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base.model), {torch.nn.Linear}, dtype=torch.qint8)
        return lambda ts: quant.encode(ts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                       show_progress_bar=False)
    t = time.perf_counter()
    static = embed.load({"embedder": "static-minilm", "embed_threads": 1}, data_dir)
    print(f"(static-minilm matrix ready in {time.perf_counter() - t:.1f} s: distilled once, then loaded)")
    return static.embed


def run_variant(variant: str, n_products: int, data_dir: Path) -> None:
    rows = evalset.products(n_products, seed=1)
    docs = [evalset.render(r) for r in rows]
    ids = [r["id"] for r in rows]
    questions = evalset.questions(rows, seed=1)
    fn = embedder_for(variant, data_dir)
    dv, rate = timed(fn, docs)
    t = time.perf_counter()
    for q, _, _ in questions[:50]:
        fn([q])
    single = (time.perf_counter() - t) / 50 * 1000
    h = hit_rates(dv, fn([q[0] for q in questions]), questions, ids)
    print(f"{VARIANTS[variant]:34} {rate:8.1f} {single:11.2f}  {h['name']} | {h['describe']} | {h['all']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--products", type=int, default=640, help="documents (at most 640: unique descriptions)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--data-dir", default=None, help="where the distilled static matrix is kept (default: a temp dir)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = ap.parse_args()
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="pgfresh-emb-"))
    if args.one:
        run_variant(args.one, args.products, data_dir)
        return
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.products} documents, "
          f"{2 * args.products} questions")
    print(f"{'variant':34} {'docs/s':>8} {'single q ms':>11}  hit@1/hit@5 name | describe | all", flush=True)
    for v in args.variants.split(","):
        # One process per variant: torch's thread count is process-wide, and a fresh process measures
        # each variant without the previous one's threads or caches.
        subprocess.run([sys.executable, __file__, "--one", v, "--products", str(args.products),
                        "--data-dir", str(data_dir)], check=True)


if __name__ == "__main__":
    main()
