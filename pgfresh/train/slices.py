"""Slices: versions of a tenant's model, where they are stored, and how they are loaded and served.

A version is a row of `pgfresh.slice_versions` plus, for a trained version, a directory in
`<data_dir>/slices/<slice>/` holding its LoRA adapter (or, for `method = "full"`, all weights),
whose sha256 is recorded so a corrupted file is caught before it serves. A version is loaded as
its lineage: the base model, then every adapter from the base to it, merged in order.

A version records how far it has read each pipeline's stream (`positions`, migration 017): per
pipeline (source), the newest LSN of the facts its lineage learnt. LSNs of two pipelines cannot be
compared (two servers, or two slots that progress on their own), so "does this version know row r"
is asked of the position in r's pipeline (pgfresh.serve.router); `lsn` is only the newest of them all.

Serving is not here: `pgfresh.serve.answer(..., mode="tuned")` answers from the current published
version, loaded through the serve registry (`Registry.slice_model`), which reloads when the pointer
moves (a publish or a rollback) and keeps the version in memory serving if the new one cannot load.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from psycopg.types.json import Jsonb

from pgfresh import db
from pgfresh.errors import PgfreshError

WEIGHT_FILES = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


class SliceError(PgfreshError):
    """A slice or version is missing, or its files are corrupted or do not fit the base model."""


@dataclass
class Version:
    slice: str
    version: int
    parent: int | None
    kind: str
    base_id: str
    path: str
    sha256: str | None
    lsn: str
    facts: int
    metrics: dict
    round_id: int | None
    created_at: object = None
    positions: dict | None = None  # pipeline -> LSN; None (written without): `lsn` stands for every pipeline


_VERSION_COLS = ("slice, version, parent, kind, base_id, path, sha256, lsn::text, facts, metrics, round_id, created_at,"
                 " positions")


def connect(config, role: str = "train"):
    """An autocommit connection with pgfresh's schema migrated (reads are single statements)."""
    conn = db.connect(db.store_dsn(config), role, autocommit=True)
    db.migrate(conn)
    return conn


def slice_dir(config, name: str) -> Path:
    """Where a slice's versions live: the name made safe for a path, plus a hash against collisions."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]
    return config.data_dir / "slices" / f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def get_version(conn, name: str, version: int) -> Version | None:
    row = conn.execute(f"select {_VERSION_COLS} from pgfresh.slice_versions where slice = %s and version = %s",
                       (name, version)).fetchone()
    return Version(*row) if row else None


def current(conn, name: str) -> Version | None:
    """The slice's published version now serving (None: no slice yet)."""
    row = conn.execute("select current_version from pgfresh.slices where name = %s", (name,)).fetchone()
    return get_version(conn, name, row[0]) if row and row[0] is not None else None


def lineage(conn, v: Version) -> list[Version]:
    """The versions from the lineage's base to `v`, in order."""
    chain = [v]
    while chain[-1].parent is not None:
        chain.append(get_version(conn, v.slice, chain[-1].parent))
    return chain[::-1]


def ensure_slice(conn, name: str, tenant: str | None) -> None:
    conn.execute("insert into pgfresh.slices (name, tenant) values (%s, %s) on conflict (name) do nothing",
                 (name, tenant))


def record_positions(conn, name: str, version: int) -> dict:
    """Write the version's position per pipeline: its parent's, advanced to the newest LSN per
    pipeline of the facts it learnt (its fact_training rows other than replay, which the caller has
    just written in the same transaction). Returns the positions."""
    parent = conn.execute("select p.positions, p.lsn::text from pgfresh.slice_versions v"
                          " join pgfresh.slice_versions p on p.slice = v.slice and p.version = v.parent"
                          " where v.slice = %s and v.version = %s", (name, version)).fetchone()
    if parent is not None and parent[0] is None:  # a parent written without positions: its LSN for every pipeline
        inherited = {p: parent[1] for (p,) in conn.execute("select distinct pipeline from pgfresh.tables")}
    else:
        inherited = parent[0] if parent is not None else {}
    positions = dict(conn.execute(
        "select pipeline, max(lsn)::text from ("
        " select key as pipeline, value::pg_lsn as lsn from jsonb_each_text(%s)"
        " union all"
        " select f.pipeline, f.lsn from pgfresh.fact_training t join pgfresh.facts f on f.fact_id = t.fact_id"
        " where t.slice = %s and t.version = %s and t.role <> 'replay') x group by pipeline",
        (Jsonb(inherited), name, version)).fetchall())
    conn.execute("update pgfresh.slice_versions set positions = %s where slice = %s and version = %s",
                 (Jsonb(positions), name, version))
    return positions


# --- loading ------------------------------------------------------------------------------------

