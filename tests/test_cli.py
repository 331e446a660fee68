"""The CLI's edge: every mistake a user can make on the command line is one line on stderr and exit 2.

Most cases drive `pgfresh.cli.main` in-process (fast); a few run the real `python -m pgfresh`.
The fuzz test (hypothesis) builds argument lists from the CLI's own commands and options plus
hostile values, in a directory without pgfresh.toml, so every list ends in a usage error or a
config error and never does real work; none may print a traceback.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgfresh import cli
from tests.conftest import run_cli


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `pgfresh ARGS` run in this process."""
    capsys.readouterr()
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, out: str, err: str, *needles: str) -> str:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


USAGE_ERRORS = [
    (["ask"], "Missing argument"),
    (["search"], "Missing argument"),
    (["quarantine", "release"], "Missing argument"),
    (["slices", "rollback", "acme"], "Missing argument"),
    (["frobnicate"], "No such command"),
    (["model", "frobnicate"], "No such command"),
    (["status", "--bogus"], "No such option"),
    (["sync", "--once=3"], "--once"),
    (["search", "x", "--k", "abc"], "--k"),
    (["search", "x", "--k", "0"], "--k"),
    (["search", "x", "--k", "-1"], "--k"),
    (["quarantine", "--limit", "-1"], "--limit"),
    (["quarantine", "--limit", "many"], "--limit"),
    (["quarantine", "release", "x"], "ID"),
    (["slices", "rollback", "acme", "v2"], "version"),
    (["demo", "--minutes", "nan"], "--minutes"),
    (["demo", "--noise", "0.9"], "--noise"),
    (["arena", "--minutes", "-1"], "--minutes"),
    (["arena", "--noise", "inf"], "--noise"),
    (["search", "x", "--config"], "--config"),
]


