"""The arena: a live workload, questions whose truth is computed by SQL when they are asked,
every strategy side by side, measurements of the source database, and a report with a verdict.

    workload   tables, seeding, live changes with noise, recorded in arena.events
    questions  question classes and their SQL truth
    strategy   the Strategy interface and registry
    metrics    accuracy, stale / hallucination rates, hit@k, time-to-fresh, latency, cost, forgetting
    dbimpact   xmin horizon, dead tuples and bloat, OLTP throughput, the long-transaction export
    verdict    the debate's claims against this run's measurements
    report     self-contained HTML (plotly embedded) and JSON
    runner     the run loop: `run_arena`

Importing this package stays light (no plotly, no torch); `check_config` validates [arena].
"""

from pgfresh.arena import strategies as _builtin_strategies  # noqa: F401  (the built-ins register themselves)
from pgfresh.arena.settings import check_config

__all__ = ["check_config"]
