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
_stats: dict[tuple, tuple[float, dict[str, float]]] = {}


def or_query(lexemes: list[str], frequency: dict[str, float], max_df: float) -> str:
    """A tsquery (text) matching documents that share ANY of the question's lexemes, leaving out
    those in more than `max_df` of all documents (the two rarest stay if all are that common).

    An OR, because an AND of every word of a question ("what is the price of the oak table")
    matches almost nothing; without the common ones, because a word in every row would make every
    row a candidate to rank (the cost of lexical search grows with the rows that match).
    """
    keep = [lx for lx in lexemes if frequency.get(lx, 0.0) <= max_df]
    if not keep:
        keep = sorted(lexemes, key=lambda lx: frequency.get(lx, 0.0))[:2]
    return " | ".join("'" + lx.replace("\\", "\\\\").replace("'", "''") + "'" for lx in keep)


def common_lexemes(conn) -> dict[str, float]:
    """Share of documents containing each frequent lexeme, from ANALYZE's statistics of
    pgfresh.documents.tsv (cached a minute per database; empty before the first ANALYZE)."""
    import time

    key = (conn.info.host, conn.info.port, conn.info.dbname)
    now = time.monotonic()
    hit = _stats.get(key)
    if hit and now - hit[0] < _STATS_SECONDS:
        return hit[1]
    row = conn.execute(
        "select most_common_elems::text::text[], most_common_elem_freqs from pg_stats"
        " where schemaname = 'pgfresh' and tablename = 'documents' and attname = 'tsv'").fetchone()
    freq = dict(zip(row[0], row[1])) if row and row[0] else {}
    _stats[key] = (now, freq)
    return freq