@pytest.mark.parametrize("args,needle", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_exit_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line(*run_main(args, capsys), needle)
    assert "--help" in line  # says where to look


def test_help_and_bare_group_print_help_without_traceback(capsys):
    code, out, err = run_main(["--help"], capsys)
    assert code == 0 and "Usage" in out and "Traceback" not in err
    code, out, err = run_main(["model"], capsys)  # a group without its command: the help, as click does
    assert code == 2 and "Usage" in out + err and "Traceback" not in out + err


def test_error_text_is_printed_as_is_not_as_rich_markup(capsys, tmp_path):
    for name in ("[source]", "[/bold]", "[bold red]x"):
        code, out, err = run_main(["status", "--config", str(tmp_path / f"{name}.toml")], capsys)
        line = assert_one_line(code, out, err, "not found")
        assert name in line, line
    bad = tmp_path / "pgfresh.toml"
    bad.write_text("[source]\nslot = \"[/bold]\"\n")
    assert_one_line(*run_main(["status", "--config", str(bad)], capsys), "source.slot", "[/bold]")


# --- fuzz: many malformed argument lists, never a traceback ------------------------------------

# Not `init`, `demo` or `arena`: without a config they create one and start real work.
COMMANDS = [[], ["sync"], ["status"], ["search"], ["ask"], ["train"], ["quarantine"],
            ["quarantine", "release"], ["slices"], ["slices", "rollback"], ["model"], ["model", "build"],
            ["model", "info"], ["frobnicate"]]
OPTIONS = ["--config", "-c", "--once", "--json", "--tenant", "--k", "--mode", "--limit", "--table", "--check",
           "--path", "--released", "--workload", "--minutes", "--noise", "--seed", "--report", "--strategies",
           "--bogus", "-x", "--k=", "--limit=-1", "--once=yes"]
VALUES = ["", "x", "0", "-1", "1", "10", "nan", "inf", "-inf", "1e309", "abc", "[/bold]", "[source]", "\udcff\udcfe",
          "a" * 3000, "rag", "tuned", "none.toml", ".", "pgfresh.toml", "ask", "release", "acme", "2", " ", "é"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(COMMANDS), rest=st.lists(st.sampled_from(OPTIONS + VALUES), max_size=6))
def test_fuzz_malformed_arguments_never_print_a_traceback(command, rest, capsys, tmp_path_factory, monkeypatch):
    # No pgfresh.toml here: whatever parses reaches a config error; nothing connects anywhere.
    monkeypatch.chdir(tmp_path_factory.getbasetemp())
    code, out, err = run_main(command + rest, capsys)
    assert "Traceback" not in out + err, (command + rest, err)
    lines = [line for line in err.splitlines() if line.strip()]
    if "Usage:" in out + err and code == 2:  # a group without its command prints its help
        return
    assert code == 2, (command + rest, code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (command + rest, err)


def test_real_processes_usage_errors_one_line():
    for args, needle in [(["ask"], "Missing argument"), (["search", "x", "--k", "0"], "--k"),
                         (["quarantine", "--limit", "-1"], "--limit"), (["frobnicate"], "No such command")]:
        r = run_cli(*args)
        assert_one_line(r.returncode, r.stdout, r.stderr, needle)


# --- config errors: one line, exit 2, every problem of the file at once -------------------------

def test_config_nan_inf_core_and_stage_problems_all_at_once(tmp_path, capsys):
    path = tmp_path / "pgfresh.toml"
    path.write_text('[source]\nmax_txn_seconds = nan\nbatch_max_seconds = inf\nslot = "Bad"\n'
                    '[[tables]]\nname = "a b"\ngate = { settle_seconds = nan }\n'
                    '[[tables]]\nname = "ok"\ndocument = "{"\n'
                    '[rag]\nk = 0\ncache = { similarity = -inf }\n[train]\nbogus = 2\n')
    line = assert_one_line(*run_main(["sync", "--once", "--config", str(path)], capsys), "9 problems")
    for needle in ("source.max_txn_seconds: expected a finite number, got nan", "source.batch_max_seconds",
                   "source.slot", "tables[0].name", "tables[0].gate.settle_seconds: expected a finite number",
                   "tables[1].document", "rag.k", "rag.cache.similarity: expected a finite number, got -inf",
                   "train.bogus"):
        assert needle in line, (needle, line)


def test_config_problems_of_every_stage_section_all_at_once(tmp_path, capsys):
    # One bad key in each section a stage owns: one error line lists them all, each with its key path.
    path = tmp_path / "pgfresh.toml"
    path.write_text('[source]\ndsn = "x"\n[[tables]]\nname = "t"\ntenant = 3\n'
                    '[rag]\n[rag.reader]\nkind = "hf"\npath = "m"\nchat = "yes"\n[rag.cache]\nsimilarity = 0\n'
                    '[train]\nmethod = "qlora"\n[train.model]\nhidden = 8\n'
                    '[retention]\nprune_batch_rows = 0\n'
                    '[serve]\nport = "eighty"\n[serve.router]\nmin_slice_confidence = 2\n'
                    '[arena]\nminutes = "x"\n')
    line = assert_one_line(*run_main(["sync", "--once", "--config", str(path)], capsys), "9 problems")
    for needle in ("tables[0].tenant: expected a column name, got 3",
                   "rag.reader.chat: expected true or false, got 'yes'",
                   "rag.cache.similarity: expected a number > 0 and <= 1 (1: exact matches only), got 0",
                   "train.method: expected one of lora, full, got 'qlora'",
                   "train.model.hidden: expected an integer from 16 to 8192, got 8",
                   "retention.prune_batch_rows: expected an integer >= 1, got 0",
                   "serve.port: expected a port, 0..65535, got 'eighty'",
                   "serve.router.min_slice_confidence: expected a number >= 0 and <= 1, got 2",
                   "arena.minutes: expected a number > 0.0, got 'x'"):
        assert needle in line, (needle, line)


def test_config_not_utf8_or_a_directory_is_one_line(tmp_path, capsys):
    path = tmp_path / "pgfresh.toml"
    path.write_bytes(b'[source]\nslot = "\xff\xfe"\n')
    assert_one_line(*run_main(["status", "--config", str(path)], capsys), "not UTF-8", "0xff")
    assert_one_line(*run_main(["status", "--config", str(tmp_path)], capsys), "is a directory")
