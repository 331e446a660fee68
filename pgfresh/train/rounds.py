"""Training rounds: plan -> train a candidate on top of the published version -> gate -> publish or reject.

A round of slice S (one tenant's facts) trains on:
- *learn*: active facts the published lineage does not know (new rows, changed values), in their
  training phrasings; the newest first, at most `max_facts_per_round`, so a backlog never holds back
  a fresh change (the rest wait for later rounds);
- *updates*: superseded facts the lineage learnt. Where a newer fact of the same row and question
  is learnt in this round, that is the update (its old answer becomes the stale answer the gate
  watches for); where none exists (a deleted row without a `gone` template), the old questions
  are taught `unknown_answer`;
- *replay*: a random sample of the unchanged known facts, drawn afresh each epoch: `replay_ratio`
  of them, or `replay_per_new` per fact the round teaches where that is more (`replay_size`).

The gate asks held-out phrasings only: accuracy on the learn facts, the stale-answer rate, and
forgetting on the slice's probe set (the share of probe answers the parent got right that the
candidate gets wrong; `probe_size` known facts, a sample of the slice replayed at the slice's rate,
so it estimates what users of the slice would see lost), each with its 95% Wilson interval. A
candidate that passes is published in one transaction with the fact_training rows of what it
learnt; one that fails is recorded with its reason, and its facts
wait for the next round. An experiment's lineage with the gate off (the arena's `tuned-gate-off`)
that is still the tenant's slice file for file publishes the slice's candidate for the same facts
on the same parent, copied instead of trained again. The database is only touched in short transactions; a session-level
advisory lock per slice keeps two trainers apart and lets a restart tell an abandoned round.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field

from psycopg.types.json import Jsonb

from pgfresh import model as base_model
from pgfresh.capture.pgoutput import parse_lsn
from pgfresh.errors import PgfreshError
from pgfresh.stats import wilson
from pgfresh.train import data, settings, slice_of, slices
from pgfresh.train.slices import Version

LOCK_CLASS = 0x70677472  # "pgtr": advisory lock namespace of training rounds


class TrainError(PgfreshError):
    """A round cannot run (no base model, not enough memory, another trainer holds the slice)."""


@dataclass
class Plan:
    slice: str
    tenant: str | None
    parent: Version
    learn: list = field(default_factory=list)
    updates: list = field(default_factory=list)  # superseded facts this round unlearns
    explicit: dict = field(default_factory=dict)  # superseded fact_id -> answer taught instead (no successor)
    replay: list = field(default_factory=list)  # the first epoch's replay sample
    replay_pool: list = field(default_factory=list)  # every fact a replay sample is drawn from
    replay_n: int = 0
    probe: list = field(default_factory=list)
    old_answers: dict = field(default_factory=dict)  # learn fact_id -> the superseded answer
    lsn: str = "0/0"

    @property
    def empty(self) -> bool:
        return not self.learn and not self.explicit


# --- planning -----------------------------------------------------------------------------------

def ensure_lineage(conn, config, name: str, tenant: str | None) -> Version:
    """The slice's current version, starting a lineage (version = the base model) when there is none
    or when `train.base_model` now holds a different model than the lineage was trained on."""
    path = base_model.base_dir(config)
    if not (path / "config.json").exists():
        raise base_model.ModelError(f"{path}: no base model; run `pgfresh model build` or set train.base_model")
    bid = base_model.base_id(path)
    slices.ensure_slice(conn, name, tenant)
    cur = slices.current(conn, name)
    if cur is not None and cur.base_id == bid:
        return cur
    meta = base_model.info(config)
    known = base_model.known_facts(path)
    where, params = data._tenant_filter(tenant)
    with conn.transaction():
        conn.execute("select 1 from pgfresh.slices where name = %s for update", (name,))
        version = conn.execute("select coalesce(max(version) + 1, 0) from pgfresh.slice_versions where slice = %s",
                               (name,)).fetchone()[0]
        ids = [r[0] for r in conn.execute(f"select fact_id from pgfresh.facts where fact_id = any(%s) and {where}",
                                          (known, *params))]
        conn.execute("insert into pgfresh.slice_versions (slice, version, parent, kind, base_id, path, lsn, facts, metrics)"
                     " values (%s, %s, null, 'base', %s, %s, %s, %s, %s)",
                     (name, version, bid, str(path), meta.get("lsn", "0/0"), len(ids), Jsonb(meta.get("accuracy", {}))))
        with conn.cursor() as cur_:
            cur_.executemany("insert into pgfresh.fact_training (slice, version, fact_id, role) values (%s, %s, %s, 'base')",
                             [(name, version, i) for i in ids])
        slices.record_positions(conn, name, version)
        conn.execute("update pgfresh.slices set current_version = %s, probe = '{}', updated_at = now() where name = %s",
                     (version, name))
    return slices.get_version(conn, name, version)


def _training_state(conn, parent: Version) -> dict[str, list]:
    """fact_id -> [last version that learnt it, last version that unlearnt it] along the lineage."""
    chain = [v.version for v in slices.lineage(conn, parent)]
    state: dict[str, list] = {}
    for fid, role, version in conn.execute("select fact_id, role, version from pgfresh.fact_training"
                                           " where slice = %s and version = any(%s)", (parent.slice, chain)):
        s = state.setdefault(fid, [None, None])
        i = 1 if role == "update" else 0 if role in ("base", "learn") else None
        if i is not None and (s[i] is None or version > s[i]):
            s[i] = version
    return state


def plan(conn, s, name: str, tenant: str | None, parent: Version, replay_ratio: float | None = None) -> Plan:
    """What a round on top of `parent` would train on (see the module docstring)."""
    facts = data.load_facts(conn, tenant, statuses=("active", "superseded"))
    by_id = {f.fact_id: f for f in facts}
    state = _training_state(conn, parent)

    def learnt(f) -> bool:
        learn, unlearn = state.get(f.fact_id, (None, None))
        return learn is not None and (unlearn is None or unlearn < learn)

    active = [f for f in facts if f.status == "active"]
    # newest first: a backlog larger than a round (a first sync, a bulk load) must not hold back the
    # changes committed after it, which are what users ask about; the backlog drains as changes slow
    waiting = sorted((f for f in active if not learnt(f)), key=lambda f: (f.created_at, parse_lsn(f.lsn), f.fact_id),
                     reverse=True)
    p = Plan(name, tenant, parent, learn=waiting[:s.max_facts_per_round])
    learn_ids = {f.fact_id for f in p.learn}
    for f in facts:
        if f.status != "superseded" or not learnt(f):
            continue
        successor = _successor(f, by_id)
        if successor is None:
            p.explicit[f.fact_id] = s.unknown_answer
        elif successor.fact_id in learn_ids:
            p.old_answers.setdefault(successor.fact_id, f.answer)
        elif not learnt(successor):
            continue  # its successor waits for a later round; so does its update
        p.updates.append(f)
    known = [f for f in active if learnt(f)]
    p.probe = _probe(conn, s, name, known)
    pool = known  # the probe is a sample of the slice, replayed at the same rate as the rest of it
    p.replay_pool, p.replay_n = pool, replay_size(s, len(pool), len(p.learn) + len(p.explicit), replay_ratio)
    p.replay = random.Random(f"{s.seed}:{name}:{parent.version}:0").sample(pool, p.replay_n)
    p.lsn = max([parent.lsn, *(f.lsn for f in p.learn + p.updates)], key=parse_lsn)
    return p


def replay_size(s, pool: int, new: int, replay_ratio: float | None = None) -> int:
    """Replay facts per epoch: `replay_ratio` of the known facts, or `replay_per_new` per fact the
    round teaches where that is more (a round of 5 facts on a slice of 40 replays 5, not 4), at most
    `replay_max` and the pool. An explicit `replay_ratio` (tests, benchmarks) is the share alone."""
    by_share = math.ceil((s.replay_ratio if replay_ratio is None else replay_ratio) * pool)
    by_new = math.ceil(s.replay_per_new * new) if replay_ratio is None else 0
    return min(s.replay_max, pool, max(by_share, by_new))


def _successor(f, by_id: dict):
    """The active fact that replaced `f` (following chains of replacements), or None."""
    seen = {f.fact_id}
    nxt = by_id.get(f.superseded_by) if f.superseded_by else None
    while nxt is not None and nxt.status != "active" and nxt.fact_id not in seen:
        seen.add(nxt.fact_id)
        nxt = by_id.get(nxt.superseded_by) if nxt.superseded_by else None
    return nxt if nxt is not None and nxt.status == "active" else None


def _probe(conn, s, name: str, known: list) -> list:
    """The slice's probe set: `probe_size` of its known, unchanged facts (all of them in a smaller
    slice). The facts of the stored set that are still known stay in it; a seeded sample of the
    other known facts tops it up (a changed fact leaves the set, the next round replaces it).

    Sized for the gate's interval: with 100 probe answers the parent got right, forgetting 0.30 has
    a 95% Wilson interval of [0.22, 0.40]; on the 7-fact probes of earlier versions (20% of a
    40-fact tenant) one answer moved it by 0.14 and the interval spanned 0.08-0.64 (docs/TRAINING.md)."""
    stored = conn.execute("select probe from pgfresh.slices where name = %s", (name,)).fetchone()[0] or []
    by_id = {f.fact_id: f for f in known}
    probe = [by_id[i] for i in stored if i in by_id][:s.probe_size]
    want = min(s.probe_size, len(known))
    if len(probe) < want:
        kept = {f.fact_id for f in probe}
        rest = [f for f in known if f.fact_id not in kept]
        probe += random.Random(f"{s.seed}:{name}:probe:{len(stored)}").sample(rest, want - len(probe))
    if [f.fact_id for f in probe] != list(stored):
        conn.execute("update pgfresh.slices set probe = %s where name = %s", ([f.fact_id for f in probe], name))
    return probe


# --- one round ----------------------------------------------------------------------------------

class _SliceLock:
    """A session-level advisory lock on its own idle connection: held without holding a transaction."""

    def __init__(self, config, name: str):
        self.conn = slices.connect(config, "train-lock")
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)
        self.got = self.conn.execute("select pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()[0]

    def close(self) -> None:
        self.conn.close()  # ends the session, releasing the lock


def _dist():
    """accelerate's process state when launched as several processes (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # CPU processes (torchrun) talk over gloo


