"""The router of `mode = "hybrid"`: per question, answer from the tenant's slice or retrieve.

The policy (docs/SERVE.md, `[serve.router]` in pgfresh.toml) looks at the row the question is about
and the slice that would answer closed-book, and applies these rules in order; the first that fires
decides, and its sentence is the `reason` every answer carries. The row: the one the question names,
when it is phrased as one of a row's facts (the first such hit, or the one such row of the tenant's
facts when retrieval missed it, as it always misses a deleted row); otherwise the best hit.

1. no published slice for the tenant                              -> retrieve
2. the slice is older than `max_slice_age_seconds` (if set)       -> retrieve
3. nothing retrieved                                              -> slice (closed-book is all there is)
4. the slice does not know the judged row as it stands: its lineage
   did not train the row's active facts the question asks (those
   whose phrasings it matches; all of the row's if none), or a newer
   version of the row the facts stage has not taken in yet (unread,
   or in the settle window) gives them other answers               -> retrieve
4b. the slice knows the row, but the question is none of the
   phrasings its facts were rendered with (question, paraphrases;
   case, spaces and punctuation aside) and `trained_phrasings_only`
   is on (the default: measured, the built-in model answers almost
   no phrasing it was not trained on; turn it off for a model that
   does)                                                          -> retrieve
5. more than `max_table_changes` rows of the judged row's table
   changed after that position (if set): the table changes
   faster than slices are published                               -> retrieve
6. the slice knows the judged row's current version, but the
   decision's confidence (below) is under `min_slice_confidence`
   (if set)                                                       -> retrieve
7. otherwise (the slice knows the judged row's current version)   -> slice

Rule 4 is exact for the row it judges; pgfresh.serve.answer reads what it needs from
pgfresh.facts, fact_training along the slice's lineage, gate_pending and the change log. It does
not compare the slice's position (the newest LSN it learnt) with the row's LSN: a round learns the
newest waiting facts first and a settling row waits, so a position passes changes the slice never
learnt, and a row whose other facts changed since still has the asked one learnt. Without those
lookups (`row_lsn` giving LSN and pipeline only, constructed cases) the position decides. What
the router cannot judge is a question it cannot tie to a row: phrased in no trained way, about a
row retrieval misses. LSNs are compared only within one pipeline (source): a slice
records its position per pipeline (pgfresh.train.slices), because the LSNs of two servers, or of
two slots that progress on their own, say nothing about which change came first. Rule 5 trades
speed for safety on busy tables.

Every decision carries a `confidence` (0..1) and the `signals` it was computed from:
- `margin`: how far the best hit's score is ahead of the runner-up's, relative to the best
  ((s1 - s2) / |s1|, clipped to 0..1; 1 with a single hit). It says how sure retrieval is that the
  best hit is the question's row: `identified = 0.5 + 0.5 * margin` (1 for a named row retrieval
  missed).
- `slice`: whether the tenant has a published slice (and which); `slice_recall`: the share of new
  facts its round's gate measured it answering (`new_accuracy`; none for a base version).
- `row_lsn`, `pipeline`, `slice_position`, `slice_knows_row`: the judged row's latest change, its
  pipeline, the slice's position there, and whether that position covers the change.
The confidence, per rule: no slice (1) or a policy rule (2, 5) -> 1.0 (there is no other route,
or the operator chose); nothing retrieved -> 0.5 (no evidence either way); the
slice does not know the row -> `identified` (right if the best hit is the question's row); the
slice knows the row -> `identified * slice_recall` (0.5 for an unmeasured slice). Below
`min_slice_confidence` that last decision goes to retrieval instead (rule 6, with confidence
`identified`); without it, low confidence is only a signal for the caller. bench/router.py measures
accuracy by route and confidence on an arena run, and what each threshold would have changed
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

from pgfresh.capture.pgoutput import parse_lsn
from pgfresh.configtypes import Spec, integer, number

RETRIEVE, SLICE = "rag", "slice"

SPEC: Spec = {  # [serve.router], checked by pgfresh.serve.check_config
    "max_slice_age_seconds": number(0, above=True, unit="seconds"),
    "max_table_changes": integer(0),
    "min_slice_confidence": number(0, 1),
    "trained_phrasings_only": (bool, None, "true or false"),
}


@dataclass(frozen=True)
class Policy:
    max_slice_age_seconds: float | None = None
    max_table_changes: int | None = None
    min_slice_confidence: float | None = None
    trained_phrasings_only: bool = True

    @classmethod
    def from_config(cls, config) -> "Policy":
        raw = (config.serve or {}).get("router", {}) or {}
        return cls(**{k: raw[k] for k in SPEC if k in raw})


@dataclass(frozen=True)
class Route:
    taken: str  # "rag" or "slice"
    reason: str  # one sentence: which rule fired, with the LSNs it compared
    confidence: float | None = None  # 0..1, see the module docstring (None: the mode chose, not the router)
    signals: dict | None = None

    def as_dict(self) -> dict:
        out = {"taken": self.taken, "reason": self.reason}
        if self.confidence is not None:
            out.update(confidence=round(self.confidence, 3), signals=self.signals)
        return out


class RowState(NamedTuple):
    """What the store says of the row the router judges (`row_lsn` in `route`)."""

    lsn: str  # the row's latest change, which the index may not have caught up with yet
    pipeline: str | None  # None: unknown, the slice's single LSN stands for every pipeline
    knows: bool | None = None  # the slice's lineage knows the row as it stands (rule 4); None: not looked up
    phrased: bool | None = None  # the question is one of the phrasings of the row's facts (rule 4b)


def margin(best, runner_up) -> float | None:
    """How far the best hit's score is ahead of the runner-up's, relative to the best (0..1)."""
    if best is None:
        return None
    if runner_up is None:
        return 1.0
    top = abs(float(best.score))
    return 0.0 if top == 0 else min(1.0, max(0.0, (float(best.score) - float(runner_up.score)) / top))


def position(version, pipeline: str | None) -> str | None:
    """The newest LSN of `pipeline` the version learnt (None: nothing of it). A version without
    positions (written before migration 017, or by hand) has one LSN for every pipeline."""
    if version.positions is None or pipeline is None:
        return version.lsn
    return version.positions.get(pipeline)


def route(policy: Policy, best, version, table_changes=None, now: datetime | None = None, *,
          runner_up=None, row_lsn=None) -> Route:
    """Decide for one question. `best`, `runner_up`: the two best retrieval hits (or None); `version`:
    the slice's published version (or None); `table_changes(tbl, lsn, limit)`: rows of a table changed
    after an LSN (only called when rule 5 is on); `row_lsn(tbl, key)`: the row's RowState, or a tuple
    of its first fields (row_lsn None: the hit's LSN, the indexed document's, and the slice's newest
    LSN)."""
    m = margin(best, runner_up)
    identified = None if m is None else 0.5 + 0.5 * m
    state = RowState(None, None)
    if best is not None:
        state = RowState(*((row_lsn(best.tbl, best.key) if row_lsn else None) or (best.lsn, None)))
    latest, pipeline, phrasing = state.lsn, state.pipeline, state.phrased
    known = None if version is None else position(version, pipeline)
    recall = None
    if version is not None:
        measured = (getattr(version, "metrics", None) or {}).get("new_accuracy")
        recall = float(measured) if isinstance(measured, (int, float)) else None
    signals = {"margin": None if m is None else round(m, 3),
               "slice": None if version is None else f"{version.slice} v{version.version} (LSN {version.lsn})",
               "slice_recall": recall, "row_lsn": latest, "pipeline": pipeline, "slice_position": known,
               "phrasing_trained": phrasing,
               "slice_knows_row": None if latest is None or version is None
               else bool(state.knows) if state.knows is not None else known is not None and parse_lsn(latest) <= parse_lsn(known)}

    def decided(taken: str, reason: str, confidence: float) -> Route:
        return Route(taken, reason, confidence, signals)

    if version is None:
        return decided(RETRIEVE, "no published slice for this tenant: retrieval answers", 1.0)
    if policy.max_slice_age_seconds is not None and version.created_at is not None:
        now = now or datetime.now(timezone.utc)
        age = (now - version.created_at).total_seconds()
        if age > policy.max_slice_age_seconds:
            return decided(RETRIEVE, f"slice {version.slice} v{version.version} is {age:.0f} s old "
                                     f"(max_slice_age_seconds = {policy.max_slice_age_seconds:g}): retrieval answers", 1.0)
    if best is None:
        return decided(SLICE, f"nothing retrieved: slice {version.slice} v{version.version} answers closed-book", 0.5)
    row = f"{best.tbl}{best.key}"
    where = f" in {pipeline}" if pipeline else ""
    if known is None:
        return decided(RETRIEVE, f"slice {version.slice} v{version.version} learnt nothing of {pipeline}, where {row} "
                                 "comes from: retrieval answers", identified)
    if not signals["slice_knows_row"] and parse_lsn(latest) > parse_lsn(known):
        return decided(RETRIEVE, f"{row} changed at LSN {latest}{where}, after slice {version.slice} v{version.version} "
                                 f"(LSN {known}{where}): retrieval answers", identified)
    if not signals["slice_knows_row"]:
        return decided(RETRIEVE, f"slice {version.slice} v{version.version} (LSN {known}{where}) never learnt {row} "
                                 f"as it stands at LSN {latest}: retrieval answers", identified)
    if policy.trained_phrasings_only and phrasing is False:
        return decided(RETRIEVE, f"slice {version.slice} v{version.version} knows {row}, but was not trained on this "
                                 "phrasing (trained_phrasings_only): retrieval answers", identified)
    if policy.max_table_changes is not None and table_changes is not None:
        n = table_changes(best.tbl, known, policy.max_table_changes + 1)
        if n > policy.max_table_changes:
            return decided(RETRIEVE, f"more than {policy.max_table_changes} rows of {best.tbl} changed after slice "
                                     f"{version.slice} v{version.version} (LSN {known}{where}): retrieval answers", 1.0)
    confidence = identified * (0.5 if recall is None else recall)
    knows = f"slice {version.slice} v{version.version} (LSN {known}{where}) knows {row} at LSN {latest}"
    if policy.min_slice_confidence is not None and confidence < policy.min_slice_confidence:
        return decided(RETRIEVE, f"{knows}, but its confidence {confidence:.2f} is under min_slice_confidence = "
                                 f"{policy.min_slice_confidence:g}: retrieval answers", identified)
    return decided(SLICE, f"{knows}: the slice answers", confidence)
