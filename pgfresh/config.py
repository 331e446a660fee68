"""pgfresh.toml: typed configuration, validated once at load, every problem reported at once.

The file has a `[source]` section (where the data comes from and how gently to read it), or several
`[[sources]]` (each a database with a `name`, its own slot, publication and progress, all into one
store), one `[[tables]]` entry per captured table, and one section per later stage (`[rag]`, `[train]`,
`[arena]`). This module owns `source` and the core of each table (name, key, tenant). The keys a
stage owns (`tables.*.gate`, `tables.*.document`, `tables.*.facts`, `[rag]`, `[train]`) are checked
by that stage's `check_config(config) -> list[str]` (registered in `pgfresh.stages`), called from
`load` so that one load reports every problem in the file, each with its key path. The types
themselves live in `pgfresh.configtypes` (re-exported here), so the stages can name them.

Several sources (`[[sources]]`): each table names its source (`source = "billing"`), and is kept in
the store as `billing:public.invoices` (its *stored name*, unique across sources; `relation` is
its name in the source database). A tenant value of a source is kept as `billing:acme`, so the same
value in two sources is two tenants, unless the sources say they share tenants (`tenants = "shop"`
on both: then `shop:acme` in each). The single `[source]` form is one source with no prefixes.
`Config.for_source(name)` is the view one capture loop runs: that source and its tables.

Environment variables are read only at the edge (the CLI), never here.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from pgfresh import stages
from pgfresh.configtypes import (Config, SourceConfig, Spec, StoreConfig, TableConfig,  # noqa: F401  (re-exported)
                                 check_section, plain_table)
from pgfresh.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


_SLUG = re.compile(r"^[a-z_][a-z0-9_]*$")
_NUM = (int, float)


def _positive(v) -> bool:
    return v > 0


def _slug(v) -> bool:
    return bool(_SLUG.match(v))


_SOURCE_SPEC: Spec = {
    "dsn": (str, None, "a libpq connection string"),
    "data_dir": (str, None, "a directory path"),
    "slot": (str, _slug, "a replication slot name (lower-case letters, digits and _)"),
    "publication": (str, _slug, "a publication name (lower-case letters, digits and _)"),
    "max_txn_seconds": (_NUM, _positive, "a number of seconds > 0"),
    "snapshot_chunk_rows": (int, _positive, "a positive integer"),
    "batch_max_changes": (int, _positive, "a positive integer"),
    "batch_max_seconds": (_NUM, _positive, "a number of seconds > 0"),
    "wal_warn_mb": (int, _positive, "a positive integer (MB)"),
    "max_slot_wal_keep_size_mb": (int, lambda v: v >= 0, "an integer >= 0 (MB; 0: no bound required)"),
    "reconnect_give_up_seconds": (_NUM, _positive, "a number of seconds > 0"),
}
_SOURCES_SPEC: Spec = {  # an entry of [[sources]]: a [source] with a name and a tenant scope
    **_SOURCE_SPEC,
    "name": (str, _slug, "the source's name (lower-case letters, digits and _)"),
    "tenants": (str, _slug, "a tenant scope name shared by sources that share tenants (lower-case letters, digits and _)"),
}


def _parse_source(raw: Any, problems: list[str], where: str = "source") -> SourceConfig:
    src = SourceConfig()
    if raw is None:
        return src
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table ([{where}])")
        return src
    spec = _SOURCE_SPEC if where == "source" else _SOURCES_SPEC
    for key, value in check_section(raw, where, spec, problems).items():
        setattr(src, key, float(value) if spec[key][0] == _NUM else value)
    if src.dsn == "":
        src.dsn = None
    return src


def _parse_sources(raw: Any, problems: list[str]) -> list[SourceConfig]:
    """[[sources]]: each a [source] with a name (and optionally a shared tenant scope). Slots default to
    pgfresh_<name>; names and slots (each a pipeline in the store) are unique; one data directory."""
    if not isinstance(raw, list) or not raw:
        problems.append("sources: expected one or more [[sources]] entries")
        return []
    sources = []
    for i, entry in enumerate(raw):
        where = f"sources[{i}]"
        src = _parse_source(entry, problems, where)
        if isinstance(entry, dict):
            if src.name is None and "name" not in entry:
                problems.append(f"{where}.name: every [[sources]] entry needs a name (lower-case letters, digits, _)")
            if "slot" not in entry and src.name:
                src.slot = f"pgfresh_{src.name}"
        sources.append(src)
    for key in ("name", "slot"):
        seen: set = set()
        for i, s in enumerate(sources):
            value = getattr(s, key)
            if value is not None and value in seen:
                problems.append(f"sources[{i}].{key}: {value} is used by another source; each source needs its own")
            seen.add(value)
    for i, (s, entry) in enumerate(zip(sources, raw)):  # one data directory (the embedded store's), the first's
        if i and isinstance(entry, dict) and "data_dir" in entry and s.data_dir != sources[0].data_dir:
            problems.append(f"sources[{i}].data_dir: the sources share one data directory: set it on the first only")
        s.data_dir = sources[0].data_dir
    return sources


def _parse_store(raw: Any, problems: list[str]) -> StoreConfig:
    store = StoreConfig()
    if raw is None:
        return store
    if not isinstance(raw, dict):
        problems.append("store: expected a table ([store])")
        return store
    store.dsn = check_section(raw, "store", {"dsn": (str, None, "a libpq connection string")}, problems).get("dsn") or None
    return store


_TABLE_SPEC = {
    "name": (str, bool, "a table name like 'public.products'"),
    "key": ((str, list), lambda v: bool(v) and all(isinstance(k, str) and _NAME.match(k) for k in ([v] if isinstance(v, str) else v)),
            "a column name or a list of column names"),
    "tenant": (str, lambda v: bool(_NAME.match(v)), "a column name"),
    "document": (str, None, "a template string"),
    "facts": (list, None, "a list of fact templates ([[tables.facts]])"),
    "gate": (dict, None, "a table ([tables.gate])"),
    "source": (str, None, "the name of one of the [[sources]]"),
}


def _parse_table(i: int, raw: Any, problems: list[str]) -> TableConfig:
    path = f"tables[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a table ([[tables]])")
        return TableConfig(name=f"invalid.tables_{i}")  # a stand-in that keeps later indices right
    good = check_section(raw, path, _TABLE_SPEC, problems)
    if "name" not in raw:
        problems.append(f"{path}.name: expected a table name like 'public.products'")
    name = good.get("name")
    if name is not None and "." not in name:
        name = f"public.{name}"
    if name is not None:
        parts = name.split(".")
        if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
            problems.append(f"{path}.name: expected schema.table of plain identifiers, got {raw['name']!r}")
            name = None
    # A table with a bad name stays in the list under a stand-in name, so the stages still check the
    # rest of it and every tables[i] path keeps its index; the load fails on the name anyway.
    t = TableConfig(name=name or f"invalid.tables_{i}")
    if "key" in good:
        t.key = [good["key"]] if isinstance(good["key"], str) else good["key"]
    for key in ("tenant", "document", "facts", "gate", "source"):
        if key in good:
            setattr(t, key, good[key])
    return t


def _assign_sources(tables: list[TableConfig], sources: list[SourceConfig], multi: bool,
                    problems: list[str]) -> None:
    """[[sources]]: each table belongs to a source (the only one if there is one) and gets its stored name."""
    names = [s.name for s in sources]
    for i, t in enumerate(tables):
        if not multi:
            if t.source is not None:
                problems.append(f"tables[{i}].source: only with [[sources]] (this file has one [source])")
                t.source = None
            continue
        if t.source is None and len(sources) == 1:
            t.source = sources[0].name
        if t.source is None:
            problems.append(f"tables[{i}].source: expected the name of one of the [[sources]] ({', '.join(map(str, names))})")
        elif t.source not in names:
            problems.append(f"tables[{i}].source: no source named {t.source!r} (known: {', '.join(map(str, names))})")
        else:
            t.relation_name, t.name = t.name, f"{t.source}:{t.name}"


def _non_finite(value: Any, path: str, found: list[str]) -> None:
    """Key paths of every nan or inf in the file: TOML allows them, no pgfresh setting means them."""
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path)
    elif isinstance(value, dict):
        for k, v in value.items():
            _non_finite(v, f"{path}.{k}" if path else str(k), found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _non_finite(v, f"{path}[{i}]", found)


def parse(raw: dict, path: Path = Path("pgfresh.toml")) -> Config:
    """Build a Config from parsed TOML; raise ConfigError listing every problem (core and stages) at once."""
    problems: list[str] = []
    non_finite: list[str] = []
    _non_finite(raw, "", non_finite)
    known = {"source", "sources", "store", "tables", "rag", "train", "arena", "serve", "retention"}
    for key in raw:
        if key not in known:
            problems.append(f"{key}: unknown section (known: {', '.join(sorted(known))})")
    multi = "sources" in raw
    if multi and "source" in raw:
        problems.append("source: use either one [source] or several [[sources]], not both")
    sources = _parse_sources(raw["sources"], problems) if multi else [_parse_source(raw.get("source"), problems)]
    sources = sources or [SourceConfig()]
    source = sources[0]
    store = _parse_store(raw.get("store"), problems)
    tables: list[TableConfig] = []
    raw_tables = raw.get("tables", [])
    if not isinstance(raw_tables, list):
        problems.append("tables: expected a list of [[tables]] entries")
        raw_tables = []
    for i, rt in enumerate(raw_tables):
        tables.append(_parse_table(i, rt, problems))
    _assign_sources(tables, sources, multi, problems)
    seen = set()
    for i, t in enumerate(tables):
        if t.name in seen:
            problems.append(f"tables[{i}].name: {t.name} is listed twice")
        seen.add(t.name)
    sections = {}
    for name in ("rag", "train", "arena", "serve", "retention"):
        value = raw.get(name, {})
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a table ([{name}])")
            value = {}
        sections[name] = value
    config = Config(source=source, tables=tables, store=store, path=path, sections=frozenset(raw), sources=sources,
                    **sections)
    # The stages check their sections even when the core has problems: one load reports them all.
    problems += stages.check_config(config)
    if non_finite:  # one problem per nan/inf, not a second one in a stage's own words
        problems = [p for p in problems if not any(p.startswith(f"{k}:") for k in non_finite)]
        problems += [f"{k}: expected a finite number, got {_lookup(raw, k)!r}" for k in non_finite]
    if problems:
        raise ConfigError(problems, str(path))
    return config


def _lookup(raw: Any, key_path: str) -> Any:
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key_path):
        raw = raw[int(part[1:-1])] if part.startswith("[") else raw[part]
    return raw


def load(path: str | Path = "pgfresh.toml") -> Config:
    """Read and validate pgfresh.toml. A missing, unreadable or non-UTF-8 file is one clear error."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(["not found; create it with `pgfresh init` (or pass --config PATH)"], str(path))
    if path.is_dir():
        raise ConfigError(["is a directory; pass the pgfresh.toml file inside it (--config PATH)"], str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot be read ({exc.strerror or exc})"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                           "save it as UTF-8"], str(path)) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    return parse(raw, path.resolve())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def render_toml(source: dict, tables: list[dict], store: dict | None = None) -> str:
    """A starting pgfresh.toml: the source section, the store (if not the default) and one
    [[tables]] entry per table."""
    out = ["# pgfresh configuration: see docs/CONFIG.md", "", "[source]"]
    for k, v in source.items():
        if v is not None:
            out.append(f"{k} = {_toml_value(v)}")
    if store:
        out += ["", "# Where pgfresh keeps its state (default: an embedded server in data_dir/store).", "[store]"]
        out += [f"{k} = {_toml_value(v)}" for k, v in store.items() if v is not None]
    for t in tables:
        out += ["", "[[tables]]"]
        for k, v in t.items():
            if v is not None:
                out.append(f"{k} = {_toml_value(v)}")
    return "\n".join(out) + "\n"