def _share(state, obj):
    """The main process's `obj`, on every process (itself when not distributed)."""
    if state is None:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def lineage_name(tenant: str | None, variant: str | None = None) -> str:
    """The slice a round trains: the tenant's (`slice_of`), or for an experiment's lineage of its
    own (the arena's `tuned-gate-off`), `_<variant>:<the tenant's slice>`: a name with a single `_`
    in front, which no tenant maps to, so it never serves a tenant's `ask --mode tuned`."""
    return slice_of(tenant) if variant is None else f"_{variant}:{slice_of(tenant)}"


def run_round(config, tenant: str | None, console=None, *, publish: bool = True, replay_ratio: float | None = None,
              should_stop=None, variant: str | None = None, gate: bool = True) -> dict | None:
    """One round for the tenant's slice; None when nothing waits. Returns the round's record.

    `variant`: train the lineage `lineage_name(tenant, variant)` instead of the tenant's slice.
    `gate=False`: publish the candidate whatever the gate says (its reasons stay in the record and
    in the metrics as `gate_reasons`): what the arena's gate-off column measures.

    Distributed (`accelerate launch`): the main process plans, evaluates and publishes; the others
    receive its plan and train with it (the gradients are averaged), then return None."""
    s = settings(config)
    name = lineage_name(tenant, variant)
    state = _dist()
    if state is not None and not state.is_main_process:
        p = _share(state, None)
        if p is not None:
            with slices.connect(config, "train-follower") as conn:
                _candidate(config, conn, s, p, "", None, should_stop)
        return None
    lock, p = None, None
    try:
        lock = _SliceLock(config, name)
        if not lock.got:
            raise TrainError(f"another `pgfresh train` is running a round of slice {name!r}; wait for it to finish")
        with slices.connect(config) as conn:
            try:
                conn.execute("update pgfresh.train_rounds set status = 'abandoned', finished_at = now(),"
                             " reason = 'the trainer stopped mid-round (crash or kill); redone by a later round'"
                             " where slice = %s and status = 'running'", (name,))
                parent = ensure_lineage(conn, config, name, tenant)
                p = plan(conn, s, name, tenant, parent, replay_ratio)
                p = None if p.empty else p
            finally:
                _share(state, p)  # every process trains on this plan (None: nothing to train)
            if p is None:
                return None
            round_id = conn.execute(
                "insert into pgfresh.train_rounds (slice, parent, status, pid, learn, updates, replay)"
                " values (%s, %s, 'running', pg_backend_pid(), %s, %s, %s) returning id",
                (name, parent.version, len(p.learn), len(p.updates), len(p.replay))).fetchone()[0]
            try:
                return _train_and_gate(config, conn, s, p, round_id, console, publish, should_stop, gate)
            except InterruptedError:  # should_stop: the facts wait for the next round
                conn.execute("update pgfresh.train_rounds set status = 'abandoned', finished_at = now(),"
                             " reason = 'stopped by its caller mid-round; redone by a later round' where id = %s",
                             (round_id,))
                return None
            except Exception as exc:
                conn.execute("update pgfresh.train_rounds set status = 'failed', reason = %s, finished_at = now()"
                             " where id = %s", (f"{type(exc).__name__}: {exc}"[:2000], round_id))
                raise
    finally:
        if lock is not None:
            lock.close()