def load_version(config, conn, v: Version, device: str = "cpu"):
    """The model of version `v`: its base, then each adapter of its lineage merged in order."""
    from pgfresh import model as base_model

    chain = lineage(conn, v)
    start = max(i for i, x in enumerate(chain) if x.kind in ("base", "full"))
    root = chain[0]
    loaded = base_model.load(root.path, device=device)
    if loaded.base_id != root.base_id:
        raise SliceError(f"slice {v.slice!r} version {v.version} was trained on base model {root.base_id} at "
                         f"{root.path}, which now holds {loaded.base_id}; run `pgfresh train --once` to train the "
                         "slice on the new base (or restore the old model directory)")
    if chain[start].kind == "full":
        _check_file(chain[start])
        loaded = _load_full(loaded, chain[start], device)
    for x in chain[start + 1:]:
        _check_file(x)
        loaded.model = _merge_adapter(loaded.model, x)
    loaded.model.eval()
    return loaded


def _check_file(v: Version) -> None:
    path = Path(v.path) / WEIGHT_FILES[v.kind]
    if not path.exists():
        raise SliceError(f"slice {v.slice!r} version {v.version}: {path} is missing; roll back with "
                         f"`pgfresh slices rollback {v.slice} {v.parent}`")
    if file_sha256(path) != v.sha256:
        raise SliceError(f"slice {v.slice!r} version {v.version}: {path} is corrupted (sha256 differs from the one "
                         f"recorded at publish); roll back with `pgfresh slices rollback {v.slice} {v.parent}`")


def _merge_adapter(model, v: Version):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, v.path).merge_and_unload()
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        raise SliceError(f"slice {v.slice!r} version {v.version}: the adapter in {v.path} does not fit the base "
                         f"model ({str(exc).splitlines()[0][:200]})") from None


def _load_full(loaded, v: Version, device: str):
    from transformers import AutoModelForCausalLM

    try:
        loaded.model = AutoModelForCausalLM.from_pretrained(v.path).to(device)
    except (ValueError, RuntimeError, OSError) as exc:
        raise SliceError(f"slice {v.slice!r} version {v.version}: weights in {v.path} cannot be loaded "
                         f"({str(exc).splitlines()[0][:200]})") from None
    return loaded


# --- listing and rollback -----------------------------------------------------------------------

def list_versions(config, tenant: str | None = None) -> list[dict]:
    """Every published version (of one tenant's slice, or all), with its metrics and whether it serves."""
    with connect(config, "train") as conn:
        where = "where v.slice = %s" if tenant is not None else ""
        params = (_slice_arg(tenant),) if tenant is not None else ()
        rows = conn.execute(
            f"select v.slice, s.tenant, v.version, v.parent, v.kind, v.lsn::text, v.facts, v.metrics, v.round_id,"
            f" v.created_at, v.version = s.current_version, v.base_id, s.note, v.positions"
            f" from pgfresh.slice_versions v join pgfresh.slices s on s.name = v.slice {where}"
            f" order by v.slice, v.version", params).fetchall()
        rejected = dict(conn.execute("select slice, count(*) from pgfresh.train_rounds where status = 'rejected'"
                                     " group by slice").fetchall())
    keys = ("slice", "tenant", "version", "parent", "kind", "lsn", "facts", "metrics", "round", "created_at", "current",
            "base_id", "note", "positions")
    out = [dict(zip(keys, r)) for r in rows]
    for r in out:
        r["rejected_rounds"] = rejected.get(r["slice"], 0)
    return out


def _slice_arg(name: str) -> str:
    """The CLI names a slice as `pgfresh slices` lists it: the tenant (with one more '_' in front
    when the tenant starts with '_'), '_shared' for facts without a tenant."""
    return name


def rollback(config, tenant: str, version: int) -> dict:
    """Make `version` the slice's serving version again; later versions stay listed but do not serve."""
    name = _slice_arg(tenant)
    with connect(config, "train") as conn:
        with conn.transaction():
            row = conn.execute("select current_version from pgfresh.slices where name = %s for update", (name,)).fetchone()
            if row is None:
                raise SliceError(f"no slice {name!r}; `pgfresh slices` lists them (a tenant that starts with '_' is "
                                 "named with one more '_' in front; '_shared' is the slice of facts without a tenant)")
            v = get_version(conn, name, version)
            if v is None:
                raise SliceError(f"slice {name!r} has no version {version}; `pgfresh slices --tenant {name}` lists them")
            if v.kind != "base":
                _check_file(v)
            conn.execute("update pgfresh.slices set current_version = %s, updated_at = now() where name = %s",
                         (version, name))
    return {"slice": name, "from": row[0], "to": version, "lsn": v.lsn}
