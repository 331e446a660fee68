"""What a question (or a search text) must be before anything embeds, searches or caches it.

`check(question, tenant=..., k=...)` is the one gate every entry point calls (the CLI, the HTTP
API, `rag.ask`, `rag.run_search`), so a question is judged the same way everywhere. Problems are
reported together, in one line (a `QuestionError`, exit 2 at the CLI).

- at most `MAX_QUESTION_CHARS` (2000) characters, and not empty or blank;
- valid UTF-8 text without NUL characters (PostgreSQL text cannot hold NUL; a command-line
  argument that was not UTF-8 reaches Python as lone surrogates);
- `k`, where given, an integer from 1 to `MAX_K` (1000).
"""

from __future__ import annotations

from pgfresh.errors import PgfreshError

MAX_QUESTION_CHARS = 2000
MAX_K = 1000


class QuestionError(PgfreshError):
    """A question, tenant or k that cannot be asked; the message lists every problem."""


def _text_problems(what: str, value) -> list[str]:
    if not isinstance(value, str):
        return [f"{what}: expected text, got {type(value).__name__}"]
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return [f"{what} is not valid UTF-8 (undecodable byte at character {exc.start}): pass UTF-8 text"]
    if "\x00" in value:
        return [f"{what} contains a NUL character (at {value.index(chr(0))}): remove it"]
    return []


def check(question, *, tenant=None, k=None, what: str = "question") -> None:
    """Raise QuestionError naming every problem with `question`, `tenant` and `k`; return None if fine."""
    problems = _text_problems(what, question)
    if not problems:
        if not question.strip():
            problems.append(f"{what} is empty: ask something")
        elif len(question) > MAX_QUESTION_CHARS:
            problems.append(f"{what} is {len(question)} characters long: at most {MAX_QUESTION_CHARS} are accepted")
    if tenant is not None:
        problems += _text_problems("tenant", tenant)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K):
        problems.append(f"k: expected an integer from 1 to {MAX_K}, got {k!r}")
    if problems:
        raise QuestionError("; ".join(problems))
