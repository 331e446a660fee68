"""The `pgfresh` command line: parse arguments, call one function, translate errors.

Each command is a thin wrapper around one function of a stage module. A `PgfreshError` becomes
one line on stderr and its exit code (2 for anything the user can fix); `--json` output is stable
and documented in docs/CLI.md.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pgfresh.errors import PgfreshError

warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Keep LLM applications fresh with live PostgreSQL data.")
console = Console()
err_console = Console(stderr=True)

ConfigOpt = typer.Option(Path("pgfresh.toml"), "--config", "-c", help="Path to pgfresh.toml.")


def _load(config: Path):
    from pgfresh import config as cfg

    return cfg.load(config)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


@app.command()
def init(
    dsn: Optional[str] = typer.Option(None, "--dsn", help="Source database (default: the embedded server)."),
    config: Path = ConfigOpt,
    tables: Optional[str] = typer.Option(None, "--tables", help="Comma-separated tables (default: all user tables)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing pgfresh.toml."),
):
    """Write pgfresh.toml from the database's tables and create schema pgfresh."""
    from pgfresh.capture import setup

    path = setup.init_project(config, dsn=dsn, tables=tables.split(",") if tables else None, force=force)
    console.print(f"wrote {path}; schema pgfresh is ready")


@app.command()
def sync(
    config: Path = ConfigOpt,
    once: bool = typer.Option(False, "--once", help="Catch up to the current WAL position, then exit."),
):
    """Snapshot the tables, then stream every committed change (exactly once) into pgfresh."""
    from pgfresh.capture import sync as run_sync

    stats = run_sync.run(_load(config), once=once, console=err_console)
    if once:
        console.print(f"caught up to {stats['lsn']}: {stats['changes']} changes, {stats['snapshot_rows']} snapshot rows")


@app.command()
def status(config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Lag, row counts, quarantine, slot and WAL health."""
    from pgfresh import status as st

    report = st.collect(_load(config))
    if as_json:
        _print_json(report)
    else:
        st.show(report, console)


@app.command()
def demo(
    workdir: Path = typer.Option(Path(".pgfresh/demo"), "--workdir", help="Where the demo keeps its server and files."),
    seconds: float = typer.Option(20.0, "--seconds", help="How long the live workload runs."),
):
    """Embedded PostgreSQL + a small live workload + capture, printing what was captured."""
    from pgfresh import demo as demo_mod

    demo_mod.run(workdir, seconds=seconds, console=console)


def main() -> None:
    try:
        app(standalone_mode=False)
    except PgfreshError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
