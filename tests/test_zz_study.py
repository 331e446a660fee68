"""Temporary study (not committed): round metrics across seeds, to size the test margins."""
import json, os, time
import pytest
from pgfresh import config as cfg
from pgfresh.train import rounds, slices
from tests.train_support import base_model, trained_env, products, new_price  # noqa: F401
from tests.test_train import _change, CHANGED

SEEDS = [int(x) for x in os.environ.get("SEEDS", "0").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_study(tmp_path, dsn, base_model, seed):
    path = trained_env(tmp_path, dsn, base_model, f"seed = {seed}\ndeterministic = true\ngate_max_forgetting = 1.0\n"
                       "gate_min_new_accuracy = 0.0\n" + os.environ.get("EXTRA", "").replace("|", "\n"))
    config = cfg.load(path)
    _change(dsn, path)
    t = time.time()
    a = rounds.run_round(config, None, publish=False, replay_ratio=0.0)
    b = rounds.run_round(config, None, publish=False, replay_ratio=0.10)
    r = rounds.run_round(config, None)
    names = {i: n for i, n, _ in products()}
    right = sum(slices.ask(config, f"What is the price of {names[i]}?")["answer"] == new_price(i) for i in CHANGED)
    keys = ("new_accuracy", "stale_rate", "update_accuracy", "probe", "probe_before", "probe_after", "forgetting", "epochs", "steps")
    out = {"seed": seed, "base": base_model.meta["build_id"], "extra": os.environ.get("EXTRA", ""),
           "no_replay": {k: a["metrics"][k] for k in keys}, "replay": {k: b["metrics"][k] for k in keys},
           "published": {k: r["metrics"][k] for k in keys}, "asked_right": right, "seconds": round(time.time() - t)}
    with open("/tmp/train_runs/study.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
