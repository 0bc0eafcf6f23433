"""Checks every item passes, in the producer before enqueueing and again in the worker.

Numbers from files and from the Python API go through ``as_int``/``as_float``: a value is kept exactly
(an int, or a string or float whose value is a whole number, without a round trip through float) or
refused with where and which field; booleans, fractions of a whole number and non-finite values are
refused.
"""

from __future__ import annotations

import math
import numbers
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

from fluxfleet.errors import ValidationError
from fluxfleet.schema import GenerationParams
from fluxfleet.settings import LimitSettings

_WORDISH = re.compile(r"\w+|[^\w\s]")
_PLAIN_INT = re.compile(r"\s*[+-]?[0-9]+\s*")
_MAX_INT_BITS = 128
"""Whole numbers above 2^128 are refused as too large before any range check prints them: every limit
(seeds up to 2^64-1 included) is far below, and Python cannot print an int of over 4300 digits."""


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error message shows it: strings in quotes, escaped when not printable, shortened."""
    if isinstance(value, str):
        text = f"'{value}'" if value.isprintable() else repr(value)
    elif isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        text = f"an integer of {value.bit_length()} bits"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_int(value: Any, *, where: str = "", field: str = "") -> int:
    """``value`` as an int, exactly, or ``ValidationError`` naming ``where`` and ``field``."""

    def refuse(why: str = "") -> ValidationError:
        return ValidationError(f"{shown(value)} is not a valid int{why}", where=where, field=field)

    if isinstance(value, bool):
        raise refuse(" (a boolean)")
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, str | Decimal):
        number = _decimal_int(value, refuse)
    elif isinstance(value, numbers.Rational):
        if value.denominator != 1:
            raise refuse()
        number = int(value.numerator)
    elif isinstance(value, numbers.Real):
        real = float(value)
        if not math.isfinite(real):
            raise refuse(": not a finite number")
        if not real.is_integer():
            raise refuse()
        number = int(real)
    else:
        raise refuse(f": a {type(value).__name__}, not a number")
    if number.bit_length() > _MAX_INT_BITS:
        raise ValidationError(f"{shown(value)} is too large", where=where, field=field)
    return number


def _decimal_int(value: str | Decimal, refuse: Any) -> int:
    if isinstance(value, str) and _PLAIN_INT.fullmatch(value):
        if len(value) > 60:  # int() of thousands of digits is slow, and every limit has at most 20
            raise refuse(": too large")
        return int(value)
    try:
        number = Decimal(value)
    except (InvalidOperation, ValueError):
        raise refuse() from None
    if not number.is_finite():
        raise refuse(": not a finite number")
    if number.adjusted() > 40:
        raise refuse(": too large")
    if number != number.to_integral_value():
        raise refuse()
    return int(number)


def as_float(value: Any, *, where: str = "", field: str = "") -> float:
    """``value`` as a finite float, or ``ValidationError`` naming ``where`` and ``field``."""

    def refuse(why: str = "") -> ValidationError:
        return ValidationError(f"{shown(value)} is not a valid float{why}", where=where, field=field)

    if isinstance(value, bool):
        raise refuse(" (a boolean)")
    if not isinstance(value, str | numbers.Real | Decimal):
        raise refuse(f": a {type(value).__name__}, not a number")
    try:
        number = float(value)
    except OverflowError:
        raise refuse(": too large") from None
    except ValueError:
        raise refuse() from None
    if not math.isfinite(number):
        raise refuse(": not a finite number")
    return number


@lru_cache(maxsize=8)
def _load_tokenizer(path: str) -> object | None:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(path)


class TokenCounter:
    """Counts T5 tokens with the model's own tokenizer when its files are local; otherwise with a
    conservative estimate (one token per word piece or punctuation mark, plus a margin)."""

    def __init__(self, model_source: str | None = None) -> None:
        self.tokenizer = None
        if model_source:
            candidate = Path(model_source) / "tokenizer_2" / "tokenizer.json"
            if candidate.is_file():
                self.tokenizer = _load_tokenizer(str(candidate))

    def count(self, prompt: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(prompt).ids)  # type: ignore[attr-defined]
        pieces = _WORDISH.findall(prompt)
        # Sentencepiece splits long or rare words into several pieces; 1.3x covers English prose.
        return int(sum(max(1, len(p) // 6 + 1) for p in pieces) * 1.3) + 1


def validate_prompt(prompt: str, max_tokens: int, counter: TokenCounter, where: str = "") -> None:
    """An empty prompt, one that is not text, or one the T5 encoder would cut at ``max_tokens``
    (max_sequence_length)."""
    if not isinstance(prompt, str):
        raise ValidationError(f"prompt must be text, not {type(prompt).__name__}", where=where, field="prompt")
    if not prompt or not prompt.strip():
        raise ValidationError("prompt is empty", where=where, field="prompt")
    # A NUL ends the text in PNG readers (the 'parameters' chunk), so the prompt would not be kept whole.
    if "\x00" in prompt:
        raise ValidationError(
            f"prompt has a NUL character (U+0000) at position {prompt.index(chr(0)) + 1}", where=where, field="prompt"
        )
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValidationError(
            f"prompt has a lone surrogate U+{ord(prompt[e.start]):04X} at position {e.start + 1} (not valid Unicode)",
            where=where,
            field="prompt",
        ) from None
    tokens = counter.count(prompt)
    if tokens > max_tokens:
        raise ValidationError(
            f"prompt is {tokens} tokens, over the limit of {max_tokens} (max_sequence_length)",
            where=where,
            field="prompt",
        )


def validate_params(params: GenerationParams, limits: LimitSettings, where: str = "") -> None:
    for field in ("width", "height"):
        value = getattr(params, field)
        if value % limits.size_multiple:
            raise ValidationError(
                f"{field} {value} is not a multiple of {limits.size_multiple}", where=where, field=field
            )
        if not limits.min_size <= value <= limits.max_size:
            raise ValidationError(
                f"{field} {value} is outside {limits.min_size}..{limits.max_size}", where=where, field=field
            )
    if not 1 <= params.steps <= limits.max_steps:
        raise ValidationError(f"steps {params.steps} is outside 1..{limits.max_steps}", where=where, field="steps")
    if not 0.0 <= params.guidance <= limits.max_guidance:
        raise ValidationError(
            f"guidance {params.guidance} is outside 0..{limits.max_guidance}", where=where, field="guidance"
        )
    if not 1 <= params.max_sequence_length <= limits.max_prompt_tokens:
        raise ValidationError(
            f"max_sequence_length {params.max_sequence_length} is outside 1..{limits.max_prompt_tokens}",
            where=where,
            field="max_sequence_length",
        )
