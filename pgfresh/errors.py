"""The small exception hierarchy pgfresh raises.

Every error a user can cause or fix is a `PgfreshError`; the CLI turns it into one line on stderr
and exit code 2. Anything else escaping is a bug and keeps its traceback.
"""


class PgfreshError(Exception):
    """Base of every error pgfresh reports to a user. The message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(PgfreshError):
    """pgfresh.toml is missing, unreadable or invalid; the message lists every problem found."""

    def __init__(self, problems: list[str], path: str = "pgfresh.toml"):
        self.problems = problems
        self.path = path
        if len(problems) == 1:
            msg = f"{path}: {problems[0]}"
        else:
            msg = f"{path}: {len(problems)} problems: " + "; ".join(problems)
        super().__init__(msg)


class RenderError(PgfreshError):
    """A row that cannot be rendered with its table's templates (missing column, wrong type).

    Here rather than in `pgfresh.render` because the gate, which comes before render, quarantines it.
    """


class SourceError(PgfreshError):
    """The source database cannot be used as configured (unreachable, privileges, wal_level, tables)."""


class DecodeError(PgfreshError):
    """The replication stream carried something pgfresh cannot decode; names the LSN and the bytes."""

    exit_code = 3


class ConnectionLostError(SourceError):
    """The source cannot be reached now (refused, closed, shutting down or starting up); `sync` retries these."""


class SlotLostError(SourceError):
    """pgfresh's replication slot was dropped or invalidated while its stored position still needs it."""
