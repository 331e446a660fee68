"""Workloads: source tables, deterministic seeding, and a live stream of changes with noise.

A workload creates and seeds its tables (`setup`), then makes one change per `step`, each in its
own short transaction. Every change is recorded by a trigger in `arena.events` (schema `arena`,
outside the publication) with its old and new row, what the workload meant by it (`kind`, set
with `mark`), whether it is noise, the clean values a noisy row should have, and its commit time;
questions and time-to-fresh are computed from the source tables and that log, never from the
generator's memory.

The built-in `shop` workload: shops, products (tenant `shop_id`) and support notes; price and
stock updates, new and deleted products, draft -> published; noise: plausible-but-wrong prices
and category typos corrected `correct_after_s` later, description typos, junk notes and
half-finished rows. The same seed gives the same tables and the same sequence of changes.

Custom workloads (`[arena] workload = "custom"`) bring their own tables and either a Python
function `change(ctx)` or SQL statements; see docs/ARENA.md.
"""

from __future__ import annotations

import importlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Callable

from psycopg import sql

from pgfresh import db
from pgfresh.arena.settings import ArenaSettings, QuestionSpec, settings as arena_settings
from pgfresh.errors import ConfigError

ADJECTIVES = ["Sturdy", "Compact", "Classic", "Nordic", "Rustic", "Modern", "Deluxe", "Folding", "Vintage",
              "Smart", "Quiet", "Bright", "Heavy", "Slim", "Royal", "Urban", "Coastal", "Alpine", "Golden",
              "Silent", "Rapid", "Gentle", "Bold", "Humble"]
MATERIALS = ["Copper", "Oak", "Bamboo", "Steel", "Linen", "Ceramic", "Walnut", "Cotton", "Glass", "Brass",
             "Slate", "Wool", "Cedar", "Marble", "Leather", "Cork"]
NOUNS = {
    "Kitchen": ["Kettle", "Skillet", "Colander", "Teapot", "Grater", "Ladle", "Whisk", "Cutting Board"],
    "Garden": ["Trowel", "Planter", "Watering Can", "Rake", "Bird Feeder", "Pruner"],
    "Office": ["Stapler", "Desk Lamp", "Notebook", "Pen Holder", "Letter Tray", "Clipboard"],
    "Bath": ["Soap Dish", "Towel Rack", "Bath Mat", "Toothbrush Cup"],
    "Outdoor": ["Lantern", "Camp Stool", "Picnic Basket", "Hammock", "Cooler"],
    "Toys": ["Spinning Top", "Puzzle Box", "Toy Train", "Kite"],
}
CATEGORY_OF = {noun: cat for cat, nouns in NOUNS.items() for noun in nouns}
SHOP_WORDS = ["Harbor", "Maple", "Juniper", "Granite", "Willow", "Beacon", "Meadow", "Summit", "Cobalt",
              "Lantern", "Orchard", "Riverside"]
CITIES = ["Lisbon", "Ghent", "Bergen", "Tartu", "Porto", "Lyon", "Graz", "Turku", "Leeds", "Utrecht"]
USES = ["built to last", "for everyday use", "a customer favourite", "easy to clean", "made in small batches"]
NOTE_BODIES = ["Customer asked whether {name} ships abroad.", "Restocked {name} after a supplier delay.",
               "A buyer reported that {name} arrived scratched; replacement sent.",
               "Reminder: {name} is often bought as a gift, suggest gift wrapping.",
               "Supplier confirmed the next delivery of {name} for next week."]
JUNK_NOTES = ["asdf", "test test ignore", "xxx", "lorem ipsum dolor sit", "qwerty", "TODO fill in", "...",
              "zzzzzz", "ignore this note", "tmp"]

# Normal and noise actions with their weights (method names of ShopWorkload without the _).
ACTIONS = [("price", 30), ("stock", 28), ("insert", 10), ("publish", 8), ("complete", 6), ("delete", 8),
           ("note", 10)]
NOISE_ACTIONS = [("wrong_price", 30), ("typo_category", 15), ("typo_description", 10), ("junk_note", 25),
                 ("half_finished", 20)]