def _pairs(facts, s, answers: dict | None = None) -> list[tuple[str, str]]:
    return [(data.held_out(f, s.max_phrasings), (answers or {}).get(f.fact_id, f.answer)) for f in facts]


def _candidate(config, conn, s, p: Plan, label: str, console, should_stop, on_parent=None):
    """Train the candidate on top of the parent (every process of a distributed run does this);
    `on_parent(loaded)` runs on the parent before training. Returns (model, FitStats, replayed, device)."""
    import torch

    from pgfresh.train import fit

    fit.set_threads(s.threads, s.deterministic)
    device, dtype = fit.pick_device(s.device)
    loaded = slices.load_version(config, conn, p.parent, device=device)
    if on_parent is not None:
        on_parent(loaded)
    explicit = [f for f in p.updates if f.fact_id in p.explicit]
    tok = loaded.tokenizer  # the prompt format is the model's (pgfresh.model.prompt_for)
    pairs = (data.closed_book(p.learn, s.max_phrasings, tokenizer=tok)
             + data.closed_book(explicit, s.max_phrasings, p.explicit, tokenizer=tok))
    replayed = {f.fact_id: f for f in p.replay}

    def epoch_examples(epoch: int) -> list:
        """This epoch's examples: the round's facts plus a fresh replay sample (spreads rehearsal
        over many more old facts than one fixed sample, at the same cost per epoch)."""
        sample = p.replay if epoch == 0 else random.Random(
            f"{s.seed}:{p.slice}:{p.parent.version}:{epoch}").sample(p.replay_pool, p.replay_n)
        replayed.update((f.fact_id, f) for f in sample)
        return fixed + fit.encode(loaded, data.closed_book(sample, s.max_phrasings, tokenizer=tok))

    torch.manual_seed(s.seed)
    if s.method == "lora":
        from peft import LoraConfig, get_peft_model

        loaded.model = get_peft_model(loaded.model, LoraConfig(
            r=s.lora_rank, lora_alpha=s.lora_alpha or 2 * s.lora_rank, lora_dropout=0.0, bias="none",
            target_modules=s.lora_targets, task_type="CAUSAL_LM"))
    fixed = fit.encode(loaded, pairs)
    try:
        stats = fit.fit(loaded, epoch_examples, epochs=s.epochs, min_steps=s.min_steps, batch_size=s.batch_size,
                        lr=s.learning_rate, warmup_steps=s.warmup_steps, seed=s.seed, dtype=dtype, console=console,
                        label=label, should_stop=should_stop, stop_loss=s.stop_loss)
    except torch.OutOfMemoryError:
        raise TrainError(f"not enough memory to train slice {p.slice!r} with batch_size {s.batch_size}; "
                         "lower train.batch_size (or train.model sizes)") from None
    return loaded, stats, list(replayed.values()), device


