"""A cheap scorer for obvious junk in free text: 0.0 (reads like text) to 1.0 (certainly junk).

It looks for what people type when they do not mean it: placeholder words (`test`, `asdf`,
`xxx`, `lorem ipsum`, `tbd`), keyboard mashing (runs along a keyboard row, words with almost no
vowels or long consonant runs), one character held down, text that is mostly not letters, and
optionally letters from the wrong script (a table whose text should be Latin receiving Cyrillic).

Each signal gives a score; a value's score is the highest one, a row's the highest over its
scored columns. No model and no dictionary: it runs per change on the stream, so it must cost
microseconds. Values that look like machine tokens (numbers, dates, codes such as `SKU-1042`,
URLs, e-mail addresses) are not free text and score 0 unless they are placeholders.
"""

from __future__ import annotations

import re
import unicodedata

# Whole values that are placeholders. Deliberately not "n/a", "none", "-": those are how people
# write "no value" in real data, and quarantining them would reject honest rows.
PLACEHOLDER = re.compile(
    r"(?:test(?:ing)?|asdf\w*|qwer\w*|zxcv\w*|hjkl\w*|sdf\w*|x{3,}|y{3,}|z{3,}|a{3,}|foo|bar|baz|foobar|dummy"
    r"|placeholder|tbd|todo|fixme|blah(?: ?blah)*|abcd?|lorem ipsum.*|hello world|tmp|xyz|123+|1234\d*|\?+|#+|!+)"
    r"(?:[\s_-]*\d{0,4})?",
    re.IGNORECASE,
)
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm", "1234567890", "qwertzuiop", "azertyuiop", "yxcvbnm")
_VOWELS = set("aeiouyàáâãäåèéêëìíîïòóôõöøùúûüýÿæœ")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_REPEAT = re.compile(r"([^\W\d_])\1{4,}|([^\w\s])\2{5,}", re.UNICODE)
_MACHINE = re.compile(
    r"[+-]?\d[\d.,:/ -]*|[\w.+-]+@[\w-]+\.[\w.-]+|https?://\S+|[0-9a-f]{8}-[0-9a-f-]{27}"
    r"|\d{4}-\d{2}-\d{2}(?:[ T][\d:.+-]+)?|[A-Za-z]{0,6}[-_#/]?\d[\w-]*",
    re.IGNORECASE,
)


# Every pair of neighbouring keys on one keyboard row, in both directions.
_NEIGHBOURS = {pair for row in _ROWS for seq in (row, row[::-1]) for pair in zip(seq, seq[1:])}


def _keyboard_run(word: str) -> int:
    """Length of the longest run of neighbouring keys on one keyboard row."""
    best = run = 1
    w = word.lower()
    for pair in zip(w, w[1:]):
        run = run + 1 if pair in _NEIGHBOURS else 1
        best = max(best, run)
    return best


def _mashed(word: str) -> bool:
    # Thresholds keep real words out: German "Wert" is a 4-key run, "Schmidt" has one vowel in 7,
    # acronyms (HTTPS) have none, so: 5-key runs, or 4 keys with no vowel; vowel share only in
    # words that are not all capitals.
    if len(word) < 4:
        return False
    vowels = sum(c in _VOWELS for c in word.lower())
    run = _keyboard_run(word)
    if run >= 5 or (run == 4 and vowels == 0):
        return True
    return len(word) >= 5 and word.isascii() and not word.isupper() and vowels / len(word) < 0.12


def script_of(ch: str) -> str:
    """The Unicode script of a letter, by its name's first word (LATIN, CYRILLIC, CJK, ...)."""
    try:
        return unicodedata.name(ch).split(" ", 1)[0]
    except ValueError:
        return "UNKNOWN"


def score(text: str, script: str | None = None) -> tuple[float, str]:
    """(score, reason) for one text value; reason is '' for clean text."""
    s = text.strip()
    if not s:
        return 0.0, ""
    if PLACEHOLDER.fullmatch(s):
        return 1.0, f"placeholder text {s[:20]!r}"
    if _MACHINE.fullmatch(s):
        return 0.0, ""
    results = [(0.0, "")]
    words = _WORD.findall(s)
    letters = sum(len(w) for w in words)
    if words:
        mashed = [w for w in words if _mashed(w)]
        share = sum(len(w) for w in mashed) / max(letters, 1)
        if mashed:
            results.append((min(1.0, 0.2 + share), f"keyboard mashing {mashed[0][:20]!r}"))
    if _REPEAT.search(s):
        results.append((0.6, f"a character held down {_REPEAT.search(s).group(0)[:12]!r}"))
    visible = sum(not c.isspace() for c in s)
    if visible >= 6 and letters / visible < 0.25:
        results.append((0.95 - letters / visible, f"mostly not letters ({letters}/{visible})"))
    if script and letters:
        foreign = sum(script_of(c) != script for w in words for c in w)
        if foreign / letters > 0.5:
            results.append((0.8, f"{foreign} of {letters} letters are not {script.title()}"))
    return max(results, key=lambda r: r[0])


def score_row(row: dict, columns: list[str] | None, skip: set[str], script: str | None = None):
    """(score, column, reason) of the junkiest scored value in a row."""
    best = (0.0, None, "")
    names = columns if columns is not None else [c for c in row if c not in skip]
    for col in names:
        value = row.get(col)
        if isinstance(value, str):
            s, why = score(value, script)
            if s > best[0]:
                best = (s, col, why)
    return best
