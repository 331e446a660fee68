"""serve: one answer path behind the CLI, the OpenAI-compatible HTTP API, the dashboard and the arena.

Public entry points:
- `answer(config, question, tenant, mode, options=, registry=)` (pgfresh.serve.answer): modes rag,
  tuned and hybrid; the answer, the route and why, the source rows with LSNs, the slice version,
  cache hit or miss, timings per step;
- `search(config, text, tenant, k, mode, registry=)`: the documents, as `pgfresh search`;
- `Registry` (pgfresh.serve.registry): owns loaded readers, base models, slices, embedders and
  cross-encoders (a bounded `rag.models.Models`) and connections;
- `router.Policy` / `router.route`: the hybrid router, configured by `[serve.router]`;
- `create_app(config)` (pgfresh.serve.http) and `run(config, host, port)`: the HTTP server;
- `check_config(config)` for the `[serve]` section.
"""

from __future__ import annotations

from pgfresh.configtypes import Spec, check_section, integer, number
from pgfresh.serve import router
from pgfresh.serve.answer import MODES, Options, answer, default_registry  # noqa: F401  (re-exported)
from pgfresh.serve.registry import Registry  # noqa: F401

_SPEC: Spec = {
    "host": (str, bool, "a host name or address"),
    "port": (int, lambda v: 0 <= v <= 65535, "a port, 0..65535"),
    "max_body_bytes": integer(1, unit="bytes"),
    "threads": integer(1, unit="threads"),
    "ready_max_lag_seconds": number(0, above=True, unit="seconds"),
    "reports_dir": (str, None, "a directory holding arena reports (*.json, *.html)"),
    "router": (dict, None, "a table ([serve.router])"),
}
DEFAULTS = {"host": "127.0.0.1", "port": 8088, "max_body_bytes": 1 << 20, "ready_max_lag_seconds": 60.0,
            "reports_dir": ".", "threads": None}


def check_config(config) -> list[str]:
    """Every problem in `[serve]` (and `[serve.router]`), each starting with its key path."""
    problems: list[str] = []
    good = check_section(config.serve or {}, "serve", _SPEC, problems)
    if "router" in good:
        check_section(good["router"], "serve.router", router.SPEC, problems)
    return problems


def setting(config, name: str):
    return (config.serve or {}).get(name, DEFAULTS[name])


def search(config, text: str, tenant: str | None = None, k: int | None = None, mode: str | None = None, *,
           registry: Registry | None = None) -> list:
    """`rag.search` on a pooled store connection: the form the CLI and the HTTP API use."""
    from pgfresh.rag import retrieval
    from pgfresh.rag.question import check

    check(text, tenant=tenant, k=k, what="search text")  # NUL, non-text, empty, too long: one line, no 500
    retrieval.tenant_filter(config, tenant)  # refuse before connecting
    reg = registry or default_registry()
    with reg.connection(config, "search") as conn:
        return retrieval.search(conn, config, text, tenant, k or int(config.rag.get("k", 10)), mode, models=reg.models)
