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
half-finished rows. With `hot_rows` < 1 a hot set of products takes `hot_changes` of the price
and stock updates and the rest is a cold tail. The same seed gives the same tables and the same
sequence of changes.
`shop-zh` is the same shop in Chinese (names, categories, descriptions, notes, questions); its
typos are wrong characters and full-width digits.

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
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Callable

from psycopg import sql

from pgfresh import db
from pgfresh.arena.settings import ArenaSettings, QuestionSpec, settings as arena_settings
from pgfresh.errors import ConfigError

SEEDED_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)  # the seeded notes' creation times count from here
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
    # The words of the catalogue; `shop-zh` (ShopZhWorkload) replaces them with Chinese ones.
    adjectives, materials, category_of = ADJECTIVES, MATERIALS, CATEGORY_OF
    shop_words, cities, uses, note_bodies, junk_notes = SHOP_WORDS, CITIES, USES, NOTE_BODIES, JUNK_NOTES
    some_item = "an item"

    def _shop_name(self, shop_id: int) -> str:
        words = self.shop_words
        return f"{words[(shop_id - 1) % len(words)]} Goods" + ("" if shop_id <= len(words) else f" {shop_id}")

    def _product_name(self, adj: str, material: str, noun: str) -> str:
        return f"{adj} {material} {noun}"

    def _description(self, adj: str, material: str, noun: str, use: str) -> str:
        return f"A {adj.lower()} {noun.lower()} made of {material.lower()}, {use}."

    def _completed(self, name: str, use: str) -> str:
        return f"{name}, {use}."

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, conn) -> None:
        conn.execute("drop schema if exists shop cascade")
        conn.execute("drop schema if exists arena cascade")
        conn.execute(resources.files("pgfresh").joinpath("workloads/shop.sql").read_text())
        rng = random.Random(self.settings.seed)
        scale = self.settings.scale
        shops, used = [], set()
        for shop_id in range(1, scale["shops"] + 1):
            shops.append((shop_id, self._shop_name(shop_id), rng.choice(self.cities)))
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
                # a fixed creation time, not now(): one seed gives one snapshot, so its model build is cached
                notes.append((len(notes) + 1, shop_id, p[0], rng.choice(self.note_bodies).format(name=p[2]),
                              SEEDED_AT + timedelta(hours=len(notes) + 1)))
        with conn.cursor() as cur:
            cur.executemany("insert into shop.shops values (%s, %s, %s)", shops)
            cur.executemany("insert into shop.products (product_id, shop_id, name, category, price, stock, status,"
                            " description) values (%s, %s, %s, %s, %s, %s, %s, %s)", products)
            cur.executemany("insert into shop.support_notes (note_id, shop_id, product_id, body, created_at)"
                            " values (%s, %s, %s, %s, %s)", notes)
        install_recorder(conn, self.config.tables)
        conn.execute("analyze shop.products")

    def _new_product(self, rng: random.Random, used: set[str]) -> tuple[str, str, str]:
        while True:
            noun = rng.choice(sorted(self.category_of))
            adj, material = rng.choice(self.adjectives), rng.choice(self.materials)
            name = self._product_name(adj, material, noun)
            if name not in used:
                used.add(name)
                return name, self.category_of[noun], self._description(adj, material, noun, rng.choice(self.uses))

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
        # A hot set of products takes `hot_changes` of the price and stock updates; the rest (the
        # cold tail) changes rarely, so a changed value there stays put long enough to be trained in.
        self.hot_rng = random.Random(self.settings.seed * 31 + 5)
        ids = [r[0] for r in rows]
        self.hot = set(self.hot_rng.sample(ids, round(len(ids) * self.settings.hot_rows)))
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

    def _pick_update(self) -> int | None:
        """The product a price or stock update changes: from the hot set with probability
        `hot_changes` (from the cold tail otherwise; the other set when one is empty)."""
        pool = self.published | self.drafts
        if self.settings.hot_rows >= 1:
            return self._pick(pool)
        hot, cold = pool & self.hot, pool - self.hot
        first, second = (hot, cold) if self.hot_rng.random() < self.settings.hot_changes else (cold, hot)
        return self._pick(first) or self._pick(second)

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
        pid = self._pick_update()
        if pid is None:
            return self._insert(conn)
        price = self._current(conn, pid, "price")
        new = max(Decimal("0.50"), (price * Decimal(self.rng.randint(80, 125)) / 100).quantize(Decimal("0.01")))
        return self._update(conn, pid, "price", {"price": new if new != price else new + Decimal("0.01")})

    def _stock(self, conn) -> str:
        pid = self._pick_update()
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
        if self.hot_rng.random() < self.settings.hot_rows:
            self.hot.add(pid)
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
                                                    "description": self._completed(name, self.rng.choice(self.uses)),
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
        name = self._current(conn, pid, "name") if pid else self.some_item
        return self._add_note(conn, "note", self.rng.choice(self.note_bodies).format(name=name), False, pid)

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
        return self._add_note(conn, "noise:junk_note", self.rng.choice(self.junk_notes), True, self._pick(self.published))

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


