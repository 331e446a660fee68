"""The training loop and exact-match evaluation, shared by `model build` and training rounds.

Knowledge injection is sample-hungry, so the loop is built for throughput on short sequences:
each example is one question/answer pair (prompt tokens, answer tokens, EOS); the loss is on the
answer tokens only, and the output layer runs only at those positions; a batch runs as
micro-batches of examples of about one length, each padded to its longest, their gradients summed
before the step (closed-book questions are ~30 tokens, open-book prompts ~120: one padded batch
was mostly padding, `FitStats.padding_share`; the step is the same, the padding is not computed);
the learning rate warms up, stays high, and decays on a cosine to 10%.

The same code runs on CPU (float32, `threads` cores) and CUDA (bf16 autocast) through
`accelerate`; under `accelerate launch` each process takes its share of every batch and the
gradients are averaged across processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

from pgfresh.model import Loaded, generate, prompt_for


@dataclass
class FitStats:
    tokens: int = 0  # non-padding tokens processed (this process)
    positions: int = 0  # token positions computed, padding included
    seconds: float = 0.0
    steps: int = 0
    epochs: int = 0
    loss: float = float("nan")
    per_epoch: list = field(default_factory=list)  # what `on_epoch` returned, per epoch

    @property
    def padding_share(self) -> float:
        return 1 - self.tokens / self.positions if self.positions else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def set_threads(threads: int, deterministic: bool = False) -> None:
    """Use `threads` CPU threads. OpenMP's default spin-waiting makes a tiny model train 5x slower
    when the cores are shared (measured: 1.8k vs 8.3k tokens/s on 2 busy cores), so unless torch
    is already loaded, its threads sleep when idle.

    `deterministic`: only algorithms that give the same result every run (torch raises where an
    operation has none). With every sampler seeded (data order, replay, probe, LoRA init), one
    thread and this, a run repeats exactly on the same machine and library versions; another CPU
    (other vector instructions) or other versions still round differently, so tests assert
    properties with margin, not figures (docs/TRAINING.md)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
        torch.use_deterministic_algorithms(True)


def pick_device(setting: str = "auto"):
    """('cuda' | 'cpu', autocast dtype or None): bf16 on a GPU that has it."""
    import torch

    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", None


