"""train: continual fine-tuning of model slices from the facts `render` writes.

A *slice* is one lineage of model versions per tenant (facts without a tenant go to the shared
slice `_shared`; a tenant's slice is named after it, with one more `_` in front when the tenant
starts with `_`, so no tenant value can take the shared slice's name: `slice_of`). Version 0 of
a lineage is the base model (with the facts the built-in model learnt); each round trains a LoRA
adapter (or, `method = "full"`, all weights of the tiny built-in model) on top of the published
version: the new and changed facts in their training phrasings,
explicit updates for superseded facts, and a replay sample of unchanged ones. A gate evaluates
the candidate on held-out phrasings (never trained on) and publishes it or records why not.

Promises: a fact is marked trained only in the transaction that publishes the version that
learnt it; `kill -9` at any point leaves the published version untouched and the next round
redoes the work; a slice trains only on its own tenant's facts; a question without a tenant is
refused where tables declare a tenant column (as `search` refuses it).

Entry points: `run` (`pgfresh train [--once]`), `list_slices`, `rollback`,
`check_config` (the `[train]` section). Heavy imports (torch, transformers, peft) stay inside
functions so loading the config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pgfresh.configtypes import Spec, check_section, choice, integer, number

SHARED = "_shared"  # the slice of facts without a tenant (no tenant value maps to it: slice_of)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MODEL_DEFAULTS = {
    "hidden": None,  # None: sized for the number of facts (128 up to 1k facts, 256 to 10k, then 384)
    "layers": None,
    "heads": None,
    "vocab_size": 1024,
    "epochs": 30,  # passes over the facts (each in every training phrasing)
    "min_steps": 400,  # few facts still get enough optimizer steps to get past the plateau
    "batch_size": 32,
    "learning_rate": 2e-3,
    "warmup_steps": 100,
    "reading_steps": 300,  # first: optimizer steps of reading drills (one document, values drawn afresh)
    "open_book_ratio": 0.5,  # open-book examples per closed-book example
    "distractors": 3,  # at most this many distractor documents per open-book example (0 to 3: k = 4 at most)
    "tenant_facts": False,  # learn tenants' facts into the shared base (breaks tenant isolation)
    "threads": None,  # CPU threads of the build (None: train.threads); it runs before any round does
    # a build is kept here under the hash of what it is a function of (facts, documents, these
    # settings, the build's code and library versions) and copied instead of rebuilt; "": never
    "cache_dir": "~/.cache/pgfresh/models",
}


@dataclass
class Settings:
    base_model: str | None = None  # a local HF causal-LM directory; None: the built-in model
    method: str = "lora"  # lora | full (full: every weight, sensible only for the tiny built-in model)
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: 2 x rank
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    learning_rate: float = 3e-3  # measured with bench/rounds.py (docs/BENCHMARKS.md): 1e-3 learnt 17-42% of a small round
    epochs: int = 30  # at most this many passes over a round's examples (see stop_loss)
    min_steps: int = 150  # a round of a few facts is 2 batches an epoch: 60 steps learnt almost none of them
    stop_loss: float | None = 0.05  # stop once an epoch's mean answer loss is below this (facts learnt)
    batch_size: int = 32
    warmup_steps: int = 10
    replay_ratio: float = 0.10  # share of the slice's unchanged known facts replayed each epoch ...
    replay_per_new: float = 1.0  # ... or at least this many per fact the round learns (the larger; 0: off; swept in docs/TRAINING.md)
    replay_max: int = 2000  # at most this many replay facts per round
    min_new_facts: int = 10  # a round starts when this many facts wait ...
    max_wait_seconds: float = 300.0  # ... or the oldest waiting fact is this old
    poll_seconds: float = 5.0
    max_facts_per_round: int = 5000
    max_phrasings: int = 6  # training phrasings per fact (canonical + paraphrases); one more is held out
    probe_size: int = 100  # probe set of known facts, per slice (forgetting): every known fact in smaller slices
    gate_min_new_accuracy: float = 0.6  # held-out accuracy on the round's new facts needed to publish
    gate_max_forgetting: float = 0.3  # share of probe answers the parent got right and the candidate lost
    gate_max_stale_rate: float = 1.0  # share of changed facts still answered with the superseded value
    unknown_answer: str = "unknown"  # taught for a deleted row's questions when it has no `gone` template
    eval_max_facts: int = 500
    seed: int = 0
    threads: int = 2  # CPU threads for torch
    deterministic: bool = False  # true: torch.use_deterministic_algorithms (same machine, same results; slower on GPUs)
    device: str = "auto"  # auto | cpu | cuda
    model: dict = field(default_factory=lambda: dict(MODEL_DEFAULTS))


_MODULES = (list, lambda v: bool(v) and all(isinstance(x, str) and x for x in v), "a non-empty list of module names")
_RATE = number(0, 1, above=True)  # a learning rate
_FRACTION = number(0, 1)
_SPEC: Spec = {
    "base_model": (str, None, "a string"), "method": choice("lora", "full"),
    "lora_rank": integer(1, 1024), "lora_alpha": number(0), "lora_targets": _MODULES,
    "learning_rate": _RATE, "epochs": integer(1, 100_000), "min_steps": integer(0, 10**9),
    "stop_loss": number(0), "batch_size": integer(1, 65536), "warmup_steps": integer(0, 10**9),
    "replay_ratio": _FRACTION, "replay_per_new": number(0, 100), "replay_max": integer(0, 10**9),
    "min_new_facts": integer(1, 10**9), "max_wait_seconds": number(0), "poll_seconds": number(0),
    "max_facts_per_round": integer(1, 10**9), "max_phrasings": integer(1, 1000), "probe_size": integer(0, 10**6),
    "gate_min_new_accuracy": _FRACTION, "gate_max_forgetting": _FRACTION, "gate_max_stale_rate": _FRACTION,
    "unknown_answer": (str, None, "a string"), "eval_max_facts": integer(1, 10**9), "seed": integer(0, 2**31),
    "threads": integer(1, 1024), "deterministic": (bool, None, "true or false"), "device": choice("auto", "cpu", "cuda"),
    "model": (dict, None, "a table ([train.model])"),
}
_MODEL_SPEC: Spec = {
    "hidden": integer(16, 8192), "layers": integer(1, 128), "heads": integer(1, 128), "vocab_size": integer(300, 10**6),
    "epochs": integer(1, 100_000), "min_steps": integer(0, 10**9), "batch_size": integer(1, 65536),
    "learning_rate": _RATE, "warmup_steps": integer(0, 10**9), "open_book_ratio": number(0, 100),
    "distractors": integer(0, 20), "tenant_facts": (bool, None, "true or false"), "reading_steps": integer(0, 10**9),
    "cache_dir": (str, None, "a string"), "threads": integer(1, 1024),
}


def check_config(config) -> list[str]:
    """Every problem in `[train]` (and `[train.model]`), each starting with its key path."""
    problems: list[str] = []
    good = check_section(config.train, "train", _SPEC, problems)
    if "model" in good:
        check_section(good["model"], "train.model", _MODEL_SPEC, problems)
    return problems


def settings(config) -> Settings:
    """The `[train]` section with defaults filled in (already validated by check_config)."""
    raw = dict(config.train)
    model = {**MODEL_DEFAULTS, **raw.pop("model", {})}
    known = {f.name for f in fields(Settings)}
    s = Settings(**{k: v for k, v in raw.items() if k in known})
    s.model = {k: v for k, v in model.items() if v is not None}
    return s


def slice_of(tenant: str | None) -> str:
    """The slice that holds a tenant's facts: the tenant itself, `_` + the tenant when it starts with
    `_`, and `SHARED` for facts without a tenant. One-to-one, and no tenant maps to a name that starts
    with a single `_` (migration 008 renamed the slices of existing installations to match)."""
    if tenant is None:
        return SHARED
    tenant = str(tenant)
    return "_" + tenant if tenant.startswith("_") else tenant


def run(config, once: bool = False, console=None, due_only: bool = False) -> list[dict] | None:
    """`pgfresh train`: rounds as facts arrive (`once`: one round per slice with waiting facts;
    with `due_only`, only where enough facts wait or the oldest waited long enough)."""
    from pgfresh.train import rounds

    return rounds.run(config, once=once, console=console, due_only=due_only)


def list_slices(config, tenant: str | None = None) -> list[dict]:
    from pgfresh.train import slices

    return slices.list_versions(config, tenant)


def rollback(config, tenant: str, version: int) -> dict:
    from pgfresh.train import slices

    return slices.rollback(config, tenant, version)
