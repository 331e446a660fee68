"""The router of `mode = "hybrid"`: per question, answer from the tenant's slice or retrieve.

The policy (docs/SERVE.md, `[serve.router]` in pgfresh.toml) looks at the best document retrieval
finds for the question and the slice that would answer closed-book, and applies these rules in
order; the first that fires decides, and its sentence is the `reason` every answer carries:

1. no published slice for the tenant                              -> retrieve
2. the slice is older than `max_slice_age_seconds` (if set)       -> retrieve
3. nothing retrieved                                              -> slice (closed-book is all there is)
4. the best row changed after the slice's LSN (the slice has not
   learnt its current version)                                    -> retrieve
5. more than `max_table_changes` rows of the best row's table
   changed after the slice's LSN (if set): the table changes
   faster than slices are published                               -> retrieve
6. otherwise (the slice knows the best row's current version)     -> slice

Rule 4 compares LSNs, so it is exact for the row retrieval found; what it cannot see is a question
whose right row retrieval misses. Rule 5 trades speed for safety on busy tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

RETRIEVE, SLICE = "rag", "slice"

# key -> (check, expected)
SPEC = {
    "max_slice_age_seconds": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                              "a number of seconds > 0"),
    "max_table_changes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
}


@dataclass(frozen=True)
class Policy:
    max_slice_age_seconds: float | None = None
    max_table_changes: int | None = None

    @classmethod
    def from_config(cls, config) -> "Policy":
        raw = (config.serve or {}).get("router", {}) or {}
        return cls(**{k: raw[k] for k in SPEC if k in raw})


@dataclass(frozen=True)
class Route:
    taken: str  # "rag" or "slice"
    reason: str  # one sentence: which rule fired, with the LSNs it compared

    def as_dict(self) -> dict:
        return {"taken": self.taken, "reason": self.reason}


def check(raw, problems: list[str]) -> None:
    """Validate `[serve.router]`."""
    if not isinstance(raw, dict):
        problems.append("serve.router: expected a table ([serve.router])")
        return
    for key, value in raw.items():
        if key not in SPEC:
            problems.append(f"serve.router.{key}: unknown key (known: {', '.join(SPEC)})")
        elif not SPEC[key][0](value):
            problems.append(f"serve.router.{key}: expected {SPEC[key][1]}, got {value!r}")


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def route(policy: Policy, best, version, table_changes=None, now: datetime | None = None) -> Route:
    """Decide for one question. `best`: the best retrieval hit (or None); `version`: the slice's
    published version (or None); `table_changes(tbl, lsn, limit)`: rows of a table changed after an LSN
    (only called when rule 5 is on)."""
    if version is None:
        return Route(RETRIEVE, "no published slice for this tenant: retrieval answers")
    if policy.max_slice_age_seconds is not None and version.created_at is not None:
        now = now or datetime.now(timezone.utc)
        age = (now - version.created_at).total_seconds()
        if age > policy.max_slice_age_seconds:
            return Route(RETRIEVE, f"slice {version.slice} v{version.version} is {age:.0f} s old "
                                   f"(max_slice_age_seconds = {policy.max_slice_age_seconds:g}): retrieval answers")
    if best is None:
        return Route(SLICE, f"nothing retrieved: slice {version.slice} v{version.version} answers closed-book")
    row = f"{best.tbl}{best.key}"
    if lsn_int(best.lsn) > lsn_int(version.lsn):
        return Route(RETRIEVE, f"{row} changed at LSN {best.lsn}, after slice {version.slice} v{version.version} "
                               f"(LSN {version.lsn}): retrieval answers")
    if policy.max_table_changes is not None and table_changes is not None:
        n = table_changes(best.tbl, version.lsn, policy.max_table_changes + 1)
        if n > policy.max_table_changes:
            return Route(RETRIEVE, f"more than {policy.max_table_changes} rows of {best.tbl} changed after slice "
                                   f"{version.slice} v{version.version} (LSN {version.lsn}): retrieval answers")
    return Route(SLICE, f"slice {version.slice} v{version.version} (LSN {version.lsn}) knows {row} at LSN {best.lsn}: "
                        "the slice answers")