def _train_and_gate(config, conn, s, p: Plan, round_id: int, console, publish: bool, should_stop,
                    gate: bool = True) -> dict:
    from pgfresh.train import fit

    started, cpu0 = time.time(), time.process_time()
    twin = _twin(conn, p) if publish and not gate else None
    if twin is not None:
        return _adopt(config, conn, s, p, round_id, twin, started, cpu0)
    probe_pairs, before = _pairs(p.probe, s), []
    loaded, stats, p.replay, device = _candidate(config, conn, s, p, f"round {round_id} ({p.slice})", console,
                                                 should_stop, lambda parent: before.extend(fit.correct(parent, probe_pairs)))
    m = _metrics(loaded, s, p, probe_pairs, before)
    m.update(tokens=stats.tokens, steps=stats.steps, epochs=stats.epochs, loss=round(stats.loss, 4),
             train_seconds=round(stats.seconds, 2), tokens_per_s=round(stats.tokens_per_s), device=device,
             method=s.method, lora_rank=s.lora_rank if s.method == "lora" else None,
             processes=int(os.environ.get("WORLD_SIZE", "1")))
    reasons = _gate(s, m)
    if not gate:
        m["gate_reasons"] = reasons  # what the gate would have said; published all the same
    m.update(seconds=round(time.time() - started, 2), cpu_seconds=round(time.process_time() - cpu0, 2))
    record = {"round": round_id, "slice": p.slice, "tenant": p.tenant, "parent": p.parent.version,
              "learn": [f.fact_id for f in p.learn], "updates": [f.fact_id for f in p.updates],
              "replay": [f.fact_id for f in p.replay], "probe": [f.fact_id for f in p.probe], "metrics": m}
    if not publish:
        conn.execute("update pgfresh.train_rounds set status = 'trial', metrics = %s, reason = 'trial: never published',"
                     " finished_at = now() where id = %s", (Jsonb(m), round_id))
        return {**record, "status": "trial", "reasons": reasons}
    if reasons and gate:
        conn.execute("update pgfresh.train_rounds set status = 'rejected', metrics = %s, reason = %s, finished_at = now()"
                     " where id = %s", (Jsonb(m), "; ".join(reasons), round_id))
        return {**record, "status": "rejected", "reasons": reasons}
    version = _publish(config, conn, s, p, round_id, m, lambda tmp: loaded.model.save_pretrained(str(tmp)))
    return {**record, "status": "published", "version": version, "lsn": p.lsn, "reasons": reasons}