def mark(conn, kind: str, noise: bool = False, clean: dict | None = None) -> None:
    """Tell the recorder what the next statements of this transaction mean (transaction-local)."""
    conn.execute(
        "select set_config('arena.kind', %s, true), set_config('arena.noise', %s, true),"
        " set_config('arena.clean', %s, true)",
        (kind, "true" if noise else "false", json.dumps(clean) if clean else ""),
    )


def primary_key(conn, table: str) -> list[str]:
    schema, name = table.split(".", 1)
    return [r[0] for r in conn.execute(
        "select a.attname from pg_index i join pg_class c on c.oid = i.indrelid"
        " join pg_namespace n on n.oid = c.relnamespace join pg_attribute a on a.attrelid = i.indrelid"
        " and a.attnum = any(i.indkey) where n.nspname = %s and c.relname = %s and i.indisprimary"
        " order by array_position(i.indkey::int2[], a.attnum)", (schema, name))]


def install_recorder(conn, tables) -> None:
    """Create schema arena (events, oltp) and a recording trigger on each workload table."""
    conn.execute(resources.files("pgfresh").joinpath("workloads/arena.sql").read_text())
    for t in tables:
        key = t.key or primary_key(conn, t.name)
        if not key:
            raise ConfigError([f"tables: {t.name} has no primary key; set key = [...] for it"])
        ident = sql.Identifier(t.schema, t.table)
        conn.execute(sql.SQL("drop trigger if exists arena_record on {}").format(ident))
        conn.execute(sql.SQL(
            "create trigger arena_record after insert or update or delete on {} for each row"
            " execute function arena.record_change({})").format(ident, sql.SQL(", ").join(map(sql.Literal, key))))


def _weighted(rng: random.Random, choices: list[tuple[str, int]]) -> str:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


class Workload:
    """Base of every workload: `setup` once, then `attach` and `step` (one change per call)."""

    name = "workload"

    def __init__(self, config, settings: ArenaSettings):
        self.config = config
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.steps = 0

    def setup(self, conn) -> None:
        """Create and seed the tables (dropping earlier ones), then install the recorder."""
        raise NotImplementedError

    def attach(self, conn) -> None:
        """Load what the generator needs to continue from the current tables (before stepping)."""
        self.rng = random.Random(self.settings.seed * 1_000_003 + 1)

    def step(self, conn, noise: float) -> str:
        """Make one change in its own transaction; return its kind."""
        raise NotImplementedError

    def invent(self, rng: random.Random, spec: QuestionSpec) -> dict | None:
        """Column values of a plausible row that does not exist (None: cannot invent)."""
        if not spec.invent:
            return None
        return {col: rng.choice(values) for col, values in sorted(spec.invent.items())}


