"""Lexical text for PostgreSQL full text search, for segmented and unsegmented scripts alike.

PostgreSQL's parser keeps a run of Chinese, Japanese or Thai characters as one token ("中文文字"),
so a question that names part of the run never matches. pgfresh adds the run's overlapping
character bigrams ("中文 文文 文字") as extra lexemes under the `simple` configuration, the
tokenisation Lucene's CJK analyser uses; stemmed words of the configured language stay as they
were. Documents and questions go through the same function, so both sides agree.
"""

from __future__ import annotations

import re

# Scripts written without spaces between words: CJK ideographs, kana, Hangul, Thai, Lao, Khmer, Myanmar.
_UNSEGMENTED = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u0e00-\u0eff\u1780-\u17ff\u1000-\u109f"
    "\U00020000-\U0002fa1f]+"
)


def bigram_text(text: str) -> str:
    """Space-separated overlapping bigrams of every unsegmented run in `text` ('' when none)."""
    out: list[str] = []
    for run in _UNSEGMENTED.findall(text):
        if len(run) == 1:
            out.append(run)
        else:
            out.extend(run[i:i + 2] for i in range(len(run) - 1))
    return " ".join(out)


# SQL fragment (takes the regconfig, the text and its bigram text as parameters, in that order).
TSVECTOR_SQL = "(to_tsvector({cfg}, {text}) || to_tsvector('simple', {bigrams}))"

_STATS_SECONDS = 60.0
_stats: dict[tuple, tuple[float, tuple[dict[str, float], float]]] = {}


def or_query(lexemes: list[str], frequency: dict[str, float], max_df: float) -> str:
    """A tsquery (text) matching documents that share ANY of the question's lexemes, leaving out
    those in more than `max_df` of all documents (the two rarest stay if all are that common).

    An OR, because an AND of every word of a question ("what is the price of the oak table")
    matches almost nothing; without the common ones, because a word in every row would make every
    row a candidate to rank (the cost of lexical search grows with the rows that match).
    """
    return _or(_kept(lexemes, frequency, max_df))


def match_query(lexemes: list[str], frequency: dict[str, float], max_df: float, documents: float,
                max_rows: int) -> str:
    """The tsquery that selects lexical candidates, bounded to about `max_rows` matching documents.

    `or_query`'s words, rarest first, while their estimated matches (share x `documents`) add up
    to at most `max_rows`; when that leaves two or more words out (or every word is that common),
    documents holding *all* of those match too. In a million documents "red", "oak" and "sofa" are each in
    tens of thousands of rows: ranking their OR costs a quarter of a second, while the rows holding
    all three (and those holding a rare word, like a name) are the ones ts_rank would put first.
    Words under ANALYZE's radar count at its smallest tracked frequency.
    """
    keep = _kept(lexemes, frequency, max_df)
    if not keep:  # no word at all (a question of punctuation): nothing to match, as or_query
        return ""
    floor = min(frequency.values(), default=0.0)
    chosen, rows = [], 0.0
    for lx in sorted(keep, key=lambda lx: (frequency.get(lx, floor), lx)):
        rows += frequency.get(lx, floor) * documents
        if rows > max_rows:
            break
        chosen.append(lx)
    left = [lx for lx in keep if lx not in chosen]
    chosen = [lx for lx in keep if lx in chosen]  # the question's order
    parts = [_or(chosen)] if chosen else []
    if len(left) >= 2 or not chosen:  # one word left out: its rows with a chosen word match already
        parts.append("(" + " & ".join(_quote(lx) for lx in left) + ")")
    return " | ".join(parts)


def _kept(lexemes: list[str], frequency: dict[str, float], max_df: float) -> list[str]:
    keep = [lx for lx in lexemes if frequency.get(lx, 0.0) <= max_df]
    if not keep:
        keep = sorted(lexemes, key=lambda lx: frequency.get(lx, 0.0))[:2]
    return keep


def _quote(lx: str) -> str:
    return "'" + lx.replace("\\", "\\\\").replace("'", "''") + "'"


def _or(lexemes: list[str]) -> str:
    return " | ".join(_quote(lx) for lx in lexemes)


def common_lexemes(conn) -> dict[str, float]:
    """Share of documents containing each frequent lexeme, from ANALYZE's statistics of
    pgfresh.documents.tsv (cached a minute per database; empty before the first ANALYZE)."""
    return _statistics(conn)[0]


def document_count(conn) -> float:
    """Documents in pgfresh.documents by the planner's estimate (cached with `common_lexemes`)."""
    return _statistics(conn)[1]


def _statistics(conn) -> tuple[dict[str, float], float]:
    import time

    key = (conn.info.host, conn.info.port, conn.info.dbname)
    now = time.monotonic()
    hit = _stats.get(key)
    if hit and now - hit[0] < _STATS_SECONDS:
        return hit[1]
    row = conn.execute(
        "select s.most_common_elems::text::text[], s.most_common_elem_freqs,"
        " (select greatest(reltuples, 0) from pg_class where oid = 'pgfresh.documents'::regclass)"
        " from (select 1) one left join pg_stats s"
        " on s.schemaname = 'pgfresh' and s.tablename = 'documents' and s.attname = 'tsv'").fetchone()
    freq = dict(zip(row[0], row[1])) if row[0] else {}
    _stats[key] = (now, (freq, float(row[2] or 0)))
    return _stats[key][1]