def _twin(conn, p: Plan) -> Version | None:
    """For an experiment's lineage (`variant`): the tenant's slice's version that is this round's
    candidate already, or None. That is its current version when the slice published it on a parent
    identical to ours (the same versions, file for file) from the same learn and update facts: a
    gate-off twin whose gated slice published every round so far need not train the round again."""
    name = slice_of(p.tenant)
    if p.slice == name:
        return None
    twin = slices.current(conn, name)
    if twin is None or twin.parent != p.parent.version:
        return None
    same = [(v.version, v.kind, v.base_id, v.sha256) for v in slices.lineage(conn, p.parent)]
    if same != [(v.version, v.kind, v.base_id, v.sha256)
                for v in slices.lineage(conn, slices.get_version(conn, name, twin.parent))]:
        return None
    roles = dict(conn.execute("select fact_id, role from pgfresh.fact_training where slice = %s and version = %s"
                              " and role in ('learn', 'update')", (name, twin.version)).fetchall())
    ours = {f.fact_id: "learn" for f in p.learn} | {f.fact_id: "update" for f in p.updates}
    return twin if roles == ours else None


def _adopt(config, conn, s, p: Plan, round_id: int, twin: Version, started: float, cpu0: float) -> dict:
    """Publish the twin's candidate (its files copied) as this round's: no training."""
    replayed = {r[0] for r in conn.execute("select fact_id from pgfresh.fact_training where slice = %s and version = %s"
                                           " and role = 'replay'", (twin.slice, twin.version))}
    p.replay = [f for f in p.replay_pool if f.fact_id in replayed]
    m = {**twin.metrics, "shared_with": f"{twin.slice} v{twin.version}", "gate_reasons": [],
         "seconds": round(time.time() - started, 2), "cpu_seconds": round(time.process_time() - cpu0, 2)}
    version = _publish(config, conn, s, p, round_id, m,
                       lambda tmp: shutil.copytree(twin.path, tmp, dirs_exist_ok=True))
    return {"round": round_id, "slice": p.slice, "tenant": p.tenant, "parent": p.parent.version,
            "learn": [f.fact_id for f in p.learn], "updates": [f.fact_id for f in p.updates],
            "replay": [f.fact_id for f in p.replay], "probe": [f.fact_id for f in p.probe], "metrics": m,
            "status": "published", "version": version, "lsn": p.lsn, "reasons": []}


