"""Sweep of a training round's learning rate, length and replay on a finished demo's facts.

    .venv/bin/python bench/rounds.py --demo .pgfresh/demo [--facts 5,20] [--lr 1e-3,3e-3,1e-2]
                                     [--steps 0,150,300] [--replay-per-new 0,0.5,1,2] [--slices N] [--workdir DIR]
    .venv/bin/python bench/rounds.py --arena DIR --sweep replay --lr 3e-3 --steps 150 [--facts 20]

`--arena DIR`: instead of a demo, the working directory of a finished `bench/arena_tuned.py`
(its embedded cluster holds source and store in one database); the slices there have published
rounds, so trials run on top of each slice's current version, with the backlog the run left.
`--sweep replay`: part 2 only, at the first `--lr` and `--steps`.

The demo directory (`pgfresh demo --workdir DIR`, after its run) holds the base model it built and
its store, with every fact the run rendered. Both are copied into `--workdir` (the demo stays as
it is); there, for every setting, each tenant's slice runs a *trial* round (`run_round(...,
publish=False)`: trained and measured by the gate, never published) on top of version 0 with
the newest `--facts` waiting facts, as the arena's rounds take them. Pooled over the slices:
new-fact accuracy (held-out phrasings) and forgetting (the probe answers the parent got right
that the candidate lost), each with its 95% Wilson interval; how many of the rounds the default
gate would publish; seconds per round.

Part 1 crosses learning rate and minimum steps (`min_steps`; 0: `epochs` x the round's batches,
stopped early by `stop_loss`) with `replay_per_new` 1; part 2 varies `replay_per_new` at the
best of part 1. Prints Markdown tables for docs/BENCHMARKS.md. Never asserts on timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pgfresh import config as cfg  # noqa: E402
from pgfresh.stats import wilson  # noqa: E402


def copy_demo(demo: Path, workdir: Path) -> Path:
    """The demo's config, model and store under workdir (a stopped copy of the store)."""
    from pgfresh.embedded import EmbeddedServer

    src = demo / ".pgfresh"
    if not (src / "model" / "config.json").exists() or not (src / "store" / "PG_VERSION").exists():
        sys.exit(f"{demo}: not a finished demo directory (no .pgfresh/model or .pgfresh/store); run `pgfresh demo` first")
    if workdir.exists():
        if (workdir / ".pgfresh" / "store" / "PG_VERSION").exists():
            EmbeddedServer(workdir / ".pgfresh" / "store").stop()
        shutil.rmtree(workdir)
    (workdir / ".pgfresh").mkdir(parents=True)
    shutil.copy(demo / "pgfresh.toml", workdir / "pgfresh.toml")
    shutil.copytree(src / "model", workdir / ".pgfresh" / "model")
    # cp -a keeps the server's owner (the embedded server runs as its own user when we are root)
    subprocess.run(["cp", "-a", str(src / "store"), str(workdir / ".pgfresh" / "store")], check=True)
    (workdir / ".pgfresh" / "store" / "postmaster.pid").unlink(missing_ok=True)
    return workdir / "pgfresh.toml"


def copy_arena(src: Path, workdir: Path) -> Path:
    """A bench/arena_tuned.py directory copied under workdir, its cluster started there; the config
    rewritten for the copy's server."""
    from pgfresh.embedded import EmbeddedServer

    if not (src / "pg" / "PG_VERSION").exists() or not (src / ".pgfresh" / "model" / "config.json").exists():
        sys.exit(f"{src}: not a finished bench/arena_tuned.py directory (no pg/ or .pgfresh/model)")
    if workdir.exists():
        if (workdir / "pg" / "PG_VERSION").exists():
            EmbeddedServer(workdir / "pg").stop()
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(src / "pg"), str(src / ".pgfresh"), str(workdir)], check=True)
    (workdir / "pg" / "postmaster.pid").unlink(missing_ok=True)
    server = EmbeddedServer(workdir / "pg")
    server.start()
    dsn = server.dsn("bench")
    text = (src / "pgfresh.toml").read_text()
    old = text.split('dsn = "', 1)[1].split('"', 1)[0]
    (workdir / "pgfresh.toml").write_text(text.replace(old, dsn))
    return workdir / "pgfresh.toml"


