"""Training data: facts from `pgfresh.facts` -> (prompt, answer) pairs in the model's prompt format
(`pgfresh.model.prompt_for` of the `tokenizer` given: its chat template if it has one; without
one, the built-in model's format).

Each fact comes in several phrasings (the canonical question and its paraphrases). One
paraphrase per fact is *held out*: never trained on, used only by the gate, so accuracy measures
knowledge that can be extracted, not a memorised string. Which one is held out rotates from fact
to fact (a hash of table, key and template, so a row's new version holds out the same one), so
every phrasing shape is trained on other facts.

Open-book examples (RAFT-style) put the fact's own row document first (as a reranker ranks it),
followed by 0 to `distractors` other documents; in a share of them the document states a value of
the same shape drawn afresh for the example and the answer follows the document, so the model
learns to read rather than to recall.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import datetime

from pgfresh.model import answer_for, prompt_for

ANY = object()  # tenant filter: every tenant
TRAINABLE = ("qa", "gone")  # statements serve as open-book documents only


@dataclass(frozen=True)
class FactRow:
    """A row of `pgfresh.facts` as training reads it back: `render.Fact` (what a row renders to) once
    stored, with where it stands in its row's lineage (`status`, `superseded_by`, `created_at`) and
    its LSN as the text the slice versions record. A different thing from `render.Fact`, hence the name."""

    fact_id: str
    tbl: str
    key: str
    tenant: str | None
    kind: str
    template: str
    question: str
    paraphrases: tuple[str, ...]
    answer: str
    lsn: str
    status: str = "active"
    superseded_by: str | None = None
    created_at: datetime | None = None

    @property
    def slot(self) -> tuple[str, str, str]:
        """What stays the same across versions of a fact: the row and the question."""
        return (self.tbl, self.key, self.template)


_COLUMNS = ("fact_id, tbl, key, tenant, kind, template, question, paraphrases, answer, lsn::text, status,"
            " superseded_by, created_at")


def _tenant_filter(tenant) -> tuple[str, tuple]:
    if tenant is ANY:
        return "true", ()
    if tenant is None:
        return "tenant is null", ()
    return "tenant = %s", (tenant,)


def load_facts(conn, tenant=ANY, kinds=TRAINABLE, statuses=("active",), ids: list[str] | None = None) -> list[FactRow]:
    """Facts of one tenant (None: facts without a tenant; ANY: all), in a stable order."""
    where, params = _tenant_filter(tenant)
    query = (f"select {_COLUMNS} from pgfresh.facts where {where} and kind = any(%s) and status = any(%s)"
             + (" and fact_id = any(%s)" if ids is not None else "") + " order by tbl, key, template, created_at")
    params = (*params, list(kinds), list(statuses), *([ids] if ids is not None else []))
    return [FactRow(*r[:7], tuple(r[7] or ()), *r[8:]) for r in conn.execute(query, params)]


def load_documents(conn, tenant=ANY) -> dict[tuple[str, str], str]:
    """The current document text of each row ((tbl, key) -> text), from the active statement facts."""
    where, params = _tenant_filter(tenant)
    rows = conn.execute(f"select tbl, key, question from pgfresh.facts where {where} and kind = 'statement'"
                        " and status = 'active' order by tbl, key", params)
    return {(t, k): text for t, k, text in rows}


def max_lsn(conn) -> str:
    """The LSN the facts are current to: the newest fact's, or capture's position when the facts
    worker has consumed the whole change log (snapshot rows carry LSN 0/0)."""
    return conn.execute(
        "select greatest((select max(lsn) from pgfresh.facts),"
        " (select max(p.lsn) from pgfresh.sink_progress p where coalesce((select k.seq from pgfresh.consumers k"
        "  where k.pipeline = p.pipeline and k.name = 'facts'), -1)"
        "  >= (select coalesce(max(c.seq), 0) from pgfresh.changes c where c.pipeline = p.pipeline)), '0/0')::text"
    ).fetchone()[0]


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def split_phrasings(fact: FactRow, max_phrasings: int) -> tuple[list[str], str | None]:
    """(training phrasings, held-out phrasing or None): the canonical question is always trained."""
    phrasings = list(dict.fromkeys([fact.question, *fact.paraphrases]))
    if len(phrasings) < 2:
        return phrasings, None
    h = _hash(*fact.slot)
    held = 1 + h % (len(phrasings) - 1)
    others = [p for i, p in enumerate(phrasings) if i not in (0, held)]
    if others:
        shift = (h >> 20) % len(others)
        others = others[shift:] + others[:shift]
    return [phrasings[0], *others][:max(1, max_phrasings)], phrasings[held]


def held_out(fact: FactRow, max_phrasings: int) -> str:
    """The phrasing the gate asks: the held-out one, or the question itself when there is no other."""
    return split_phrasings(fact, max_phrasings)[1] or fact.question


def closed_book(facts: list[FactRow], max_phrasings: int, answers: dict[str, str] | None = None,
                tokenizer=None) -> list[tuple[str, str]]:
    """(prompt, answer continuation) for every training phrasing; `answers` overrides a fact's answer."""
    out = []
    for f in facts:
        answer = (answers or {}).get(f.fact_id, f.answer)
        out += [(prompt_for(tokenizer, q), answer_for(tokenizer, answer)) for q in split_phrasings(f, max_phrasings)[0]]
    return out