def encode(loaded: Loaded, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per (prompt, answer) pair; long prompts lose their start."""
    tok = loaded.tokenizer
    prompts = tok([p for p, _ in pairs])["input_ids"] if pairs else []
    answers = tok([a for _, a in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    limit = getattr(loaded.model.config, "max_position_embeddings", 1024)
    out = []
    for p, a in zip(prompts, answers):
        a = a + [loaded.eos_id]
        p = p[-(limit - len(a)):]
        out.append((p + a, len(p)))
    return out


def answer_loss(lm):
    """A module computing cross-entropy on answer tokens only, with logits only where there is a label.

    A module (not a function) so that `accelerate` can wrap it for distributed training.
    """
    import torch

    class AnswerLoss(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids, mask, labels):
            hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            target = labels[:, 1:]
            keep = target != -100
            logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])
            return torch.nn.functional.cross_entropy(logits.float(), target[keep])

    return AnswerLoss(lm)


MICRO_RATIO = 1.5  # a micro-batch takes examples up to this many times its shortest one's length


def micro_batches(examples: list) -> list[list]:
    """`examples` (one step's) by length, cut where an example is MICRO_RATIO times longer than the
    shortest of its micro-batch. Right padding never changes a causal model's results, so the step
    is what one padded batch would compute."""
    out: list[list] = []
    for ex in sorted(examples, key=lambda e: len(e[0])):
        if out and len(ex[0]) <= MICRO_RATIO * len(out[-1][0][0]):
            out[-1].append(ex)
        else:
            out.append([ex])
    return out


def backward(acc, loss_fn, examples: list, pad_id: int):
    """Gradients of one step's loss, the mean over all its answer tokens, micro-batch by micro-batch
    (each one's mean weighted by its share of the answer tokens). Returns (loss, tokens, positions
    computed: tokens and padding)."""
    answers = sum(len(seq) - n for seq, n in examples)
    parts, loss, tokens, positions = micro_batches(examples), 0.0, 0, 0
    for j, part in enumerate(parts):
        ids, mask, labels = _batch(part, pad_id, acc.device)
        with acc.no_sync(loss_fn) if j < len(parts) - 1 else contextlib.nullcontext():  # one all-reduce per step
            part_loss = loss_fn(ids, mask, labels) * (sum(len(seq) - n for seq, n in part) / answers)
            acc.backward(part_loss)
        loss += part_loss.detach()
        tokens += int(mask.sum())
        positions += mask.numel()
    return loss, tokens, positions


def _batch(examples, pad_id: int, device: str):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(examples):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
        mask[i, :len(seq)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def fit(loaded: Loaded, examples: list, *, epochs: int, min_steps: int, batch_size: int, lr: float,
        warmup_steps: int, seed: int, dtype=None, console=None, label: str = "training", on_epoch=None,
        should_stop=None, stop_loss: float | None = None, total_steps: int | None = None) -> FitStats:
    """Train the model's trainable parameters on `examples` (from `encode`); returns throughput and loss.

    `examples` may be a function of the epoch number returning that epoch's examples (a round draws
    a fresh replay sample each epoch); every epoch should have about as many.

    `total_steps`: the schedule's length when epochs differ in size (default: epochs x the first's).

    `stop_loss`: stop after the first epoch (past `min_steps`) whose mean loss is below it: a round
    trains until its facts are learnt and no further, because every extra step erodes other facts.
    """
    import torch
    from accelerate import Accelerator

    epoch_examples = examples if callable(examples) else (lambda epoch: examples)
    examples = epoch_examples(0)
    if not examples:
        return FitStats()
    acc = Accelerator(mixed_precision="bf16" if dtype is not None and loaded.device == "cuda" else "no",
                      cpu=loaded.device == "cpu")
    per_epoch = math.ceil(len(examples) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / per_epoch))
    total = max(total_steps or 0, epochs * per_epoch)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    # the scheduler stays unprepared: accelerate would step it once per process per step, since it
    # assumes each process sees 1/N of the batches; here each process takes 1/N of every batch
    loss_fn, opt = acc.prepare(answer_loss(loaded.model), opt)
    loaded.model.train()
    rng, stats = random.Random(seed), FitStats(epochs=epochs)
    with _progress(console, label, total) as bar:
        started = time.perf_counter()
        for epoch in range(epochs):
            examples = examples if epoch == 0 else epoch_examples(epoch)
            order = list(range(len(examples)))
            rng.shuffle(order)
            epoch_loss, epoch_steps = 0.0, 0
            for b in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[b:b + batch_size]]
                mine = chunk[acc.process_index::acc.num_processes] or chunk[:1]
                loss, tokens, positions = backward(acc, loss_fn, mine, loaded.pad_id)
                stats.tokens += tokens
                stats.positions += positions
                acc.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                stats.steps += 1
                epoch_loss, epoch_steps = epoch_loss + loss.item(), epoch_steps + 1
                if stats.steps % 10 == 0 or stats.steps == total:
                    stats.loss = loss.item()
                    stats.seconds = time.perf_counter() - started
                    bar(stats)
                if should_stop is not None and should_stop():
                    raise InterruptedError(f"{label} stopped")
            if on_epoch is not None:
                paused = time.perf_counter()
                stats.per_epoch.append(on_epoch(epoch + 1, stats))
                loaded.model.train()
                started += time.perf_counter() - paused  # evaluation time is not training time
            if stop_loss is not None and stats.steps >= min_steps and epoch_loss / epoch_steps < stop_loss:
                stats.epochs = epoch + 1
                break
        stats.seconds = time.perf_counter() - started
        stats.loss = loss.item()
    loaded.model.eval()
    return stats


class _progress:
    """A rich progress bar (steps, loss, tokens/s, ETA) on `console`; nothing when console is None."""

    def __init__(self, console, label: str, total: int):
        self.console, self.label, self.total, self.progress = console, label, total, None

    def __enter__(self):
        if self.console is None:
            return lambda stats: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        task = self.progress.add_task(self.label, total=self.total, loss=float("nan"), tps=0.0)
        return lambda stats: self.progress.update(task, completed=stats.steps, loss=stats.loss, tps=stats.tokens_per_s)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()


def normalize(answer: str) -> str:
    """What exact match compares: case, surrounding space and a final full stop do not count."""
    return " ".join(answer.split()).casefold().rstrip(".").strip()


def predict(loaded: Loaded, prompts: list[str], answers_hint: list[str] | None = None) -> list[str]:
    """Greedy answers; with `answers_hint`, generation stops a few tokens past the longest expected answer."""
    max_new = 32
    if answers_hint:
        max_new = max(len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers_hint) + 3
    return generate(loaded, prompts, max_new_tokens=max_new)


def accuracy(loaded: Loaded, pairs: list[tuple[str, str]], prompts_ready: bool = False) -> float | None:
    """Exact-match accuracy of (question, answer) pairs (or (prompt, answer) when `prompts_ready`)."""
    if not pairs:
        return None
    prompts = [q if prompts_ready else prompt_for(loaded, q) for q, _ in pairs]
    got = predict(loaded, prompts, [" " + a for _, a in pairs])
    return round(sum(normalize(g) == normalize(a) for g, (_, a) in zip(got, pairs)) / len(pairs), 4)


def correct(loaded: Loaded, pairs: list[tuple[str, str]]) -> list[bool]:
    """Per (question, answer) pair: is the greedy answer right?"""
    if not pairs:
        return []
    got = predict(loaded, [prompt_for(loaded, q) for q, _ in pairs], [" " + a for _, a in pairs])
    return [normalize(g) == normalize(a) for g, (_, a) in zip(got, pairs)]
