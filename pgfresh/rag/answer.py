"""`ask`: kept for callers of `pgfresh.rag.ask`; the one answer path is `pgfresh.serve.answer`.

The retrieval, cache and reader steps of an open-book answer moved to pgfresh.serve.answer with
the `tuned` and `hybrid` modes, so the CLI, the HTTP API and the arena run the same code. This
shim forwards (a later stage importing an earlier one is the wrong direction: new code calls
`pgfresh.serve.answer` directly).
"""

from __future__ import annotations

ASK_MODES = ("rag", "tuned", "hybrid")


def ask(config, question: str, tenant: str | None = None, mode: str = "rag", *, k: int | None = None,
        environ: dict | None = None) -> dict:
    """`pgfresh.serve.answer` with rag's old keyword arguments."""
    from pgfresh.serve import Options, answer

    return answer(config, question, tenant, mode, options=Options(k=k, environ=environ))
