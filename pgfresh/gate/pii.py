"""Personal data: configured columns dropped or masked, and detectors that mask PII in free text.

Detectors (on by default, `pii.detect = false` turns them off): e-mail addresses, card-like
numbers (13 to 19 digits passing the Luhn check) and phone numbers (7 to 15 digits written as a
phone number: a leading `+` or `(`, groups split by spaces, dots or dashes, a trunk prefix `0`,
or a bare run of 10 to 15 digits). Dates (2024-01-15), times (with their fractional seconds), prices, IP addresses and short
codes do not match.
Each match becomes a fixed token (`[email]`, `[card]`, `[phone]`), so masking is deterministic
and idempotent (masking a masked row changes nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(
    r"(?<![\w+(:-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,3}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}"
    r"|\d{3}[ .-]\d{4}"
    r"|0\d{1,4}[ /.-]\d{5,8}"
    r"|\d{10,15})(?![\w-])"
)
MASKED = "[redacted]"


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[card]" if _luhn(digits) else m.group(0)


def _phone(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[phone]" if 7 <= len(digits) <= 15 else m.group(0)


def mask_text(text: str) -> tuple[str, int]:
    """(masked text, number of masks applied)."""
    n = 0
    for pattern, repl in ((EMAIL, lambda m: "[email]"), (CARD, _card), (PHONE, _phone)):
        def counting(m, repl=repl):
            nonlocal n
            out = repl(m)
            n += out != m.group(0)
            return out

        text = pattern.sub(counting, text)
    return text, n


def _mask_value(value) -> tuple[object, int]:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, list):
        pairs = [_mask_value(v) for v in value]
        return [v for v, _ in pairs], sum(n for _, n in pairs)
    if isinstance(value, dict):
        pairs = {k: _mask_value(v) for k, v in value.items()}
        return {k: v for k, (v, _) in pairs.items()}, sum(n for _, n in pairs.values())
    return value, 0


@dataclass
class Pii:
    """What to do with personal data in one table's rows, for one path."""

    drop: list[str] = field(default_factory=list)  # columns removed before anything is rendered
    mask: list[str] = field(default_factory=list)  # columns whose value is replaced by [redacted]
    detect: bool = True  # mask e-mail addresses, phone and card numbers in every other text value
    keep: list[str] = field(default_factory=list)  # columns never scanned (keys, codes)

    def apply(self, row: dict) -> tuple[dict, int]:
        """(row safe to render, number of values dropped or masked)."""
        out, n = {}, 0
        for col, value in row.items():
            if col in self.drop:
                n += 1
            elif col in self.mask:
                out[col] = None if value is None else MASKED
                n += value is not None
            elif self.detect and col not in self.keep:
                out[col], k = _mask_value(value)
                n += k
            else:
                out[col] = value
        return out, n
