"""The stages after capture, registered once: what `sync` runs, what `status` reports, what `config` checks.

`STAGES` lists every stage in data-flow order as a `Stage`: its name, whether a config asks for it,
the change-log consumers it runs inside `pgfresh sync` (`workers`), its section of
`pgfresh status` (`status`), and its checks of pgfresh.toml (`check_config`, and
`check_against_columns` once the source's columns are known). Every hook is given explicitly,
`None` where a stage has none: a stage that forgets one fails when this module is imported, and
a name that changes is an import error, never a section that silently disappears.

Every worker a stage returns is a consumer of the change log with `name`, `step()`,
`settling_seconds()` (how long `sync --once` waits for its settle window) and `close()`;
`workers(config)` refuses one that lacks any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from pgfresh import gate, rag, render, retention, serve, train
from pgfresh.arena import settings as arena_settings
from pgfresh.rag import status as rag_status
from pgfresh.rag.index import IndexWorker
from pgfresh.render.worker import FactsWorker
from pgfresh.train import status as train_status

WORKER_METHODS = ("step", "settling_seconds", "close")


@dataclass(frozen=True)
class Stage:
    name: str
    asked: Callable  # (config) -> bool: does this config run the stage
    workers: Callable | None  # (config) -> list of change-log consumers run inside `pgfresh sync`
    status: Callable | None  # (store connection) -> dict: its section of `pgfresh status`
    check_config: Callable | None  # (config) -> list[str]: problems in its sections of pgfresh.toml
    check_against_columns: Callable | None  # (config, {table: [column]}) -> list[str]

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and value is not None and not callable(value):
                raise TypeError(f"stage {self.name!r}: hook {f.name} must be callable or None, got {value!r}")


def _always(config) -> bool:
    return True


def _facts_asked(config) -> bool:
    return "train" in config.sections or any(t.facts for t in config.tables)


def _rag_asked(config) -> bool:
    return "rag" in config.sections and config.rag.get("enabled", True) is not False


STAGES: tuple[Stage, ...] = (
    Stage("gate", asked=_always, workers=None, status=gate.status_counts, check_config=gate.check_config,
          check_against_columns=gate.check_against_columns),
    Stage("facts", asked=_facts_asked, workers=lambda config: [FactsWorker(config)], status=None,
          check_config=render.check_config, check_against_columns=render.check_against_columns),
    Stage("rag", asked=_rag_asked, workers=lambda config: [IndexWorker(config)], status=rag_status.counts,
          check_config=rag.check_config, check_against_columns=None),
    Stage("train", asked=lambda config: "train" in config.sections, workers=None, status=train_status.counts,
          check_config=train.check_config, check_against_columns=None),
    Stage("serve", asked=_always, workers=None, status=None, check_config=serve.check_config,
          check_against_columns=None),
    Stage("arena", asked=lambda config: "arena" in config.sections, workers=None, status=None,
          check_config=arena_settings.check_config, check_against_columns=None),
    Stage("retention", asked=_always, workers=None, status=None, check_config=retention.check_config,
          check_against_columns=None),
)


def workers(config) -> list:
    """The change-log consumers of every stage this config asks for, in data-flow order."""
    out = []
    for stage in STAGES:
        if stage.workers is None or not stage.asked(config):
            continue
        for w in stage.workers(config):
            missing = [m for m in WORKER_METHODS if not callable(getattr(w, m, None))]
            if missing or not isinstance(getattr(w, "name", None), str):
                raise TypeError(f"stage {stage.name!r}: worker {w!r} lacks {', '.join(missing) or 'a name'}")
            out.append(w)
    return out


def check_config(config) -> list[str]:
    """Every problem in every stage's sections of pgfresh.toml (all stages check, asked for or not)."""
    return [p for stage in STAGES if stage.check_config is not None for p in stage.check_config(config)]


def check_against_columns(config, columns: dict[str, list[str]]) -> list[str]:
    """Every setting that names a column its table lacks, once the source's columns are known."""
    return [p for stage in STAGES if stage.check_against_columns is not None
            for p in stage.check_against_columns(config, columns)]


def status(conn) -> dict:
    """`pgfresh status`'s section of each stage that reports one, by stage name (every stage, asked or not:
    what the store holds is reported even after a section left the file)."""
    return {stage.name: stage.status(conn) for stage in STAGES if stage.status is not None}