class ShopWorkload(Workload):
    name = "shop"

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, conn) -> None:
        conn.execute("drop schema if exists shop cascade")
        conn.execute("drop schema if exists arena cascade")
        conn.execute(resources.files("pgfresh").joinpath("workloads/shop.sql").read_text())
        rng = random.Random(self.settings.seed)
        scale = self.settings.scale
        shops, used = [], set()
        for shop_id in range(1, scale["shops"] + 1):
            name = f"{SHOP_WORDS[(shop_id - 1) % len(SHOP_WORDS)]} Goods" + ("" if shop_id <= len(SHOP_WORDS) else f" {shop_id}")
            shops.append((shop_id, name, rng.choice(CITIES)))
        products = []
        for i in range(scale["shops"] * scale["products_per_shop"]):
            shop_id = i // scale["products_per_shop"] + 1
            name, cat, desc = self._new_product(rng, used)
            status = "published" if rng.random() < 0.85 else "draft"
            products.append((i + 1, shop_id, name, cat, self._random_price(rng), rng.randint(0, 150), status, desc))
        notes = []
        for shop_id in range(1, scale["shops"] + 1):
            mine = [p for p in products if p[1] == shop_id]
            for _ in range(scale["notes_per_shop"]):
                p = rng.choice(mine)
                notes.append((len(notes) + 1, shop_id, p[0], rng.choice(NOTE_BODIES).format(name=p[2])))
        with conn.cursor() as cur:
            cur.executemany("insert into shop.shops values (%s, %s, %s)", shops)
            cur.executemany("insert into shop.products (product_id, shop_id, name, category, price, stock, status,"
                            " description) values (%s, %s, %s, %s, %s, %s, %s, %s)", products)
            cur.executemany("insert into shop.support_notes (note_id, shop_id, product_id, body)"
                            " values (%s, %s, %s, %s)", notes)
        install_recorder(conn, self.config.tables)
        conn.execute("analyze shop.products")

    @staticmethod
    def _new_product(rng: random.Random, used: set[str]) -> tuple[str, str, str]:
        while True:
            noun = rng.choice(sorted(CATEGORY_OF))
            adj, material = rng.choice(ADJECTIVES), rng.choice(MATERIALS)
            name = f"{adj} {material} {noun}"
            if name not in used:
                used.add(name)
                return name, CATEGORY_OF[noun], f"A {adj.lower()} {noun.lower()} made of {material.lower()}, {rng.choice(USES)}."

    @staticmethod
    def _random_price(rng: random.Random) -> Decimal:
        return Decimal(rng.randint(199, 19999)) / 100

    # -- live changes ----------------------------------------------------------------------------
    def attach(self, conn) -> None:
        super().attach(conn)
        rows = conn.execute("select product_id, status, price is null or description is null, name"
                            " from shop.products order by product_id").fetchall()
        self.published = {r[0] for r in rows if r[1] == "published"}
        self.drafts = {r[0] for r in rows if r[1] == "draft" and not r[2]}
        self.half = {r[0] for r in rows if r[1] == "draft" and r[2]}
        self.used = {r[3] for r in rows}
        self.floor = max(1, len(self.published) // 2)  # deletes never shrink the catalogue below this
        self.next_product = conn.execute("select coalesce(max(product_id), 0) + 1 from shop.products").fetchone()[0]
        self.next_note = conn.execute("select coalesce(max(note_id), 0) + 1 from shop.support_notes").fetchone()[0]
        self.shop_ids = [r[0] for r in conn.execute("select shop_id from shop.shops order by 1")]
        self.pending: list[tuple[int, int, str, str]] = []  # (due step, product_id, column, clean value)
        self.correct_after_steps = max(1, round(self.settings.correct_after_s * self.settings.rate_per_s))

    def step(self, conn, noise: float) -> str:
        self.steps += 1
        if self.pending and self.pending[0][0] <= self.steps:
            return self._correct(conn, self.pending.pop(0))
        if self.rng.random() < noise:
            return getattr(self, "_" + _weighted(self.rng, NOISE_ACTIONS))(conn)
        return getattr(self, "_" + _weighted(self.rng, ACTIONS))(conn)

    def _pick(self, *pools: set[int]) -> int | None:
        busy = {p[1] for p in self.pending}
        candidates = sorted(set().union(*pools) - busy)
        return self.rng.choice(candidates) if candidates else None

    def _update(self, conn, pid: int, kind: str, values: dict, noise: bool = False, clean: dict | None = None) -> str:
        sets = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder()) for k in values)
        with conn.transaction():
            mark(conn, kind, noise, clean)
            conn.execute(sql.SQL("update shop.products set {}, updated_at = now() where product_id = %s").format(sets),
                         [*values.values(), pid])
        return kind

    def _current(self, conn, pid: int, column: str):
        return conn.execute(sql.SQL("select {} from shop.products where product_id = %s").format(
            sql.Identifier(column)), (pid,)).fetchone()[0]

    def _price(self, conn) -> str:
        pid = self._pick(self.published, self.drafts)
        if pid is None:
            return self._insert(conn)
        price = self._current(conn, pid, "price")
        new = max(Decimal("0.50"), (price * Decimal(self.rng.randint(80, 125)) / 100).quantize(Decimal("0.01")))
        return self._update(conn, pid, "price", {"price": new if new != price else new + Decimal("0.01")})

    def _stock(self, conn) -> str:
        pid = self._pick(self.published, self.drafts)
        if pid is None:
            return self._insert(conn)
        return self._update(conn, pid, "stock", {"stock": self.rng.randint(0, 200)})

    def _insert(self, conn, half: bool = False) -> str:
        pid, self.next_product = self.next_product, self.next_product + 1
        shop_id = self.rng.choice(self.shop_ids)
        name, cat, desc = self._new_product(self.rng, self.used)
        status = "draft" if half or self.rng.random() < 0.4 else "published"
        kind = "noise:half_finished" if half else "insert"
        price, stock = (None, 0) if half else (self._random_price(self.rng), self.rng.randint(0, 150))
        with conn.transaction():
            mark(conn, kind, noise=half)
            conn.execute("insert into shop.products (product_id, shop_id, name, category, price, stock, status,"
                         " description) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                         (pid, shop_id, name, cat, price, stock, status, None if half else desc))
        (self.half if half else self.published if status == "published" else self.drafts).add(pid)
        return kind

    def _publish(self, conn) -> str:
        pid = self._pick(self.drafts)
        if pid is None:
            return self._insert(conn)
        self.drafts.discard(pid)
        self.published.add(pid)
        return self._update(conn, pid, "publish", {"status": "published"})

    def _complete(self, conn) -> str:
        pid = self._pick(self.half)
        if pid is None:
            return self._insert(conn)
        self.half.discard(pid)
        self.published.add(pid)
        name = self._current(conn, pid, "name")
        return self._update(conn, pid, "complete", {"price": self._random_price(self.rng), "stock": self.rng.randint(1, 150),
                                                    "description": f"{name}, {self.rng.choice(USES)}.",
                                                    "status": "published"})

    def _delete(self, conn) -> str:
        if len(self.published) <= self.floor:
            return self._insert(conn)
        pid = self._pick(self.published)
        if pid is None:
            return self._insert(conn)
        self.published.discard(pid)
        with conn.transaction():
            mark(conn, "delete")
            conn.execute("delete from shop.products where product_id = %s", (pid,))
        return "delete"

    def _add_note(self, conn, kind: str, body: str, noise: bool, pid: int | None) -> str:
        nid, self.next_note = self.next_note, self.next_note + 1
        with conn.transaction():
            mark(conn, kind, noise)
            conn.execute("insert into shop.support_notes (note_id, shop_id, product_id, body)"
                         " select %s, coalesce((select shop_id from shop.products where product_id = %s), %s), %s, %s",
                         (nid, pid, self.shop_ids[0], pid, body))
        return kind

    def _note(self, conn) -> str:
        pid = self._pick(self.published)
        name = self._current(conn, pid, "name") if pid else "an item"
        return self._add_note(conn, "note", self.rng.choice(NOTE_BODIES).format(name=name), False, pid)

    # -- noise ---------------------------------------------------------------------------------
    def _noisy_update(self, conn, column: str, wrong_of: Callable[[object], object]) -> str:
        pid = self._pick(self.published)
        if pid is None:
            return self._insert(conn, half=True)
        clean = self._current(conn, pid, column)
        wrong = wrong_of(clean)
        self.pending.append((self.steps + self.correct_after_steps, pid, column, str(clean)))
        kind = "noise:wrong_value" if column != "description" else "noise:typo"
        return self._update(conn, pid, kind, {column: wrong}, noise=True, clean={column: str(clean)})

    def _wrong_price(self, conn) -> str:
        def wrong(price: Decimal) -> Decimal:
            how = self.rng.choice(["x10", "div10", "swap"])
            if how == "x10" or price < 1:
                return price * 10
            if how == "div10":
                return (price / 10).quantize(Decimal("0.01"))
            digits = f"{price:.2f}".replace(".", "")
            swapped = digits[1] + digits[0] + digits[2:] if digits[0] != digits[1] else digits + "0"
            return Decimal(swapped[:-2] + "." + swapped[-2:])
        return self._noisy_update(conn, "price", wrong)

    def _typo(self, text: str) -> str:
        i = self.rng.randrange(1, max(2, len(text) - 1))
        return text[:i] + text[i + 1:] if len(text) > 3 else text + text[-1]

    def _typo_category(self, conn) -> str:
        return self._noisy_update(conn, "category", self._typo)

    def _typo_description(self, conn) -> str:
        return self._noisy_update(conn, "description", lambda d: self._typo(d or "x"))

    def _junk_note(self, conn) -> str:
        return self._add_note(conn, "noise:junk_note", self.rng.choice(JUNK_NOTES), True, self._pick(self.published))

    def _half_finished(self, conn) -> str:
        return self._insert(conn, half=True)

    def _correct(self, conn, due: tuple[int, int, str, str]) -> str:
        _, pid, column, clean = due
        return self._update(conn, pid, "correction", {column: clean})

    # -- questions about rows that never existed ------------------------------------------------
    def invent(self, rng: random.Random, spec: QuestionSpec) -> dict | None:
        if spec.table != "shop.products":
            return super().invent(rng, spec)
        name, _, _ = self._new_product(rng, set())
        return {"name": name}


@dataclass
class ChangeContext:
    """What a custom `change(ctx)` function gets; it runs inside the transaction of one change."""

    conn: object  # psycopg connection, inside the change's transaction
    rng: random.Random  # seeded from [arena] seed: use it for every choice, so runs repeat
    noisy: bool  # this change should be noise (drawn at the configured noise rate)

    def mark(self, kind: str, clean: dict | None = None, noise: bool | None = None) -> None:
        """Name the change (and, for a noisy value, the clean values the row should have)."""
        mark(self.conn, kind, self.noisy if noise is None else noise, clean)


class CustomWorkload(Workload):
    """A user's tables: `setup_sql` seeds them, `change` (Python) or `change_sql` changes them."""

    name = "custom"

    def __init__(self, config, settings: ArenaSettings):
        super().__init__(config, settings)
        self.function = None
        if settings.change:
            module, attr = settings.change.split(":", 1)
            base = str(Path(config.path).parent)
            if base not in sys.path:
                sys.path.insert(0, base)  # the user's module lives next to pgfresh.toml
            try:
                self.function = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError([f"arena.change: cannot import {settings.change} ({exc})"], str(config.path)) from None

    def setup(self, conn) -> None:
        if self.settings.setup_sql:
            path = Path(self.config.path).parent / self.settings.setup_sql
            if not path.exists():
                raise ConfigError([f"arena.setup_sql: {path} does not exist"], str(self.config.path))
            conn.execute(path.read_text())
        conn.execute("drop schema if exists arena cascade")
        install_recorder(conn, self.config.tables)

    def step(self, conn, noise: float) -> str:
        self.steps += 1
        noisy = self.rng.random() < noise
        with conn.transaction():
            if self.function is not None:
                ctx = ChangeContext(conn, self.rng, noisy)
                mark(conn, "noise:change" if noisy else "change", noisy)
                return self.function(ctx) or ("noise:change" if noisy else "change")
            statements = self.settings.noise_sql if noisy and self.settings.noise_sql else self.settings.change_sql
            i = self.rng.randrange(len(statements))
            kind = f"{'noise:' if noisy else ''}sql:{i}"
            mark(conn, kind, noisy)
            conn.execute(statements[i])
            return kind


def load_workload(config, settings: ArenaSettings | None = None) -> Workload:
    settings = settings or arena_settings(config)
    return (ShopWorkload if settings.workload == "shop" else CustomWorkload)(config, settings)


def drive(config, settings: ArenaSettings, dsn: str, stop, counter, errors) -> None:
    """Process target: commit changes at `settings.rate_per_s` until `stop` is set.

    Runs in its own process so that the workload neither competes for the arena's GIL nor counts
    in the arena's CPU measurements. `counter` (a shared int) counts changes; an exception is put
    on `errors` as text before the process exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the arena stops us
    try:
        workload = load_workload(config, settings)
        with db.connect(dsn, "arena-workload", autocommit=True) as conn:
            workload.attach(conn)
            interval = 1.0 / settings.rate_per_s
            next_at = time.monotonic()
            while not stop.is_set():
                workload.step(conn, settings.noise)
                with counter.get_lock():
                    counter.value += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # fell behind: do not burst to catch up
    except BaseException as exc:  # reported by the runner, which owns the console
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


def shop_config_text(source: dict) -> str:
    """A complete pgfresh.toml for the shop workload: `[source]` from `source`, then shop.toml."""
    from pgfresh.config import render_toml

    head = render_toml(source, [])
    return head + "\n" + resources.files("pgfresh").joinpath("workloads/shop.toml").read_text()
