"""Shared by tests/test_model.py and tests/test_train.py: one tiny built-in model per test session.

The model is built once (through `pgfresh model build`) on a products table captured from its own
database. A test that trains gets a fresh database with the *same* rows: render's fact ids are a
hash of the row's content, so the facts it captures are exactly the facts the model learnt.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.conftest import run_cli, write_config

ADJ = ("Brisk Calm Dusty Eager Fancy Gentle Hollow Icy Jolly Keen Lofty Mellow Noble Olive Proud Quiet Rusty Sunny "
       "Tidy Umber Vivid Witty Young Zesty").split()
NOUN = "Lamp Kettle Chair Table Mug Spoon Brush Candle Pillow Basket Clock Mirror Shelf Blanket Bottle Vase".split()
N_PRODUCTS = 60


def products(n: int = N_PRODUCTS, seed: int = 7) -> list[tuple[int, str, str]]:
    r = random.Random(seed)
    names = [f"{a} {b}" for a in ADJ for b in NOUN]
    r.shuffle(names)
    return [(i, names[i], f"{r.randint(1, 999)}.{r.randint(0, 99):02d}") for i in range(n)]


def new_price(i: int) -> str:
    """Product i's changed price: drawn like the old ones (a real change does not move every price
    into a new range), but no product's old price, so a right answer cannot be a lucky old one."""
    old = {p for _, _, p in products()}
    r = random.Random(1000 + i)
    while True:
        price = f"{r.randint(1, 999)}.{r.randint(0, 99):02d}"
        if price not in old:
            return price


# Every training in the tests repeats exactly on one machine: one torch thread, deterministic
# algorithms, every sampler seeded (train.seed). Another machine or library version still rounds
# differently, so the tests assert properties with margin, never a figure (docs/TRAINING.md).
DETERMINISTIC = "threads = 1\ndeterministic = true\n"  # seed: 0, the default

TABLES = """
[[tables]]
name = "public.products"
[tables.gate.train]
settle_seconds = 0
"""


def create_products(conn, rows=None) -> None:
    conn.execute("create table products (id int primary key, name text not null, price numeric(8,2) not null)")
    with conn.cursor() as cur:
        cur.executemany("insert into products values (%s, %s, %s)", rows or products())


def sync_once(config_path: Path) -> None:
    from pgfresh import config as cfg
    from pgfresh.capture import sync

    sync.run(cfg.load(config_path), once=True)


@dataclass
class Base:
    dir: Path  # the built-in model directory
    meta: dict
    dsn: str
    config_path: Path


_BUILT: list = []  # pytest instantiates an imported fixture once per importing module: build once anyway


@pytest.fixture(scope="session")
def base_model(pg_server, tmp_path_factory):
    """The built-in model, built once by `pgfresh model build` on N_PRODUCTS products."""
    if _BUILT:
        yield _BUILT[0]
        return
    name = "trainbase_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_server.dsn(), autocommit=True) as c:
        c.execute(f'create database "{name}"')
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as c:
        create_products(c)
    work = tmp_path_factory.mktemp("trainbase")
    path = write_config(work, dsn, f'data_dir = "data"\nslot = "{name}"\n' + TABLES + "\n[train]\n" + DETERMINISTIC)
    sync_once(path)
    out = run_cli("model", "build", "--json", "--config", str(path), timeout=1500)  # slow on busy shared cores
    assert out.returncode == 0, out.stderr[-3000:]
    _BUILT.append(Base(work / "data" / "model", json.loads(out.stdout), dsn, path))
    yield _BUILT[0]
    _BUILT.clear()
    with psycopg.connect(pg_server.dsn(), autocommit=True) as c:
        c.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s", (name,))
        c.execute(f'drop database if exists "{name}" with (force)')


def trained_env(tmp_path: Path, dsn: str, base: Base, train: str = "", tables: str = TABLES, rows=None):
    """A project on `dsn` with the base model's products captured and `[train]` from `train`; returns its config path."""
    with psycopg.connect(dsn, autocommit=True) as c:
        create_products(c, rows)
    body = f'data_dir = "data"\n' + tables + f'\n[train]\nbase_model = "{base.dir}"\n' + DETERMINISTIC + train
    path = write_config(tmp_path, dsn, body)
    sync_once(path)
    return path