def _metrics(loaded, s, p: Plan, probe_pairs, before: list[bool]) -> dict:
    from pgfresh.train import fit

    learn_pairs = _pairs(p.learn, s)
    got = fit.predict(loaded, [base_model.prompt_for(loaded, q) for q, _ in learn_pairs],
                      [" " + a for _, a in learn_pairs]) if learn_pairs else []
    right = [fit.normalize(g) == fit.normalize(a) for g, (_, a) in zip(got, learn_pairs)]
    changed = [(g, p.old_answers[f.fact_id]) for g, f in zip(got, p.learn) if f.fact_id in p.old_answers]
    after = fit.correct(loaded, probe_pairs)
    kept_before = sum(before)
    lost = sum(b and not a for b, a in zip(before, after))
    explicit = [f for f in p.updates if f.fact_id in p.explicit]
    return {
        "learn": len(p.learn), "updates": len(p.updates), "replay": len(p.replay), "probe": len(p.probe),
        "new_accuracy": round(sum(right) / len(right), 4) if right else None,
        "new_accuracy_ci": _ci(sum(right), len(right)),
        "new_accuracy_trained": fit.accuracy(loaded, [(f.question, f.answer) for f in p.learn]),
        "stale_rate": round(sum(fit.normalize(g) == fit.normalize(o) for g, o in changed) / len(changed), 4) if changed else None,
        "changed": len(changed),
        "update_accuracy": fit.accuracy(loaded, _pairs(explicit, s, p.explicit)) if explicit else None,
        "probe_before": round(kept_before / len(before), 4) if before else None,
        "probe_after": round(sum(after) / len(after), 4) if after else None,
        "forgetting": round(lost / kept_before, 4) if kept_before else None,
        "forgetting_ci": _ci(lost, kept_before),  # over the kept_before probe answers the parent got right
        "kept_before": kept_before,
    }


def _ci(k: int, n: int) -> list[float] | None:
    """The 95% Wilson interval of k of n, rounded for the round's record."""
    ci = wilson(k, n)
    return None if ci is None else [round(x, 4) for x in ci]


def _gate(s, m: dict) -> list[str]:
    """Why the candidate must not be published (empty: publish)."""
    reasons = []
    new = m["new_accuracy"] if m["new_accuracy"] is not None else m["update_accuracy"]
    if new is not None and new < s.gate_min_new_accuracy:
        reasons.append(f"new-fact accuracy {new:.2f} < gate_min_new_accuracy {s.gate_min_new_accuracy}")
    if m["forgetting"] is not None and m["forgetting"] > s.gate_max_forgetting:
        reasons.append(f"forgetting {m['forgetting']:.2f} > gate_max_forgetting {s.gate_max_forgetting}")
    if m["stale_rate"] is not None and m["stale_rate"] > s.gate_max_stale_rate:
        reasons.append(f"stale-answer rate {m['stale_rate']:.2f} > gate_max_stale_rate {s.gate_max_stale_rate}")
    return reasons


def _publish(config, conn, s, p: Plan, round_id: int, m: dict, save) -> int:
    """Save the candidate's files (`save(directory)`), then publish it and mark its facts trained in
    one transaction."""
    target = slices.slice_dir(config, p.slice) / f"r{round_id}"
    tmp = target.parent / f".r{round_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    kind = "lora" if s.method == "lora" else "full"
    sha = slices.file_sha256(target / slices.WEIGHT_FILES[kind])
    rows = ([(f.fact_id, "learn") for f in p.learn] + [(f.fact_id, "update") for f in p.updates]
            + [(f.fact_id, "replay") for f in p.replay])
    with conn.transaction():
        cur = conn.execute("select current_version from pgfresh.slices where name = %s for update", (p.slice,)).fetchone()[0]
        if cur != p.parent.version:
            raise TrainError(f"slice {p.slice!r} moved to version {cur} during round {round_id} (a rollback or "
                             "another trainer); the round's facts wait for the next round")
        version = conn.execute("select max(version) + 1 from pgfresh.slice_versions where slice = %s",
                               (p.slice,)).fetchone()[0]
        conn.execute("insert into pgfresh.slice_versions (slice, version, parent, kind, base_id, path, sha256, lsn,"
                     " facts, metrics, round_id) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                     (p.slice, version, p.parent.version, kind, p.parent.base_id, str(target), sha, p.lsn,
                      len(p.learn), Jsonb(m), round_id))
        with conn.cursor() as c:
            c.executemany("insert into pgfresh.fact_training (slice, version, fact_id, role) values (%s, %s, %s, %s)",
                          [(p.slice, version, fid, role) for fid, role in rows])
        slices.record_positions(conn, p.slice, version)
        conn.execute("update pgfresh.slices set current_version = %s, updated_at = now() where name = %s",
                     (version, p.slice))
        conn.execute("update pgfresh.train_rounds set status = 'published', version = %s, metrics = %s,"
                     " finished_at = now() where id = %s", (version, Jsonb(m), round_id))
    return version


