"""The `pgfresh` command line: parse arguments, call one function, translate errors.

Each command is a thin wrapper around one function of a stage module. A `PgfreshError` becomes
one line on stderr and its exit code (2 for anything the user can fix); `--json` output is stable
and documented in docs/CLI.md.
"""

from __future__ import annotations

import json
import math
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


def _number(low: float, high: float | None = None, *, low_open: bool = False):
    """A typer callback: a finite number in [low, high] (or (low, high] with low_open); else a usage error."""

    def check(value):
        if value is None:
            return value
        bad = not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high)
        if bad:
            lo = f"> {low}" if low_open else f">= {low}"
            raise typer.BadParameter(f"expected a finite number {lo}" + (f" and <= {high}" if high is not None else "")
                                     + f", got {value}")
        return value

    return check


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


@app.command()
def init(
    dsn: Optional[str] = typer.Option(None, "--dsn", help="Source database (default: the embedded server)."),
    config: Path = ConfigOpt,
    tables: Optional[str] = typer.Option(None, "--tables", help="Comma-separated tables (default: all user tables)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing pgfresh.toml."),
    store_dsn: Optional[str] = typer.Option(None, "--store-dsn",
                                            help="Where pgfresh keeps its state (default: an embedded server)."),
):
    """Write pgfresh.toml from the database's tables and create schema pgfresh in the store."""
    from pgfresh.capture import setup

    path, skipped = setup.init_project(
        config, dsn=dsn, tables=tables.split(",") if tables else None, force=force, store_dsn=store_dsn,
        warn=lambda text: err_console.print(f"warning: {text}", highlight=False, soft_wrap=True, markup=False))
    console.print(f"wrote {path}; schema pgfresh is ready in the store", markup=False)
    if skipped:
        err_console.print(f"left out {len(skipped)} table(s) pgfresh cannot capture as they are; "
                          f"the reasons are at the end of {path}", markup=False)


@app.command()
def sync(
    config: Path = ConfigOpt,
    once: bool = typer.Option(False, "--once", help="Catch up to the current WAL position, then exit."),
    source: Optional[str] = typer.Option(None, "--source", help="Only this one of the [[sources]] (default: all)."),
):
    """Snapshot the tables, then stream every committed change (exactly once) into pgfresh."""
    from pgfresh.capture import sync as run_sync

    stats = run_sync.run(_load(config), once=once, console=err_console, source=source)
    if once:
        for name, one in stats.get("sources", {None: stats}).items():
            console.print(("" if name is None else f"source {name}: ") + f"caught up to {one['lsn']}: "
                          f"{one['changes']} changes, {one['snapshot_rows']} snapshot rows", markup=False)


@app.command()
def resync(config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           source: Optional[str] = typer.Option(None, "--source", help="Which of the [[sources]] (needed with several).")):
    """After a lost slot: re-create it, re-read every table, delete downstream what the source no longer has."""
    from pgfresh.capture import resync as rs

    stats = rs.run(_load(config).for_source(source), console=err_console)
    if as_json:
        _print_json(stats)
        return
    console.print(f"resync: slot {stats['slot']} re-created at {stats['slot_lsn']}; {stats['snapshot_rows']} rows re-read, "
                  f"{stats['deleted']} rows deleted ("
                  + ", ".join(f"{t} {v['deleted']}" for t, v in stats["tables"].items()) + f"); caught up to {stats['lsn']}",
                  highlight=False, soft_wrap=True)


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
    workdir: Path = typer.Option(Path(".pgfresh/demo"), "--workdir", help="Where the demo keeps its server, report and data."),
    minutes: float = typer.Option(2.0, "--minutes", help="Length of the live phase.", callback=_number(0, low_open=True)),
    noise: float = typer.Option(0.1, "--noise", help="Share of changes that are noise, 0 to 0.5.", callback=_number(0, 0.5)),
    seed: int = typer.Option(7, "--seed", help="Seed of the workload and the questions."),
):
    """Embedded PostgreSQL + the shop workload + a short arena: the verdict, report.html and results.json."""
    from pgfresh.arena import runner

    runner.run_demo(workdir, minutes=minutes, noise=noise, seed=seed, console=console)


