-- 018: find a fact by the way a question is phrased.
--
-- The hybrid router judges the row a question names. A question phrased as one of a row's fact
-- phrasings (its canonical question or a paraphrase) names that row even when retrieval does not
-- return it: a deleted row has no document left, yet its 'gone' facts are what a slice learns.
-- phrasing_key() is the comparison the router uses: lower case, every run of punctuation and
-- white space one space, trimmed. The index holds the keys of the active facts rounds train, written
-- with each fact (fastupdate off: a hybrid answer never scans a pending list of recent facts).
-- bench/phrasing_lookup.py: 0.3 ms a lookup at 1M facts; ~22 us more per fact written (docs/BENCHMARKS.md).

create function pgfresh.phrasing_key(text) returns text
    language sql immutable strict parallel safe
    as $$select lower(trim(regexp_replace($1, '[[:punct:][:space:]]+', ' ', 'g')))$$;

create function pgfresh.phrasing_keys(question text, paraphrases text[]) returns text[]
    language sql immutable parallel safe
    as $$select array(select pgfresh.phrasing_key(p) from unnest($1 || $2) p)$$;

create index facts_by_phrasing on pgfresh.facts using gin (pgfresh.phrasing_keys(question, paraphrases))
    with (fastupdate = off) where status = 'active' and kind in ('qa', 'gone');