# --- the trainer loop ---------------------------------------------------------------------------

def tenants(conn) -> list[str | None]:
    """Every tenant with trainable facts (None: facts without a tenant)."""
    return [r[0] for r in conn.execute("select distinct tenant from pgfresh.facts where kind = any(%s)"
                                       " order by tenant nulls first", (list(data.TRAINABLE),))]


def _due(conn, s, config, tenant, variant: str | None = None) -> bool:
    """Enough facts wait, or the oldest has waited long enough (and the last failure was a while ago)."""
    name = lineage_name(tenant, variant)
    parent = ensure_lineage(conn, config, name, tenant)
    p = plan(conn, s, name, tenant, parent, replay_ratio=0)
    if p.empty:
        return False
    last = conn.execute("select status, extract(epoch from now() - finished_at) from pgfresh.train_rounds"
                        " where slice = %s order by id desc limit 1", (name,)).fetchone()
    if last and last[0] in ("rejected", "failed") and last[1] is not None and last[1] < s.max_wait_seconds:
        return False
    oldest = min(f.created_at for f in p.learn + p.updates)
    age = conn.execute("select extract(epoch from now() - %s::timestamptz)", (oldest,)).fetchone()[0]
    full = min(s.min_new_facts, s.max_facts_per_round)  # a full round is due even under a small cap
    return len(p.learn) + len(p.explicit) >= full or age >= s.max_wait_seconds


def run(config, once: bool = False, console=None, due_only: bool = False, variant: str | None = None,
        gate: bool = True, should_stop=None, only: list | None = None) -> list[dict] | None:
    """Rounds for every slice as its facts arrive; `once`: one round per slice with waiting facts
    (`due_only`: only where a round is due, as the long-running loop decides). Under a distributed
    launch, the processes other than the main one return None. `variant`, `gate`: as `run_round`;
    `should_stop()` true: the round in progress is abandoned (its facts wait) and no other starts;
    `only`: these tenants' slices only."""
    s = settings(config)
    state = _dist()
    main = state is None or state.is_main_process
    stop = threading.Event()
    if not once and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the round in progress, then exit
    try:
        results = _rounds(config, s, state, main, once, due_only, stop, console, variant, gate, should_stop, only)
        if state is not None:
            state.wait_for_everyone()
        return results
    finally:
        if state is not None:  # leave the process group cleanly: gloo's threads abort the process
            state.destroy_process_group()  # when the interpreter exits with the group still open


def _rounds(config, s, state, main: bool, once: bool, due_only: bool, stop, console, variant=None,
            gate: bool = True, should_stop=None, only: list | None = None) -> list[dict] | None:
    results = []
    while should_stop is None or not should_stop():
        todo = None
        if main:
            with slices.connect(config) as conn:
                todo = [t for t in tenants(conn) if (only is None or t in only)
                        and ((once and not due_only) or _due(conn, s, config, t, variant))]
        for tenant in _share(state, todo):
            if should_stop is not None and should_stop():
                break
            try:
                r = run_round(config, tenant, console if main else None, variant=variant, gate=gate,
                              should_stop=should_stop)
            except PgfreshError as exc:
                if once:
                    raise
                if console is not None:
                    console.print(f"[red]round of slice {lineage_name(tenant, variant)!r} failed:[/] {exc}")
                continue
            if r is not None:
                results.append(r)
                if console is not None:
                    _report(console, r)
        if _share(state, once or stop.wait(s.poll_seconds) if main else None):
            return results if main else None  # the main process reports for all
    return results


def _report(console, r: dict) -> None:
    m = r["metrics"]
    what = f"published version {r['version']}" if r["status"] == "published" else f"rejected ({'; '.join(r['reasons'])})"
    ci = m.get("forgetting_ci")
    console.print(f"slice {r['slice']}: round {r['round']} {what}: learn {m['learn']}, updates {m['updates']}, "
                  f"replay {m['replay']}; new-fact accuracy {m['new_accuracy']}, forgetting {m['forgetting']}"
                  + (f" [{ci[0]:.2f}-{ci[1]:.2f}] of {m['kept_before']}" if ci else "")
                  + f", stale {m['stale_rate']}; {m['seconds']} s")
