"""The configuration's types: what `pgfresh.config` builds from pgfresh.toml, every stage reads.

A leaf module (it imports nothing of pgfresh's but the errors), so that the stages can name these
types while `pgfresh.config`, which validates every stage's section, imports the stages.
`check_section` is the one way a section's keys are checked against a spec (`[source]`,
`[[sources]]`, `[store]`, `[rag]`, `[train]`, `[train.model]`, `[retention]`, `[serve]`,
`[serve.router]`, `[arena]` and its tables): every problem of the section collected, each with its
key path. `number`, `integer` and `choice` build the common spec entries, so a section's spec reads as
one table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgfresh.errors import ConfigError

# (accepted types, check or None, what is expected): one key of a section, for `check_section`.
Entry = tuple[type | tuple[type, ...], Callable[[Any], bool] | None, str]
Spec = dict[str, Entry]  # key -> its Entry: one section's keys
NUMBER = (int, float)  # an integer or a float (a boolean is never a number: check_section)


@dataclass
class SourceConfig:
    dsn: str | None = None  # None: the embedded server in data_dir
    data_dir: str = ".pgfresh"
    slot: str = "pgfresh"
    publication: str = "pgfresh"
    max_txn_seconds: float = 5.0  # no transaction pgfresh opens on the source lives longer
    snapshot_chunk_rows: int = 10_000  # rows per snapshot chunk (one short transaction each)
    batch_max_changes: int = 5_000  # changes per sink transaction
    batch_max_seconds: float = 0.2  # flush a sink batch at least this often (freshness)
    wal_warn_mb: int = 1024  # warn when the slot retains more WAL than this
    max_slot_wal_keep_size_mb: int = 0  # >0: sync refuses a server whose max_slot_wal_keep_size is unlimited or larger
    reconnect_give_up_seconds: float = 300.0  # sync reconnects after a lost connection; exits (code 2) after this long
    name: str | None = None  # [[sources]] only: the source's name (None: the single [source])
    tenants: str | None = None  # [[sources]] only: the tenant scope; sources with the same one share tenants

    @property
    def tenant_prefix(self) -> str:
        """Put before every tenant value of this source in the store ('' for the single [source])."""
        return "" if self.name is None else f"{self.tenants or self.name}:"

    @property
    def table_prefix(self) -> str:
        """Put before every table name of this source in the store ('' for the single [source])."""
        return "" if self.name is None else f"{self.name}:"


@dataclass
class StoreConfig:
    """Where pgfresh keeps all its state (schema pgfresh): never the source database by default."""

    dsn: str | None = None  # None: the embedded server in <data_dir>/store (its own data directory and port)


@dataclass
class TableConfig:
    name: str  # schema-qualified, e.g. "public.products"
    key: list[str] | None = None  # None: the table's primary key
    tenant: str | None = None  # column holding the tenant id, if the table is multi-tenant
    document: str | None = None  # document template (render)
    facts: list[dict] | None = None  # fact templates (render); None: one per column; []: none (documents only)
    gate: dict = field(default_factory=dict)  # gate policy (gate)
    source: str | None = None  # [[sources]]: the source it comes from (name is then "source:schema.table")
    relation_name: str | None = None  # [[sources]]: schema.table in the source database

    @property
    def relation(self) -> str:
        """schema.table in the source database (`name` is the stored name, the same for the single [source])."""
        return self.relation_name or self.name

    @property
    def schema(self) -> str:
        return self.relation.split(".", 1)[0]

    @property
    def table(self) -> str:
        return self.relation.split(".", 1)[1]


@dataclass
class Config:
    source: SourceConfig
    tables: list[TableConfig]
    rag: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    arena: dict = field(default_factory=dict)
    store: StoreConfig = field(default_factory=StoreConfig)
    serve: dict = field(default_factory=dict)
    retention: dict = field(default_factory=dict)  # [retention]: pgfresh.retention owns its keys
    path: Path = Path("pgfresh.toml")
    sections: frozenset = frozenset()  # top-level sections present in the file: a stage runs only if asked for
    sources: list = field(default_factory=list)  # every SourceConfig ([source] alone, or the [[sources]])

    def __post_init__(self):
        if not self.sources:
            self.sources = [self.source]

    def for_source(self, name: str | None) -> "Config":
        """The view one capture loop runs: this source, its tables. The single [source] (or name None): the config itself."""
        if name is None or (len(self.sources) == 1 and name == self.sources[0].name):
            return self
        for s in self.sources:
            if s.name == name:
                return dataclasses.replace(self, source=s, sources=[s],
                                           tables=[t for t in self.tables if t.source == name])
        known = ", ".join(s.name for s in self.sources)
        raise ConfigError([f"sources: no source named {name!r} (known: {known})"], str(self.path))

    def source_views(self) -> list["Config"]:
        """One view per source, in file order."""
        return [self] if len(self.sources) == 1 else [self.for_source(s.name) for s in self.sources]

    def table(self, name: str) -> TableConfig:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def data_dir(self) -> Path:
        d = Path(self.source.data_dir)
        return d if d.is_absolute() else (self.path.parent / d).resolve()


def plain_table(name: str) -> TableConfig:
    """A table with no configuration (default document, default facts)."""
    return TableConfig(name=name if "." in name else f"public.{name}")


def _unit(unit: str) -> str:
    return f" ({unit})" if unit else ""


def number(lo: float, hi: float | None = None, *, above: bool = False, unit: str = "") -> Entry:
    """A number >= lo (> lo with `above`) and, with `hi`, <= hi; `unit` is named after it ("seconds")."""
    expected = f"a number {'>' if above else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "") + _unit(unit)
    return NUMBER, lambda v: (v > lo if above else v >= lo) and (hi is None or v <= hi), expected


def integer(lo: int, hi: int | None = None, *, unit: str = "") -> Entry:
    """An integer >= lo and, with `hi`, <= hi; `unit` is named after it ("bytes")."""
    expected = (f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}") + _unit(unit)
    return int, lambda v: v >= lo and (hi is None or v <= hi), expected


def choice(*options: str) -> Entry:
    """One of `options` (strings)."""
    return str, lambda v: v in options, f"one of {', '.join(options)}"


def check_section(raw: dict, where: str, spec: Spec, problems: list[str]) -> dict:
    """The keys of one section (`raw`, at key path `where`) that pass `spec`; every one that does not
    is one problem in `problems`: an unknown key (the known ones listed), a value of the wrong type (a
    boolean is never a number) or one its check refuses ("expected <what>, got <value>")."""
    good = {}
    for key, value in raw.items():
        if key not in spec:
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(spec)})")
            continue
        kinds, ok, expected = spec[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or \
                (ok is not None and not ok(value)):
            problems.append(f"{where}.{key}: expected {expected}, got {value!r}")
            continue
        good[key] = value
    return good