def trial(config, tenants, overrides: dict) -> dict:
    from pgfresh.train import rounds

    c = dataclasses.replace(config, train={**config.train, **overrides})
    right = n_new = lost = kept = passed = replay = 0
    seconds = []
    for t in tenants:
        r = rounds.run_round(c, t, publish=False)
        if r is None:
            continue
        m = r["metrics"]
        n_new += m["learn"]
        right += round((m["new_accuracy"] or 0) * m["learn"])
        kept += m["kept_before"]
        lost += round((m["forgetting"] or 0) * m["kept_before"])
        passed += not r["reasons"]
        replay += m["replay"]
        seconds.append(m["seconds"])
    return {"new": right / n_new if n_new else None, "new_ci": wilson(right, n_new), "n_new": n_new,
            "forgetting": lost / kept if kept else None, "forgetting_ci": wilson(lost, kept), "kept": kept,
            "passed": passed, "rounds": len(seconds), "replay": replay / len(seconds) if seconds else None, "seconds": sum(seconds) / len(seconds) if seconds else None}


def pct(v, ci) -> str:
    return "-" if v is None else f"{v:.2f} [{ci[0]:.2f}-{ci[1]:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", type=Path, help="a finished `pgfresh demo` working directory")
    src.add_argument("--arena", type=Path, help="a finished bench/arena_tuned.py working directory")
    src.add_argument("--config", type=Path, help="a project's pgfresh.toml, used in place (trials publish nothing)")
    ap.add_argument("--sweep", choices=("all", "replay"), default="all")
    ap.add_argument("--workdir", type=Path, default=Path(".pgfresh/bench-rounds"))
    ap.add_argument("--facts", default="5,20", help="facts per round (max_facts_per_round), comma-separated")
    ap.add_argument("--lr", default="1e-3,3e-3,1e-2")
    ap.add_argument("--steps", default="0,150,300", help="min_steps per round")
    ap.add_argument("--replay-per-new", default="0,0.5,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--slices", type=int, default=0, help="only the first N tenants' slices (0: all)")
    a = ap.parse_args()
    path = (copy_demo(a.demo.resolve(), a.workdir.resolve()) if a.demo else
            copy_arena(a.arena.resolve(), a.workdir.resolve()) if a.arena else a.config)
    config = cfg.load(path)
    from pgfresh.train import rounds, slices

    with slices.connect(config) as conn:
        tenants = rounds.tenants(conn)[:a.slices or None]
    load = os.getloadavg()
    print(f"{a.demo or a.arena or a.config}: slices {[rounds.slice_of(t) for t in tenants]}; load average {load[0]:.1f} at start")
    base = {"threads": a.threads, "replay_per_new": 1.0}
    facts = [int(x) for x in a.facts.split(",")]
    results = {}
    if a.sweep == "replay":
        facts_lr_steps = [(f, a.lr.split(",")[0], a.steps.split(",")[0]) for f in facts]
        return replay_sweep(config, tenants, base, facts_lr_steps, a.replay_per_new.split(","))
    print("\n| facts / round | lr | min_steps | new-fact accuracy [95%] | forgetting [95%] (n) | default gate passes | s / round |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for f in facts:
        for lr in a.lr.split(","):
            for steps in a.steps.split(","):
                r = trial(config, tenants, {**base, "max_facts_per_round": f, "learning_rate": float(lr),
                                            "min_steps": int(steps)})
                results[(f, lr, steps)] = r
                print(f"| {f} | {lr} | {steps} | {pct(r['new'], r['new_ci'])} | {pct(r['forgetting'], r['forgetting_ci'])}"
                      f" ({r['kept']}) | {r['passed']} of {r['rounds']} | {r['seconds']:.1f} |", flush=True)

    def score(key):  # what the gate needs: new facts learnt and old ones kept, over both round sizes
        rs = [results[(f, *key)] for f in facts]
        return sum((r["new"] or 0) - (r["forgetting"] or 0) for r in rs)

    best = max({k[1:] for k in results}, key=score)
    print(f"\nbest (new-fact accuracy minus forgetting, summed over round sizes): lr {best[0]}, min_steps {best[1]}")
    replay_sweep(config, tenants, base, [(f, *best) for f in facts], a.replay_per_new.split(","))


def replay_sweep(config, tenants, base: dict, settings: list, per_new: list) -> None:
    """Part 2: replay_per_new at each (facts per round, lr, min_steps), with `replay_ratio` 0 so
    that the replay is replay_per_new x the round's facts alone (0: none)."""
    print("\n| facts / round | replay_per_new | replay / round | new-fact accuracy [95%] | forgetting [95%] (n) |"
          " default gate passes | s / round |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for f, lr, steps in settings:
        for per in per_new:
            r = trial(config, tenants, {**base, "max_facts_per_round": f, "learning_rate": float(lr),
                                        "min_steps": int(steps), "replay_per_new": float(per), "replay_ratio": 0.0})
            print(f"| {f} | {per} | {r['replay']:.0f} | {pct(r['new'], r['new_ci'])} | {pct(r['forgetting'], r['forgetting_ci'])}"
                  f" ({r['kept']}) | {r['passed']} of {r['rounds']} | {r['seconds']:.1f} |", flush=True)
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} at the end; {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