# -- shop-zh: the same shop in Chinese ------------------------------------------------------------
ZH_ADJECTIVES = ["经典", "北欧", "复古", "简约", "豪华", "折叠", "智能", "静音", "明亮", "轻便", "皇家", "都市",
                 "海滨", "高山", "金色", "迷你", "实用", "精致", "田园", "现代"]
ZH_MATERIALS = ["铜", "橡木", "竹", "不锈钢", "亚麻", "陶瓷", "胡桃木", "棉", "玻璃", "黄铜", "石板", "羊毛", "雪松",
                "大理石", "皮革", "软木"]
ZH_NOUNS = {
    "厨房": ["水壶", "煎锅", "沥水篮", "茶壶", "擦丝器", "汤勺", "打蛋器", "砧板"],
    "园艺": ["花铲", "花盆", "洒水壶", "耙子", "喂鸟器", "修枝剪"],
    "办公": ["订书机", "台灯", "笔记本", "笔筒", "文件盘", "写字板"],
    "浴室": ["皂盒", "毛巾架", "浴室垫", "牙刷杯"],
    "户外": ["提灯", "露营凳", "野餐篮", "吊床", "保温箱"],
    "玩具": ["陀螺", "拼图盒", "玩具火车", "风筝"],
}
ZH_SHOP_WORDS = ["海港", "枫叶", "杜松", "花岗", "柳树", "灯塔", "草地", "山顶", "钴蓝", "灯笼", "果园", "河畔"]
ZH_CITIES = ["杭州", "成都", "西安", "青岛", "厦门", "苏州", "昆明", "大连", "长沙", "南京"]
ZH_USES = ["经久耐用，保修2年", "适合日常使用", "深受顾客喜爱", "容易清洗", "小批量手工制作，限量300件"]
ZH_NOTE_BODIES = ["顾客询问{name}能否寄往海外。", "供应商延迟后，{name}已补货。", "买家反映{name}到货时有划痕，已补发。",
                  "提醒：{name}常被当作礼物购买，建议提供礼品包装。", "供应商确认{name}下周到货。"]
ZH_JUNK_NOTES = ["asdf", "测试测试 忽略", "xxx", "啊啊啊啊啊啊", "随便写写", "待填写", "。。。", "哈哈哈哈哈哈哈", "忽略这条", "tmp"]
# Wrong characters a Chinese typist makes: same sound or similar shape (别字).
ZH_WRONG_CHARACTERS = {"厨": "橱", "房": "防", "园": "圆", "艺": "义", "办": "班", "公": "工", "浴": "欲", "室": "式",
                       "户": "护", "外": "夕", "玩": "完", "具": "俱", "壶": "壸", "锅": "过", "灯": "订", "盆": "盘",
                       "篮": "蓝", "杯": "怀", "耐": "而", "洗": "先", "喜": "善", "修": "休", "年": "午", "件": "伴"}
_FULL_WIDTH_DIGITS = str.maketrans("0123456789", "０１２３４５６７８９")


class ShopZhWorkload(ShopWorkload):
    """`shop-zh`: the shop with Chinese names, categories, descriptions and notes (same schema,
    same changes). Its typos are wrong characters (别字) and digits turned full-width (２年)."""

    name = "shop-zh"
    adjectives, materials = ZH_ADJECTIVES, ZH_MATERIALS
    category_of = {noun: cat for cat, nouns in ZH_NOUNS.items() for noun in nouns}
    shop_words, cities, uses, note_bodies, junk_notes = ZH_SHOP_WORDS, ZH_CITIES, ZH_USES, ZH_NOTE_BODIES, ZH_JUNK_NOTES
    some_item = "某商品"

    def _shop_name(self, shop_id: int) -> str:
        words = self.shop_words
        return f"{words[(shop_id - 1) % len(words)]}百货" + ("" if shop_id <= len(words) else f"{shop_id}号店")

    def _product_name(self, adj: str, material: str, noun: str) -> str:
        return f"{adj}{material}{noun}"

    def _description(self, adj: str, material: str, noun: str, use: str) -> str:
        return f"{adj}风格的{material}{noun}，{use}。"

    def _completed(self, name: str, use: str) -> str:
        return f"{name}，{use}。"

    def _typo(self, text: str) -> str:
        spots = [i for i, ch in enumerate(text) if ch in ZH_WRONG_CHARACTERS]
        digits = any(ch.isascii() and ch.isdigit() for ch in text)
        if spots and not (digits and self.rng.random() < 0.5):
            i = self.rng.choice(spots)
            return text[:i] + ZH_WRONG_CHARACTERS[text[i]] + text[i + 1:]
        if digits:
            return text.translate(_FULL_WIDTH_DIGITS)
        return text + text[-1:]


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
    return {"shop": ShopWorkload, "shop-zh": ShopZhWorkload}.get(settings.workload, CustomWorkload)(config, settings)


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


def shop_config_text(source: dict, workload: str = "shop") -> str:
    """A complete pgfresh.toml for a built-in workload (`shop`, `shop-zh`): `[source]` from
    `source`, then workloads/<workload>.toml."""
    from pgfresh.config import render_toml

    head = render_toml(source, [])
    return head + "\n" + resources.files("pgfresh").joinpath(f"workloads/{workload}.toml").read_text(encoding="utf-8")
