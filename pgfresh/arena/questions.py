"""Questions asked during the arena, and their true answers computed by SQL when they are asked.

Questions come from the fact templates of pgfresh.toml ([[tables.facts]]: question, paraphrases,
answer, gone) and the arena's held-out phrasings ([[arena.questions]]). Which row a question is
about is chosen from the source tables and the change log `arena.events`; its **truth** is read
from the source table in one short REPEATABLE READ transaction per batch, at the moment the batch
is asked (`QuestionGenerator.batch`), never from what the workload generator remembers.

Classes:
    changed     the fact's value changed during the live phase (updated), or the row became a fact
                (acquired: inserted or published); asked again until every strategy is right
    unchanged   a fixed panel of facts whose value never changed since seeding (forgetting); a
                change to another fact of the row (stock, for a price) leaves it in the panel
    deleted     the row was deleted: the right answer is that it no longer exists
    never       a plausible row that never existed: the right answer is that it is not known
    noisy       the row carries (or recently carried) a plausible-but-wrong value: the truth is
                the clean value (`arena.events.clean` of the open noise event, else the row)
    held_out    a changed or unchanged fact asked with a phrasing training never saw
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgfresh.arena.settings import ArenaSettings, FactTemplate, fact_templates
from pgfresh.arena.strategy import Question
from pgfresh.errors import ConfigError, RenderError
from pgfresh.render import fill  # the one template parser: the arena's truth reads as the facts do

CLASSES = ("changed", "unchanged", "deleted", "never", "noisy", "held_out")
# Share of each batch per class; slots a class cannot fill go to changed, then unchanged.
SHARES = {"changed": 0.3, "unchanged": 0.2, "held_out": 0.15, "noisy": 0.15, "deleted": 0.1, "never": 0.1}


def quota(n: int, owed: dict[str, float]) -> dict[str, int]:
    """A batch of `n` questions split across the classes by SHARES. Over a run every class gets its
    share: what a batch cannot give (a 10% class in a batch of 8) is `owed` and given in the next
    ones, the largest remainder first (`owed` is updated)."""
    for c, share in SHARES.items():
        owed[c] = owed.get(c, 0.0) + n * share
    q = {c: int(owed[c] + 1e-9) for c in SHARES}
    for c in sorted(SHARES, key=lambda c: (-(owed[c] - q[c]), -SHARES[c])):
        if sum(q.values()) >= n:
            break
        q[c] += 1
    for c in SHARES:
        owed[c] -= q[c]
    return q


@dataclass
class Probe:
    """A question with what the arena knows about it; strategies only ever see `question`."""

    question: Question
    cls: str  # one of CLASSES
    table: str
    key: list  # key values as stored in arena.events (JSON types)
    template: str  # fact template name ('price')
    phrasing: str  # canonical | paraphrase | held_out
    truth: str | None = None  # the value; None when truth_kind is gone / never
    truth_kind: str = "value"  # value | gone | never
    old_values: list[str] = field(default_factory=list)  # earlier clean values of this fact
    noisy_values: list[str] = field(default_factory=list)  # wrong values the row carried
    change_kind: str | None = None  # changed: updated | acquired
    event_id: int | None = None  # the change the question is about (time-to-fresh)
    event_time: datetime | None = None
    fact_time: datetime | None = None  # commit time of the fact's current value (None: since seeding)
    asked_at: datetime | None = None  # source clock when the truth was read
    invented: dict | None = None  # never: the column values of the row that does not exist

    @property
    def fact(self) -> tuple:
        return (self.table, json.dumps(self.key), self.template)


def text_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass
class _Event:
    id: int
    table: str
    key: list
    op: str
    kind: str
    noise: bool
    clean: dict | None
    old: dict | None
    new: dict | None
    time: datetime
    old_visible: bool
    new_visible: bool


def _loads(text: str | None):
    return None if text is None else json.loads(text, parse_float=Decimal)


class QuestionGenerator:
    """Chooses each batch's questions from the source and the change log, then reads their truth."""

    def __init__(self, config, settings: ArenaSettings, workload, seeded_at: datetime, seed: int | None = None):
        self.settings = settings
        self.workload = workload
        self.seeded_at = seeded_at
        self.live_since = seeded_at  # changes before this are not in the changed class (runner sets it)
        self.rng = random.Random((settings.seed if seed is None else seed) * 7919 + 17)
        self.specs = {s.table: s for s in settings.questions}
        self.templates = {s.table: fact_templates(config, s) for s in settings.questions}
        self.keys = {s.table: (config.table(s.table).key or None) for s in settings.questions}
        self.history: dict[tuple, list[_Event]] = {}
        self.last_event = 0
        self.asked_events: set[int] = set()
        self.last_asked: dict[tuple, int] = {}  # changed fact -> the batch that last asked it
        self.batches = 0
        self.owed: dict[str, float] = {}  # per class: questions its share earned that no batch gave it yet
        self.panel: list[tuple[str, tuple, str]] | None = None
        self.panel_next = 0
        self.next_id = 0

    # -- the change log ------------------------------------------------------------------------
    def _read_events(self, conn) -> None:
        from pgfresh.arena.workload import primary_key

        for table, spec in self.specs.items():
            if self.keys[table] is None:
                self.keys[table] = primary_key(conn, table)
            pred = sql.SQL(spec.visible_when) if spec.visible_when else sql.SQL("true")
            vis = sql.SQL("coalesce((select {} from jsonb_populate_record(null::{}, {}) as t), false)")
            ident = sql.Identifier(*table.split(".", 1))
            query = sql.SQL(
                "select e.id, e.key::text, e.op, e.kind, e.noise, e.clean::text, e.old_row::text, e.new_row::text,"
                " e.commit_time, e.old_row is not null and {}, e.new_row is not null and {}"
                " from arena.events e where e.tbl = %s and e.id > %s order by e.id"
            ).format(vis.format(pred, ident, sql.SQL("e.old_row")), vis.format(pred, ident, sql.SQL("e.new_row")))
            for r in conn.execute(query, (table, self.last_event)):
                ev = _Event(r[0], table, _loads(r[1]), r[2], r[3], r[4], _loads(r[5]), _loads(r[6]), _loads(r[7]),
                            r[8], r[9], r[10])
                self.history.setdefault((table, json.dumps(ev.key)), []).append(ev)
        (top,) = conn.execute("select coalesce(max(id), 0) from arena.events").fetchone()
        self.last_event = max(self.last_event, top)

    def _value(self, tpl: FactTemplate, row: dict | None, visible: bool) -> str | None:
        if row is None or not visible:
            return None
        try:
            return fill(tpl.answer, row)
        except RenderError as exc:
            raise ConfigError([f"tables ({tpl.table}).facts.{tpl.name}.answer: {exc}"]) from None

    def _fact_events(self, events: list[_Event], tpl: FactTemplate) -> list[_Event]:
        """Events that changed this template's value (or the row's existence as a fact)."""
        return [e for e in events
                if self._value(tpl, e.old, e.old_visible) != self._value(tpl, e.new, e.new_visible)]

    def _candidates(self) -> dict[str, list[tuple]]:
        """(table, key, template, last event) per class from the log: changed / deleted / noisy."""
        out = {"changed": [], "deleted": [], "noisy": []}
        window = self.settings.noisy_window_s
        newest = max((evs[-1].time for evs in self.history.values()), default=self.seeded_at)
        for (table, _), events in self.history.items():
            last_row = events[-1]
            for tpl in self.templates[table]:
                changes = self._fact_events(events, tpl)
                if last_row.noise and last_row.clean and last_row.new_visible and \
                        self._value(tpl, last_row.new, True) != self._value(tpl, {**last_row.new, **last_row.clean}, True):
                    out["noisy"].append((table, last_row.key, tpl.name, last_row))
                elif not changes:
                    continue
                elif changes[-1].old_visible and not changes[-1].new_visible:
                    # Deleted, or no longer a fact (e.g. retired): the answer is that it is gone.
                    if changes[-1].time >= self.live_since:
                        out["deleted"].append((table, last_row.key, tpl.name, changes[-1]))
                elif changes[-1].kind == "correction":
                    if (newest - changes[-1].time).total_seconds() <= window:
                        out["noisy"].append((table, last_row.key, tpl.name, changes[-1]))
                elif not changes[-1].noise and changes[-1].new_visible and changes[-1].time >= self.live_since:
                    out["changed"].append((table, last_row.key, tpl.name, changes[-1]))
        return out

    def _unchanged(self, table: str, key: list, name: str) -> bool:
        """Whether this fact's value never changed since seeding (other facts of its row may have:
        a stock update leaves the price fact unchanged)."""
        events = self.history.get((table, json.dumps(key)))
        return not events or not self._fact_events(events, self._template(table, name))

    def _panel(self, conn) -> list[tuple]:
        """The unchanged panel, chosen once: facts whose value never changed, sampled by the seed;
        a fact leaves it when its value changes."""
        if self.panel is None:
            facts = []
            for table, spec in self.specs.items():
                pred = sql.SQL(spec.visible_when) if spec.visible_when else sql.SQL("true")
                cols = sql.SQL(", ").join(map(sql.Identifier, self.keys[table]))
                rows = conn.execute(sql.SQL("select {} from {} where {} order by {} limit 100000").format(
                    cols, sql.Identifier(*table.split(".", 1)), pred, cols)).fetchall()
                for r in rows:
                    facts.extend((table, list(r), t.name) for t in self.templates[table]
                                 if self._unchanged(table, list(r), t.name))
            size = max(8, 3 * self.settings.questions_per_batch)
            self.panel = self.rng.sample(facts, min(size, len(facts)))
        return [p for p in self.panel if self._unchanged(*p)]

    # -- a batch -------------------------------------------------------------------------------
    def batch(self, conn, n: int | None = None, watch: list[tuple] = ()) -> list[Probe]:
        """Choose up to n questions and read their truth now. `watch`: facts (Probe.fact) of
        changes not yet answered right by every strategy, asked again while still current."""
        n = n or self.settings.questions_per_batch
        with conn.transaction():
            conn.execute("set transaction isolation level repeatable read")
            self._read_events(conn)
            probes = self._choose(conn, n, watch)
            (now,) = conn.execute("select clock_timestamp()").fetchone()
            probes = [p for p in probes if self._truth(conn, p)]
            for p in probes:
                p.asked_at = now
        return probes

    def _choose(self, conn, n: int, watch) -> list[Probe]:
        cands = self._candidates()
        wanted = quota(n, self.owed)
        chosen: list[Probe] = []
        changed = {(c[0], json.dumps(c[1]), c[2]): c for c in cands["changed"]}
        # Re-asked changes take turns: the one asked longest ago first, then the one whose value has
        # stood longest (a cold row's change, which a training round may have learnt by now).
        rewatch = sorted((changed[f] for f in watch if f in changed),
                         key=lambda c: (self.last_asked.get((c[0], json.dumps(c[1]), c[2]), -1), c[3].id))
        rewatch = rewatch[: max(1, wanted["changed"] // 2)]
        fresh = sorted((c for c in changed.values() if c[3].id not in self.asked_events), key=lambda c: -c[3].id)
        # One question per row first (an insert changes every template of the row at once).
        seen: set[str] = set()
        first = [c for c in fresh if not (json.dumps(c[1]) in seen or seen.add(json.dumps(c[1])))]
        fresh = first + [c for c in fresh if c not in first]
        self.batches += 1
        for c in (rewatch + fresh)[: wanted["changed"]]:
            chosen.append(self._probe("changed", c))
        panel = self._panel(conn)
        for _ in range(min(wanted["unchanged"], len(panel))):
            table, key, name = panel[self.panel_next % len(panel)]
            self.panel_next += 1
            chosen.append(self._probe("unchanged", (table, key, name, None)))
        for cls in ("deleted", "noisy"):
            pool = cands[cls]
            for c in self.rng.sample(pool, min(wanted[cls], len(pool))):
                chosen.append(self._probe(cls, c))
        held = [c for c in list(changed.values()) + [(t, k, m, None) for t, k, m in panel]
                if any(tp.name == c[2] and tp.held_out for tp in self.templates[c[0]])]
        for c in self.rng.sample(held, min(wanted["held_out"], len(held))):
            chosen.append(self._probe("held_out", c))
        for _ in range(wanted["never"]):
            probe = self._never(conn)
            if probe:
                chosen.append(probe)
        # Slots a class could not fill go to more changed facts, then more of the panel.
        spare = [c for c in rewatch + fresh if c[3].id not in {p.event_id for p in chosen}]
        while len(chosen) < n and spare:
            chosen.append(self._probe("changed", spare.pop(0)))
        used = {p.fact for p in chosen}
        for table, key, name in panel:
            if len(chosen) >= n:
                break
            if (table, json.dumps(key), name) not in used:
                chosen.append(self._probe("unchanged", (table, key, name, None)))
        return chosen

    def _template(self, table: str, name: str) -> FactTemplate:
        return next(t for t in self.templates[table] if t.name == name)

    def _phrase(self, tpl: FactTemplate, held_out: bool) -> tuple[str, str]:
        if held_out:
            return self.rng.choice(tpl.held_out), "held_out"
        i = self.rng.randrange(len(tpl.phrasings))
        return tpl.phrasings[i], ("canonical" if i == 0 else "paraphrase")

    def _probe(self, cls: str, cand: tuple) -> Probe:
        table, key, name, event = cand
        tpl = self._template(table, name)
        phrasing, how = self._phrase(tpl, cls == "held_out")
        self.next_id += 1
        probe = Probe(Question(f"q{self.next_id}", phrasing, None), cls, table, key, name, how)
        if event is not None and cls in ("changed", "held_out"):
            probe.event_id, probe.event_time = event.id, event.time
            old_visible = any(e.new_visible for e in self.history[(table, json.dumps(key))] if e.id < event.id)
            probe.change_kind = "updated" if old_visible or event.old_visible else "acquired"
            if cls == "changed":
                self.asked_events.add(event.id)
                self.last_asked[probe.fact] = self.batches
        return probe

    def _never(self, conn) -> Probe | None:
        tables = sorted(self.specs)
        table = self.rng.choice(tables)
        row = self.workload.invent(self.rng, self.specs[table])
        if not row:
            return None
        tpl = self.rng.choice(self.templates[table])
        text, how = self._phrase(tpl, False)
        tenant_col = self.workload.config.table(table).tenant
        tenant = None
        if tenant_col:
            tenants = [r[0] for r in conn.execute(sql.SQL("select distinct {0} from {1} order by {0}").format(
                sql.Identifier(tenant_col), sql.Identifier(*table.split(".", 1))))]
            tenant = text_value(self.rng.choice(tenants)) if tenants else None
        self.next_id += 1
        try:
            question = fill(text, row)
        except RenderError:
            return None  # the template needs columns the invented row lacks
        return Probe(Question(f"q{self.next_id}", question, tenant), "never", table, [], tpl.name, how,
                     truth_kind="never", invented=row)

    # -- truth ---------------------------------------------------------------------------------
    def _truth(self, conn, p: Probe) -> bool:
        """Fill p's truth from the source now; False drops it (an invented row that exists)."""
        ident = sql.Identifier(*p.table.split(".", 1))
        spec = self.specs[p.table]
        pred = sql.SQL(spec.visible_when) if spec.visible_when else sql.SQL("true")
        tpl = self._template(p.table, p.template)
        if p.cls == "never":
            cond = sql.SQL(" and ").join(sql.SQL("{}::text = %s").format(sql.Identifier(c)) for c in p.invented)
            (exists,) = conn.execute(sql.SQL("select exists(select 1 from {} where {})").format(ident, cond),
                                     list(p.invented.values())).fetchone()
            return not exists
        keys = self.keys[p.table]
        cond = sql.SQL(" and ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in keys)
        cur = conn.cursor(row_factory=dict_row)
        row = cur.execute(sql.SQL("select * from {} where {} and ({})").format(ident, cond, pred), p.key).fetchone()
        events = self.history.get((p.table, json.dumps(p.key)), [])
        tenant_col = self.workload.config.table(p.table).tenant
        if row is None:
            p.truth, p.truth_kind, p.cls = None, "gone", "deleted"
            row = next((e.old for e in reversed(events) if e.old is not None), None)  # to name it
            if row is None:
                return False
        else:
            last = conn.execute("select noise, clean::text from arena.events where tbl = %s and key = %s"
                                " order by id desc limit 1", (p.table, Jsonb(p.key))).fetchone()
            clean = _loads(last[1]) if last and last[0] else None  # open noise: the truth is the clean value
            p.truth = fill(tpl.answer, {**row, **(clean or {})})
        p.question = Question(p.question.id, fill(p.question.text, row),
                              text_value(row.get(tenant_col)) if tenant_col else None)
        self._known_values(p, tpl, events)
        return True

    def _known_values(self, p: Probe, tpl: FactTemplate, events: list[_Event]) -> None:
        """The fact's earlier clean values (stale answers), its wrong values, and its age."""
        values = [(self._value(tpl, e.old, e.old_visible), self._value(tpl, e.new, e.new_visible), e)
                  for e in events]
        # A noise event's wrong value is the one its clean values correct, for this template only.
        wrong = {new for _, new, e in values if e.noise and e.clean and new is not None
                 and new != self._value(tpl, {**e.new, **e.clean}, e.new_visible)}
        clean = {v for old, new, e in values for v in (old, new) if v is not None} - wrong
        p.old_values = sorted(clean - {p.truth})
        p.noisy_values = sorted(wrong - {p.truth})
        changes = self._fact_events(events, tpl)
        p.fact_time = changes[-1].time if changes else None

    # -- for the report --------------------------------------------------------------------------
    def change_counts(self, since: datetime) -> dict[str, dict[str, int]]:
        """Value changes per table and template since `since` (noise and corrections included)."""
        out = {t: {tpl.name: 0 for tpl in tpls} for t, tpls in self.templates.items()}
        for (table, _), events in self.history.items():
            for tpl in self.templates[table]:
                out[table][tpl.name] += sum(e.time >= since for e in self._fact_events(events, tpl))
        return out

    def fact_rows(self, conn, table: str) -> int:
        """Rows of `table` that are facts now (visible_when)."""
        spec = self.specs[table]
        pred = sql.SQL(spec.visible_when) if spec.visible_when else sql.SQL("true")
        return conn.execute(sql.SQL("select count(*) from {} where {}").format(
            sql.Identifier(*table.split(".", 1)), pred)).fetchone()[0]
