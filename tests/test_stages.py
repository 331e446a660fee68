"""The wiring of the stages: the registry drives `status`, and pgfresh's modules import without cycles.

`pgfresh.stages` registers every stage after capture with all its hooks; these tests check what
the registry promises: a stage missing a hook is refused, `status` reports every stage that has a
section (train included), and no module of pgfresh imports, at module level, a module that imports
it back (an import hidden inside a function to dodge a cycle shows up here once it moves to the top).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from pgfresh import stages
from pgfresh import db as pgdb
from tests.conftest import write_config
from tests.test_cli import run_main

PACKAGE = Path(__file__).resolve().parent.parent / "pgfresh"


def test_a_stage_missing_a_hook_is_refused_when_registered():
    with pytest.raises(TypeError):
        stages.Stage("x", asked=lambda c: True, workers=None, status=None, check_config=None)  # no check_against_columns
    with pytest.raises(TypeError, match="must be callable"):
        stages.Stage("x", asked=lambda c: True, workers=None, status="pgfresh.x.counts", check_config=None,
                     check_against_columns=None)
    assert [s.name for s in stages.STAGES if s.status is not None] == ["gate", "rag", "train"]


def test_status_reports_the_train_section(dsn, tmp_path, capsys):
    """The train section (slices, versions, rounds passed and rejected) is in `status --json` and the text."""
    path = write_config(tmp_path, dsn, "[train]\n")
    with pgdb.connect(dsn, "test", autocommit=True) as conn:
        pgdb.migrate(conn)
        conn.execute("insert into pgfresh.slices (name, tenant, current_version) values ('acme', 'acme', 1)")
        conn.execute("insert into pgfresh.slice_versions (slice, version, parent, kind, base_id, path, lsn)"
                     " values ('acme', 0, null, 'base', 'b', '/m', '0/0'), ('acme', 1, 0, 'lora', 'b', '/a', '0/10')")
        conn.execute("insert into pgfresh.train_rounds (slice, parent, status) values ('acme', 0, 'published'),"
                     " ('acme', 1, 'rejected'), ('acme', 1, 'rejected')")
    code, out, err = run_main(["status", "--json", "--config", str(path)], capsys)
    assert code == 0, err
    train = json.loads(out)["train"]
    assert train["slices"] == 1 and train["versions"] == 2
    assert train["rounds"]["published"] == 1 and train["rounds"]["rejected"] == 2
    assert train["by_slice"]["acme"] == {"serving_version": 1, "versions": 2, "published": 1, "rejected": 2}
    code, out, err = run_main(["status", "--config", str(path)], capsys)
    assert code == 0, err
    assert any(line.startswith("train ") and "'rejected': 2" in line for line in out.splitlines()), out


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """pgfresh module -> the pgfresh modules it imports at module level (not inside functions or
    `if TYPE_CHECKING:`), from the source with `ast`."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            body = node.body + [n for h in node.handlers for n in h.body] if isinstance(node, ast.Try) else [node]
            for n in body:
                if isinstance(n, ast.Import):
                    targets |= {a.name for a in n.names}
                elif isinstance(n, ast.ImportFrom):
                    base = n.module or ""
                    if n.level:
                        base = ".".join(package.split(".")[:len(package.split(".")) - n.level + 1] + ([base] if base else []))
                    targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in n.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(start):
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_pgfresh_has_no_import_cycles():
    graph = import_graph()
    assert "pgfresh.capture.sync" in graph and "pgfresh.stages" in graph["pgfresh.capture.sync"]
    assert cycles(graph) == []


def test_several_sources_feed_one_consumer_per_stage_and_embed_each_row_once(dsn, dsn2, store_dsn, tmp_path,
                                                                           monkeypatch):
    """[[sources]]: the downstream stages run once over the store (one index worker reading both
    sources' change logs, one apply thread), not once per source thread; every text embedded once."""
    import psycopg

    from pgfresh import config as cfg
    from pgfresh.capture import sync
    from pgfresh.rag.index import IndexWorker

    for source, label in ((dsn, "alpha"), (dsn2, "beta")):
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("create table items (id int primary key, name text)")
            conn.execute("insert into items select g, %s || ' item ' || g from generate_series(1, 30) g", (label,))
    path = tmp_path / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{store_dsn}" }}\n[[sources]]\nname = "a"\ndsn = "{dsn}"\n'
                    f'[[sources]]\nname = "b"\ndsn = "{dsn2}"\n[[tables]]\nsource = "a"\nname = "items"\n'
                    '[[tables]]\nsource = "b"\nname = "items"\n[rag]\n')
    config = cfg.load(path)
    workers, embedded = [], []
    opened = IndexWorker.opened

    def counting_opened(self, conn):
        opened(self, conn)
        workers.append(self)
        model = self.active.model
        real = model.embed

        def embed(texts):
            embedded.extend(texts)
            return real(texts)
        monkeypatch.setattr(model, "embed", embed)

    monkeypatch.setattr(IndexWorker, "opened", counting_opened)
    result = sync.run(config, once=True)
    assert result["changes"] == 0 and result["snapshot_rows"] == 60
    assert len(workers) == 1 and {r.pipeline for r in workers[0].readers} == {"pgfresh_a", "pgfresh_b"}
    assert sorted(embedded) == sorted({t for t in embedded}) and len(embedded) == 60
    with psycopg.connect(store_dsn, autocommit=True) as store:
        assert store.execute("select count(*) from pgfresh.documents").fetchone()[0] == 60
        assert store.execute("select count(*) from pgfresh.index_queue").fetchone()[0] == 0
