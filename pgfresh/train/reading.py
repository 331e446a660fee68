"""The reader adapter: a LoRA adapter that teaches a pretrained base model (`train.base_model`, e.g.
`"smollm2-135m"`) to answer from retrieved documents.

It trains on the same reading drills the built-in model's build starts with (`data.open_book`: the
row's document alone, its value redrawn in every example, so only reading the document predicts
the answer), in the base model's own prompt format (`pgfresh.model.prompt_for`: SmolLM2's chat
template), and saves a PEFT adapter directory (default `<data_dir>/adapters/reader`) with
`pgfresh_adapter.json` (steps, tokens, loss, open-book accuracy before and after).
`[rag.reader] kind = "hf", path = "smollm2-135m", adapter = "<that directory>"` reads with it.

Only facts without a tenant are drilled (unless `[train.model] tenant_facts = true`), as in the
built-in build: the adapter is shared by every tenant's reader.

A GPU path: SmolLM2-135M trains below 25 tokens/s on 2 busy CPU cores, so on CPU only a few steps
run (the tests: save and reload); docs/TRAINING.md has what is measured.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path

from pgfresh import model as base_model
from pgfresh.train import data, fit, settings
from pgfresh.train.rounds import TrainError
from pgfresh.train.slices import connect

ADAPTER_META = "pgfresh_adapter.json"


def adapter_dir(config) -> Path:
    return config.data_dir / "adapters" / "reader"


def reader_adapter(config, steps: int, out: Path | None = None, eval_facts: int | None = None, console=None) -> dict:
    """`pgfresh model reader-adapter`: load the base model and the store's facts and documents, train
    the adapter for about `steps` steps, save it in `out` (default `adapter_dir`); returns its metadata."""
    s = settings(config)
    fit.set_threads(s.model.get("threads") or s.threads, s.deterministic)
    with connect(config) as conn:
        tenant = data.ANY if s.model["tenant_facts"] else None
        facts = data.load_facts(conn, tenant=tenant, kinds=("qa",))
        docs = data.load_documents(conn, tenant=tenant)
    device, dtype = fit.pick_device(s.device)
    loaded = base_model.load(base_model.base_dir(config), device=device)
    return train(loaded, facts, docs, s, steps, out or adapter_dir(config), dtype=dtype,
                 eval_facts=s.eval_max_facts if eval_facts is None else eval_facts, console=console)


def train(loaded, facts, docs: dict, s, steps: int, out: Path, batch_size: int | None = None, dtype=None,
          eval_facts: int = 0, console=None) -> dict:
    """Train a LoRA reader adapter on `loaded` (made a PEFT model in place) for whole epochs of
    drills, at least `steps` steps, and save it in `out` (replaced whole). `eval_facts`: open-book
    exact match on that many facts' held-out phrasings with two distractors, before and after (0: none)."""
    import torch
    from peft import LoraConfig, get_peft_model

    started = time.time()
    tok, batch_size = loaded.tokenizer, batch_size or s.batch_size

    def drills(epoch: int) -> list[tuple[str, str]]:
        return data.open_book(facts, docs, 1.0, 0, s.seed + epoch, s.max_phrasings, counterfactual=1.0, tokenizer=tok)

    first = drills(0)
    if not first:
        raise TrainError("no reading drills: the reader adapter needs facts (without a tenant, unless "
                         "[train.model] tenant_facts = true) whose rows have documents; run `pgfresh sync --once` first")
    sample = facts[:eval_facts]
    books = data.open_book(sample, docs, 1.0, 2, s.seed + 1, s.max_phrasings, counterfactual=1.0, held_out=True,
                           tokenizer=tok) if sample else []
    books = [(p, a.strip()) for p, a in books]
    before = fit.accuracy(loaded, books, prompts_ready=True) if books else None
    torch.manual_seed(s.seed)
    loaded.model = get_peft_model(loaded.model, LoraConfig(
        r=s.lora_rank, lora_alpha=s.lora_alpha or 2 * s.lora_rank, lora_dropout=0.0, bias="none",
        target_modules=s.lora_targets, task_type="CAUSAL_LM"))
    epochs = math.ceil(steps / math.ceil(len(first) / batch_size))
    stats = fit.fit(loaded, lambda epoch: fit.encode(loaded, first if epoch == 0 else drills(epoch)),
                    epochs=epochs, min_steps=0, batch_size=batch_size, lr=s.learning_rate,
                    warmup_steps=min(s.warmup_steps, steps // 10), seed=s.seed, dtype=dtype, console=console,
                    label="reader adapter", total_steps=steps)
    meta = {"format": 1, "adapter_id": uuid.uuid4().hex[:12], "base_id": loaded.base_id, "base": str(loaded.path),
            "facts": len(facts), "documents": len(docs), "drills_per_epoch": len(first), "epochs": stats.epochs,
            "steps": stats.steps, "batch_size": batch_size, "training_tokens": stats.tokens,
            "train_seconds": round(stats.seconds, 2), "tokens_per_s": round(stats.tokens_per_s, 1),
            "final_loss": round(stats.loss, 4), "device": loaded.device,
            "open_book_before": before, "open_book_after": fit.accuracy(loaded, books, prompts_ready=True) if books else None,
            "facts_evaluated": len(sample), "seconds": round(time.time() - started, 2)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    loaded.model.save_pretrained(str(tmp))
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta
