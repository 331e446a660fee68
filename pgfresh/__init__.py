"""pgfresh: keep LLM applications fresh with live PostgreSQL data, and measure RAG against training.

The stages, one module each, in data-flow order: `capture` -> `gate` -> `render` -> `rag` / `train`
-> `serve`; `arena` drives them all against a live workload. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
