"""Readers: the language model that turns retrieved documents into an answer.

One interface, `generate(prompt, max_new_tokens) -> str`, and an `id` naming the model (the answer
cache keys on it). Built-ins, chosen by `[rag.reader] kind`:
- `openai`: any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp server, ...):
  `base_url`, `model`, and the *name* of the environment variable holding the API key.
- `hf`: a local Hugging Face causal-LM directory loaded with transformers (greedy decoding), e.g.
  the built-in model the training stage writes, or a model pgfresh resolves by name
  (`path = "smollm2-135m"`: `pgfresh.model.NAMED`, converted once into `<data_dir>/models`). Its
  prompt is `pgfresh.model.prompt_for` of its tokenizer: the chat template when the tokenizer has
  one (unless `chat = false`), else the built-in format. `adapter`: a PEFT adapter directory loaded
  on top (the reader adapter, `pgfresh model reader-adapter`).
- `builtin`: the base model (`train.base_model` or the built-in one) with its own prompt format,
  loaded by the serve registry (pgfresh.serve.registry).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from pgfresh import model as base_model
from pgfresh.configtypes import check_section, choice, integer, number
from pgfresh.errors import PgfreshError

KINDS = ("openai", "hf", "builtin")


class ReaderError(PgfreshError):
    """The reader failed (endpoint unreachable, bad reply, model directory unusable)."""


class Reader(Protocol):
    id: str

    def generate(self, prompt: str, max_new_tokens: int) -> str: ...


class OpenAIReader:
    """Chat completions over HTTP, temperature 0."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_seconds: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout_seconds
        self.id = f"openai:{base_url.rstrip('/')}:{model}"

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_new_tokens, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ReaderError(f"reader {self.url} answered HTTP {exc.code}: {exc.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ReaderError(f"reader {self.url} is unreachable ({exc}); check rag.reader.base_url") from None
        try:
            return reply["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError):
            raise ReaderError(f"reader {self.url} sent no choices[0].message.content: {str(reply)[:200]}") from None


class HFReader:
    """A local causal LM directory. `generate` takes the prompt as ready text; `prompt_tokenizer` is
    what `pgfresh.model.prompt_for` writes it for: the tokenizer (its chat template, if it has one),
    or None (`chat = false`: the built-in format, as raw text)."""

    def __init__(self, path: str | Path, chat: bool | None = None, device: str = "cpu", adapter: str | Path | None = None):
        path = Path(path).expanduser().resolve()
        if not (path / "config.json").exists():
            raise ReaderError(f"{path} is not a Hugging Face model directory (no config.json); check rag.reader.path")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path))
        self.id = f"hf:{path}"
        if adapter is not None:
            adapter = Path(adapter).expanduser().resolve()
            if not (adapter / "adapter_config.json").exists():
                raise ReaderError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json); check rag.reader.adapter")
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(adapter))
            self.id += f"+{adapter}"
        self.model = self.model.to(device).eval()
        self.device = device
        self.prompt_tokenizer = None if chat is False else self.tokenizer

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def build(spec: dict, base_dir: Path | None = None, environ: dict | None = None, data_dir: Path | None = None) -> Reader:
    """A new `openai` or `hf` reader for `[rag.reader]` (`builtin` is loaded by pgfresh.serve.registry,
    which also keeps the readers it builds: this function caches nothing).

    A relative `path` is relative to `base_dir` (pgfresh.toml's directory); a `path` that names a
    model in `pgfresh.model.NAMED` is converted once into `data_dir` (ModelError in one line, with
    the pip command, when its wheel is missing); the API key is read from the environment variable
    the config names, here at the edge.
    """
    environ = os.environ if environ is None else environ
    if spec.get("kind", "openai") == "openai":
        env = spec.get("api_key_env")
        return OpenAIReader(spec["base_url"], spec["model"], environ.get(env) if env else None,
                            float(spec.get("timeout_seconds", 60)))

    def local(p: str) -> Path:
        p = Path(p).expanduser()
        return Path(base_dir) / p if not p.is_absolute() and base_dir is not None else p

    if spec["path"] in base_model.NAMED:
        if data_dir is None:
            raise ReaderError(f"rag.reader.path = {spec['path']!r}: a named model needs the data directory to convert it into")
        path = base_model.named_dir(data_dir, spec["path"], setting="rag.reader.path")
    else:
        path = local(spec["path"])
    adapter = local(spec["adapter"]) if spec.get("adapter") else None
    return HFReader(path, chat=spec.get("chat"), device=spec.get("device", "cpu"), adapter=adapter)


_SPECS = {  # per kind (configtypes.check_section)
    "openai": {"kind": choice(*KINDS), "base_url": (str, bool, "a URL (http://host:port/v1)"),
               "model": (str, bool, "the server's model name"),
               "api_key_env": (str, bool, "the NAME of an environment variable holding the key"),
               "timeout_seconds": number(0, above=True, unit="seconds"), "max_new_tokens": integer(1)},
    "hf": {"kind": choice(*KINDS), "path": (str, bool, "a local causal-LM directory or a named model (smollm2-135m)"),
           "chat": (bool, None, "true or false"), "device": (str, bool, "a torch device (cpu, cuda, cuda:1)"),
           "adapter": (str, bool, "a PEFT adapter directory"), "max_new_tokens": integer(1)},
    "builtin": {"kind": choice(*KINDS), "max_new_tokens": integer(1)},
}
_REQUIRED = {"openai": ("base_url", "model"), "hf": ("path",), "builtin": ()}


def check(spec, problems: list[str]) -> None:
    """Validate `[rag.reader]` (called by pgfresh.rag.check_config): every problem at once."""
    if not isinstance(spec, dict):
        problems.append("rag.reader: expected a table ([rag.reader]) with kind = 'openai' or 'hf'")
        return
    kind = spec.get("kind", "openai")
    if kind not in KINDS:
        problems.append(f"rag.reader.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        return
    check_section(spec, "rag.reader", _SPECS[kind], problems)
    problems += [f"rag.reader.{k}: required for kind {kind!r} (a string)" for k in _REQUIRED[kind] if k not in spec]