store_app = typer.Typer(help="pgfresh's store, where it keeps all its state.")
app.add_typer(store_app, name="store")


@store_app.command("migrate")
def store_migrate(config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Move schema pgfresh from the source database (older installations) to the store, then drop it there."""
    from pgfresh import store

    stats = store.migrate_from_source(_load(config), console=None if as_json else err_console)
    if as_json:
        _print_json(stats)
        return
    console.print(f"moved {stats['rows']} rows in {len(stats['tables'])} tables to the store; schema pgfresh is "
                  "gone from the source", highlight=False, soft_wrap=True)


quarantine_app = typer.Typer(help="Changes the quality gate rejected; `release ID` re-admits one.")
app.add_typer(quarantine_app, name="quarantine")


@quarantine_app.callback(invoke_without_command=True)
def quarantine(
    ctx: typer.Context,
    config: Path = ConfigOpt,
    table: Optional[str] = typer.Option(None, "--table", help="Only this table (schema.table)."),
    check: Optional[str] = typer.Option(None, "--check", help="Only this check (junk, required, render, ...)."),
    path: Optional[str] = typer.Option(None, "--path", help="Only this model path: rag or train."),
    released: bool = typer.Option(False, "--released", help="Include entries already released."),
    limit: int = typer.Option(100, "--limit", min=0, help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List quarantined changes (table, key, LSN, check, reason, row)."""
    if ctx.invoked_subcommand:
        return
    from pgfresh.gate import quarantine as q

    items = q.entries(_load(config), table, check, path, released, limit)
    if as_json:
        _print_json(items)
    else:
        q.show(items, console)


@quarantine_app.command("release")
def quarantine_release(
    qid: int = typer.Argument(..., metavar="ID", help="Quarantine entry id (from `pgfresh quarantine`)."),
    config: Path = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Re-admit one quarantined change: its path's worker takes it on the next sync step."""
    from pgfresh.gate import quarantine as q

    entry = q.release_entry(_load(config), qid)
    if as_json:
        _print_json(entry)
    else:
        console.print(f"released #{entry['id']} ({entry['path']} {entry['tbl']} {entry['key']}): "
                      "pgfresh sync re-admits it on its next step", markup=False)


@app.command()
def search(
    text: str = typer.Argument(..., help="What to look for."),
    config: Path = ConfigOpt,
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Tenant whose rows may be returned (required on tenant tables)."),
    k: Optional[int] = typer.Option(None, "--k", min=1, max=1000, help="How many documents, 1 to 1000 (default rag.k, 10)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="dense, lexical or hybrid (default rag.mode)."),
    as_json: bool = typer.Option(False, "--json", help="Documents with every stage's score, table/key, LSN, commit time."),
):
    """Hybrid search over the indexed documents (dense HNSW + full text, fused, reranked)."""
    from pgfresh import rag
    from pgfresh.rag import view

    hits = rag.run_search(_load(config), text, tenant=tenant, k=k, mode=mode)
    if as_json:
        _print_json([h.as_dict() for h in hits])
    else:
        view.show_hits(hits, console)


@app.command()
def ask(
    text: str = typer.Argument(..., help="The question."),
    config: Path = ConfigOpt,
    mode: str = typer.Option("rag", "--mode", help="rag, tuned or hybrid (the router picks per question)."),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Tenant asking (required on tenant tables)."),
    as_json: bool = typer.Option(False, "--json", help="Answer, route, sources (table, key, LSN), slice, cache, timings."),
):
    """Answer a question from live data, with the route taken and the source rows used."""
    from pgfresh import serve
    from pgfresh.rag import view

    result = serve.answer(_load(config), text, tenant, mode)
    if as_json:
        _print_json(result)
    else:
        view.show_answer(result, console)


@app.command("serve")
def serve_command(
    config: Path = ConfigOpt,
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default serve.host, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default serve.port, 8088)."),
):
    """OpenAI-compatible HTTP API, /v1/search, /metrics and the dashboard (docs/SERVE.md)."""
    from pgfresh.serve import http

    http.run(_load(config), host=host, port=port, console=err_console)


keys_app = typer.Typer(help="API keys of `pgfresh serve`: each reads one tenant, or is admin.")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    config: Path = ConfigOpt,
    tenant: Optional[str] = typer.Option(None, "--tenant", help="The one tenant this key reads."),
    admin: bool = typer.Option(False, "--admin", help="Any tenant, and the admin endpoints."),
    name: str = typer.Option("", "--name", help="A label for listings."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Create a key; it is printed once (only its SHA-256 is stored)."""
    from pgfresh.serve import keys

    k = keys.create(_load(config), tenant=tenant, admin=admin, name=name)
    if as_json:
        _print_json(k)
    else:
        console.print(f"key #{k['id']} ({'admin' if admin else 'tenant ' + repr(tenant)}): {k['key']}", highlight=False)


@keys_app.command("list")
def keys_list(config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Keys with their tenant, prefix, creation, last use and revocation."""
    from pgfresh.serve import keys

    rows = keys.list_keys(_load(config))
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        who = "admin" if r["admin"] else f"tenant {r['tenant']!r}"
        console.print(f"#{r['id']} {r['prefix']}... {who} {r['name']} created {r['created_at']}"
                      + (f" REVOKED {r['revoked_at']}" if r["revoked_at"] else ""), highlight=False)


@keys_app.command("revoke")
def keys_revoke(key_id: int = typer.Argument(..., metavar="ID"), config: Path = ConfigOpt):
    """Revoke a key (the server stops accepting it within 5 seconds)."""
    from pgfresh.serve import keys

    r = keys.revoke(_load(config), key_id)
    console.print(f"revoked key #{r['id']}")


@app.command()
def arena(
    config: Path = ConfigOpt,
    workload: Optional[str] = typer.Option(None, "--workload", help="shop or shop-zh (built in, English / Chinese) or custom (see docs/ARENA.md)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Length of the live phase in minutes (default 3, or arena.minutes).",
                                            callback=_number(0, low_open=True)),
    noise: Optional[float] = typer.Option(None, "--noise", help="Share of changes that are noise, 0 to 0.5.", callback=_number(0, 0.5)),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the workload and the questions."),
    report: Path = typer.Option(Path("report.html"), "--report", help="Where to write the HTML report."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    strategies: Optional[str] = typer.Option(None, "--strategies", help="Comma-separated strategy names (default: all)."),
):
    """Live workload, every strategy on the same questions, a report with a verdict. Writes to the source: use a database of its own."""
    from pgfresh.arena import runner

    results = runner.arena_command(config, workload=workload, minutes=minutes, noise=noise, seed=seed, report=report,
                                   json_path=json_out, strategies=strategies.split(",") if strategies else None,
                                   console=err_console)
    runner.print_verdict(results, console)
    console.print(f"report: {report}" + (f"; data: {json_out}" if json_out else ""), markup=False)


model_app = typer.Typer(no_args_is_help=True, help="The base model: `build` the built-in one, `info` on the one in use, "
                        "`reader-adapter` to teach it to read.")
app.add_typer(model_app, name="model")


@model_app.command("build")
def model_build(config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Train the built-in model (tokenizer + small Llama) on the current facts; saved in the data directory."""
    from pgfresh import model

    meta = model.build(_load(config), console=err_console)
    if as_json:
        _print_json(meta)
    else:
        acc = meta["accuracy"]
        console.print(f"built {meta['params']:,} parameters on {meta['facts']} facts (LSN {meta['lsn']}) in "
                      f"{meta['seconds']} s, {meta['tokens_per_s']:,} tokens/s; accuracy: own {acc['own']}, "
                      f"held-out phrasings {acc['held_out']}, open-book {acc.get('open_book')}")


@model_app.command("reader-adapter")
def model_reader_adapter(config: Path = ConfigOpt,
                         steps: int = typer.Option(300, "--steps", min=1, help="Training steps (whole epochs of drills, at least this many)."),
                         out: Optional[Path] = typer.Option(None, "--out", help="Adapter directory (default: <data_dir>/adapters/reader)."),
                         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Train a LoRA reader adapter on the base model with the reading drills (a GPU path for a pretrained base)."""
    from pgfresh.train import reading

    meta = reading.reader_adapter(_load(config), steps, out, console=err_console)
    if as_json:
        _print_json(meta)
    else:
        console.print(f"reader adapter: {meta['steps']} steps, {meta['training_tokens']:,} tokens at "
                      f"{meta['tokens_per_s']:,} tokens/s, loss {meta['final_loss']}; open-book "
                      f"{meta['open_book_before']} -> {meta['open_book_after']}", highlight=False)


@model_app.command("info")
def model_info(config: Path = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Size, training tokens, LSN and accuracy of the base model."""
    from pgfresh import model

    meta = model.info(_load(config))
    if as_json:
        _print_json(meta)
    else:
        for k, v in meta.items():
            if k not in ("format",):
                console.print(f"{k}: {v}", highlight=False, markup=False)


@app.command()
def train(
    config: Path = ConfigOpt,
    once: bool = typer.Option(False, "--once", help="One round per slice with waiting facts, then exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the rounds run as JSON."),
):
    """Training rounds as facts arrive: LoRA slices per tenant, gated, published or rejected."""
    from pgfresh import train as tr

    results = tr.run(_load(config), once=once, console=err_console)
    if results is None:  # a secondary process of `accelerate launch`: the main one reports
        return
    if as_json:
        _print_json(results)
    elif once and not results:
        console.print("no facts waiting: every slice is up to date")


slices_app = typer.Typer(help="Model slices (one lineage per tenant): versions with metrics; `rollback TENANT VERSION`.")
app.add_typer(slices_app, name="slices")


@slices_app.callback(invoke_without_command=True)
def slices(
    ctx: typer.Context,
    config: Path = ConfigOpt,
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Only this slice: the tenant (_shared: facts without a tenant; a tenant starting with _ gets one more _)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List published slice versions with their metrics."""
    if ctx.invoked_subcommand:
        return
    from pgfresh import train as tr

    rows = tr.list_slices(_load(config), tenant)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        m = r["metrics"]
        console.print(f"{'*' if r['current'] else ' '} {r['slice']} v{r['version']} ({r['kind']}, parent {r['parent']}) "
                      f"lsn {r['lsn']}, {r['facts']} facts; new {m.get('new_accuracy')}, forgetting "
                      f"{m.get('forgetting')}, stale {m.get('stale_rate')}", highlight=False, markup=False)


@slices_app.command("rollback")
def slices_rollback(
    tenant: str = typer.Argument(..., help="The slice: the tenant (_shared: facts without a tenant; a tenant starting with _ gets one more _)."),
    version: int = typer.Argument(..., help="The version to serve again."),
    config: Path = ConfigOpt,
):
    """Serve an earlier published version again (its lineage's later facts wait for the next round)."""
    from pgfresh import train as tr

    r = tr.rollback(_load(config), tenant, version)
    console.print(f"slice {r['slice']}: version {r['from']} -> {r['to']} (knows LSN {r['lsn']})", markup=False)


def _one_line(message: str) -> str:
    """`message` on one line: a multi-line error (a server's DETAIL, say) joined with spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _error(message: str) -> None:
    # Plain text, never rich markup: user values like "[source]" or "[/bold]" must print as they are.
    # Arguments that were not valid UTF-8 arrive as surrogates: show them escaped, never fail on them.
    line = _one_line(message).encode("utf-8", "backslashreplace").decode("utf-8")
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """The `pgfresh` entry point: every error a user can cause is one line on stderr and exit 2.

    A usage error (missing argument, bad option value, unknown command or option) is one line naming
    the command and its --help; a `PgfreshError` is its one-line message and exit code. Anything else
    is a bug and keeps its traceback. `argv` (default: sys.argv[1:]) lets tests drive it in-process.
    """
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        rv = app(args=argv, prog_name="pgfresh", standalone_mode=False)
    except PgfreshError as exc:
        _error(str(exc))
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:  # `pgfresh` or `pgfresh model` alone: the help, as click does
        exc.show()
        sys.exit(2)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "pgfresh"
        _error(f"{where}: {exc.format_message()} (see {where} --help)")
        sys.exit(2)
    except ClickException as exc:
        _error(exc.format_message())
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    # Without standalone mode, click returns the code of a `typer.Exit` (--help: 0; Ctrl-C: 130).
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()
