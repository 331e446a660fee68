"""What `pgfresh status` shows of the train stage: slices, their published versions, and rounds.

`counts(conn)`: `slices` (how many), `versions` (published versions, the base versions included),
`rounds` (rounds by outcome: `published` passed the gate, `rejected` did not; `failed`, `running`
and the others as they stand), and per slice its serving version and rounds passed / rejected.
"""

from __future__ import annotations


def counts(conn) -> dict:
    """One dict of figures; `{"slices": 0}` before migration 004 ran."""
    if not conn.execute("select to_regclass('pgfresh.train_rounds') is not null").fetchone()[0]:
        return {"slices": 0, "versions": 0, "rounds": {}, "by_slice": {}}
    rounds = dict(conn.execute("select status, count(*) from pgfresh.train_rounds group by status").fetchall())
    by_slice = {
        name: {"serving_version": current, "versions": versions, "published": published, "rejected": rejected}
        for name, current, versions, published, rejected in conn.execute(
            "select s.name, s.current_version,"
            " (select count(*) from pgfresh.slice_versions v where v.slice = s.name),"
            " (select count(*) from pgfresh.train_rounds r where r.slice = s.name and r.status = 'published'),"
            " (select count(*) from pgfresh.train_rounds r where r.slice = s.name and r.status = 'rejected')"
            " from pgfresh.slices s order by s.name")}
    return {"slices": len(by_slice), "versions": sum(s["versions"] for s in by_slice.values()),
            "rounds": {"published": rounds.get("published", 0), "rejected": rounds.get("rejected", 0),
                       **{k: v for k, v in rounds.items() if k not in ("published", "rejected")}},
            "by_slice": by_slice}
