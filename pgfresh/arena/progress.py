"""The arena's live progress display: phase, elapsed time, changes, questions, accuracy so far.

On a terminal it is a rich Live table redrawn after every batch; elsewhere (CI, logs, a pipe) one
line per phase and per batch, so long runs leave a readable log.
"""

from __future__ import annotations

import time

from pgfresh.arena import metrics


class Progress:
    """The live display: phase, elapsed time, changes, questions, accuracy so far per strategy.

    On a terminal it is a rich Live panel; elsewhere (CI, logs) one line per phase and per batch.
    """

    def __init__(self, console, minutes: float):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.minutes = minutes
        self.name = "starting"
        self.t0 = time.monotonic()
        self.live = None
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._render(None), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def _render(self, run):
        from rich.table import Table

        table = Table(title=f"pgfresh arena: {self.name}", title_justify="left")
        table.add_column("strategy")
        table.add_column("questions", justify="right")
        table.add_column("accuracy", justify="right")
        table.add_column("changed", justify="right")
        if run is not None:
            for s in run.strategies:
                rs = [r for r in run.records if r["strategy"] == s.name]
                ch = [r for r in rs if r["cls"] == "changed"]
                table.add_row(s.name, str(len(rs)), _pct(metrics.scores(rs)["accuracy"]),
                              _pct(metrics.scores(ch)["accuracy"]))
            changes = run.counter.value if getattr(run, "counter", None) is not None else 0
            table.caption = (f"{time.monotonic() - self.t0:.0f} s elapsed, live phase {self.minutes:g} min; "
                             f"{changes} changes, {run.batches} batches")
        return table

    def phase(self, name: str) -> None:
        self.name = name
        if self.live:
            self.live.update(self._render(None))
        else:
            self.console.print(f"arena: {name} ({time.monotonic() - self.t0:.0f} s)")

    def update(self, run) -> None:
        if self.live:
            self.live.update(self._render(run))
            return
        parts = []
        for s in run.strategies:
            rs = [r for r in run.records if r["strategy"] == s.name]
            parts.append(f"{s.name} {_pct(metrics.scores(rs)['accuracy'])}")
        self.console.print(f"arena: batch {run.batches}, {len(run.records)} answers; " + ", ".join(parts))

    def close(self) -> None:
        if self.live:
            self.live.stop()


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"
