"""Built-in paraphrases: deterministic, rule-based rewrites of a question template.

Knowledge trained into a model is only extractable when each fact was seen in varied phrasings
(Allen-Zhu & Li, Physics of Language Models 3.1), so every question gets several. The rules work
on the template ("What is the price of {name}?"), before values are filled in, so a value such as
"Bag of chips" can never confuse them, and the same template always gives the same rewrites:

    What is the price of {name}?  ->  What's the price of {name}?
                                      Tell me the price of {name}.
                                      Could you tell me the price of {name}?
                                      {name}: what is its price?
                                      What is {name}'s price?
                                      ... then general ones ("Quick question: ...")

Question shapes with specific rules: "What is/are the A of B?", "How much does X cost?",
"How many A does B have?", "Wh- is/are/was/were X?", "Is/Are/Does/Do/Can/Has X ...?".
Every question also gets general rewrites, so each has at least three.
"""

from __future__ import annotations

import re


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def _specific(q: str) -> list[str]:
    m = re.fullmatch(r"What (is|are) the (.+?) of (.+?)\?", q, re.IGNORECASE)
    if m:
        verb, a, b = m.groups()
        singular = verb.lower() == "is"
        out = [f"Tell me the {a} of {b}.", f"Could you tell me the {a} of {b}?",
               f"{b}: what {verb.lower()} {'its' if singular else 'their'} {a}?", f"Do you know the {a} of {b}?"]
        if singular:
            possessive = "'" if b.endswith("s") else "'s"
            out[:0] = [f"What's the {a} of {b}?"]
            out.append(f"What is {b}{possessive} {a}?")
        return out
    m = re.fullmatch(r"How much does (.+?) cost\?", q, re.IGNORECASE)
    if m:
        x = m.group(1)
        return [f"What does {x} cost?", f"What is the price of {x}?", f"How much is {x}?",
                f"Tell me how much {x} costs.", f"{x}: how much does it cost?"]
    m = re.fullmatch(r"How many (.+?) (does|do) (.+?) have\?", q, re.IGNORECASE)
    if m:
        a, _, b = m.groups()
        return [f"What is the number of {a} of {b}?", f"Tell me how many {a} {b} has.",
                f"Could you tell me how many {a} {b} has?", f"{b}: how many {a}?"]
    m = re.fullmatch(r"(What|Who|Where|When|Which|How)\s+(is|are|was|were)\s+(.+?)\?", q, re.IGNORECASE)
    if m:
        wh, verb, rest = m.groups()
        out = [f"Could you tell me {wh.lower()} {rest} {verb.lower()}?", f"Do you know {wh.lower()} {rest} {verb.lower()}?",
               f"Tell me {wh.lower()} {rest} {verb.lower()}."]
        if verb.lower() == "is":
            out.insert(0, f"{wh}'s {rest}?")
        return out
    m = re.fullmatch(r"(Is|Are|Was|Were|Does|Do|Did|Can|Has|Have)\s+(.+?)\?", q, re.IGNORECASE)
    if m:
        return [f"Could you tell me whether this holds: {_lower_first(q)}", f"True or false: {_lower_first(q[:-1])}?",
                f"Do you know: {_lower_first(q)}"]
    return []


def _general(q: str) -> list[str]:
    return [f"Quick question: {q}", f"I'd like to know: {_lower_first(q)}", f"Please answer: {q}"]


def rewrites(question: str) -> list[str]:
    """Rewrites of a question template, most natural first, without repeats or the question itself."""
    q = " ".join(question.split())
    out: list[str] = []
    for candidate in [*(_specific(q) if q.endswith("?") else []), *_general(q)]:
        if candidate != q and candidate not in out:
            out.append(candidate)
    return out
