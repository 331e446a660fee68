"""The arena's trainer process: in a timed run, the tuned strategies' rounds train beside the
questions, as `pgfresh train` runs beside `pgfresh sync` and the application in production.

Between question batches (the run's `batches` setting: tests, comparable runs) a round would
hold every question until it finished: in `pgfresh demo` the rounds took 229 of the live phase's
292 seconds, with the questions waiting on them. Here they run in a process of their own, tenant
by tenant, each tenant's lineages one after another in the order given (a gate-off lineage right
after the gated one, as between batches, so that it can adopt the gated slice's candidate instead
of training it again), and the questions are asked from whatever version each lineage has
published by then: training time counts against the tuned strategies' freshness, as it does in
production.

At the end of the live phase the round in progress is abandoned (its facts wait, as after any
stopped round) and no other starts. Each lineage's CPU seconds are the strategy's background cost.
"""

from __future__ import annotations

import multiprocessing as mp
import time

STOP_WAIT_S = 60.0  # a round notices the stop within a training step; then the process exits


class Trainer:
    """`jobs`: strategy name -> `pgfresh.train.rounds.run` keyword arguments (variant, gate)."""

    def __init__(self, config, jobs: dict[str, dict]):
        spawn = mp.get_context("spawn")
        self.names = list(jobs)
        self.stop_event, self.errors = spawn.Event(), spawn.Queue()
        self.cpu = spawn.Array("d", len(jobs))
        self.proc = spawn.Process(target=_loop, name="arena-trainer", daemon=True,
                                  args=(config, list(jobs.values()), self.stop_event, self.cpu, self.errors))

    def start(self) -> None:
        self.proc.start()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def error(self) -> str | None:
        """The trainer's failure (one line), if it stopped on one."""
        return None if self.errors.empty() else self.errors.get(timeout=1)

    def cpu_s(self, name: str) -> float:
        return self.cpu[self.names.index(name)] if name in self.names else 0.0

    def stop(self) -> None:
        self.stop_event.set()
        self.proc.join(timeout=STOP_WAIT_S)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)


def _loop(config, jobs: list[dict], stop, cpu, errors) -> None:
    from pgfresh.train import rounds, slices

    try:
        while not stop.is_set():
            trained = False
            with slices.connect(config, "arena-trainer") as conn:
                tenants = rounds.tenants(conn)
            for tenant in tenants:
                for i, kwargs in enumerate(jobs):
                    cpu0 = time.process_time()
                    trained |= bool(rounds.run(config, once=True, due_only=True, should_stop=stop.is_set,
                                               only=[tenant], **kwargs))
                    cpu[i] += time.process_time() - cpu0
            if not trained:
                stop.wait(1.0)  # nothing due: look again in a second
    except Exception as exc:  # reported by the arena as the run's error
        errors.put(f"{type(exc).__name__}: {exc}".splitlines()[0])