def open_book(facts: list[FactRow], docs: dict, ratio: float, distractors: int, seed: int, max_phrasings: int,
              counterfactual: float = 0.5, held_out: bool = False, unknown: str | None = None,
              no_oracle: float = 0.0, tokenizer=None) -> list[tuple[str, str]]:
    """About `ratio` open-book examples per training phrasing; `counterfactual` share with a changed value,
    `no_oracle` share without the fact's document, answered `unknown` (what a reader says when
    retrieval missed, and how the base model learns the words a deleted row's questions are taught)."""
    rng = random.Random(seed)
    usable = [f for f in facts if f.kind == "qa" and (f.tbl, f.key) in docs]
    if not usable or ratio <= 0:
        return []
    by_template: dict[tuple[str, str], list[str]] = {}
    for f in usable:
        by_template.setdefault((f.tbl, f.template), []).append(f.answer)
    keys = list(docs)
    count = len(usable) if held_out else round(ratio * sum(len(split_phrasings(f, max_phrasings)[0]) for f in usable))
    out = []
    for i in range(count):
        f = usable[i % len(usable)] if held_out else rng.choice(usable)
        doc, answer = docs[(f.tbl, f.key)], f.answer
        train, held = split_phrasings(f, max_phrasings)
        question = (held or f.question) if held_out else rng.choice(train)
        if rng.random() < counterfactual and doc.count(answer) == 1:
            new = _same_shape(answer, rng, [a for a in by_template[(f.tbl, f.template)] if a not in doc])
            if new is not None:
                doc, answer = doc.replace(answer, new), new
        others = [docs[k] for k in rng.sample(keys, min(len(keys), distractors + 1)) if k != (f.tbl, f.key)]
        # best first, as retrieval ranks them: the row's document, then 0..distractors others
        contexts = [doc, *others[:rng.randint(0, distractors) if not held_out else distractors]]
        if unknown and rng.random() < no_oracle:
            contexts, answer = others[:max(1, distractors)], unknown
        out.append((prompt_for(tokenizer, question, contexts), answer_for(tokenizer, answer)))
    return out


def _same_shape(answer: str, rng: random.Random, alternatives: list[str]) -> str | None:
    """A value the model cannot have memorised for this fact: the answer with every digit redrawn
    (a price stays a price, 12.50 -> 83.07), or another row's answer where there are no digits.
    Drawn afresh for every example, so only reading the document predicts it."""
    if any(c.isdigit() for c in answer):
        def redraw(i: int, c: str) -> str:
            leading = i == 0 or not answer[i - 1].isdigit()
            return c if not c.isdigit() or (leading and c == "0") else str(rng.randint(1 if leading else 0, 9))

        new = "".join(redraw(i, c) for i, c in enumerate(answer))
        return new if new != answer else None
    others = [a for a in alternatives if a != answer]
    return rng.choice(others) if others else None
