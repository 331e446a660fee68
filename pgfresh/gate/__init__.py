"""gate: what may reach a model. Every captured change is accepted, held, or quarantined with a reason.

Per table and per path ('rag', 'train'), from `[tables.gate]` in pgfresh.toml (see `policy`):
a settle window and `final_when` (half-finished rows wait), validators (required, types, ranges,
patterns, allowed values, maximum length, boolean rules in a small safe expression language),
a junk scorer, PII removal (configured columns dropped or masked, e-mail / phone / card numbers
masked in free text), and dedup. Nothing is dropped silently: `pgfresh.gate_log` holds one
outcome per change and path, `pgfresh.quarantine` every rejected change with its reason.

Public entry points: `Gate(config, path, render)` with `admit` / `release_due` (see `admission`),
`check_config`, `check_against_columns`, `list_quarantine`, `release`, `status_counts`.
"""

from __future__ import annotations

from pgfresh.gate.admission import Admitted, Gate, Rendered, policy_for
from pgfresh.gate.policy import PATHS, Policy, parse_policy
from pgfresh.gate.quarantine import QuarantineError, list_quarantine, release, status_counts

__all__ = ["Admitted", "Gate", "Rendered", "Policy", "QuarantineError", "check_against_columns", "check_config", "list_quarantine",
           "policy_for", "release", "status_counts"]


def _skip(table) -> set[str]:
    return set(table.key or []) | ({table.tenant} if table.tenant else set())


def check_config(config) -> list[str]:
    """Every problem in the tables' gate sections, each starting with its key path."""
    problems: list[str] = []
    for i, table in enumerate(config.tables):
        for path in PATHS:
            before = len(problems)
            parse_policy(table.gate, path, f"tables[{i}].gate", problems, _skip(table))
            # Keys shared by both paths are parsed twice; report each problem once.
            problems[before:] = [p for p in problems[before:] if p not in problems[:before]]
    return problems


def check_against_columns(config, columns_by_table: dict[str, list[str]]) -> list[str]:
    """Gate settings that name a column the table does not have (known once the database is)."""
    problems = []
    for i, table in enumerate(config.tables):
        columns = columns_by_table.get(table.name)
        if columns is None:
            continue
        for path in PATHS:
            for part, names in parse_policy(table.gate, path, "", [], _skip(table)).columns().items():
                for name in sorted(names - set(columns)):
                    problem = (f"tables[{i}].gate.{part}: names column {name!r}, which {table.name} does not have"
                               f" (columns: {', '.join(columns)})")
                    if problem not in problems:
                        problems.append(problem)
    return problems
