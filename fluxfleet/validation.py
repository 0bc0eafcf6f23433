"""Checks every item passes, in the producer before enqueueing and again in the worker."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from fluxfleet.errors import ValidationError
from fluxfleet.schema import GenerationParams
from fluxfleet.settings import LimitSettings

_WORDISH = re.compile(r"\w+|[^\w\s]")


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
    """An empty prompt, or one the T5 encoder would cut at ``max_tokens`` (max_sequence_length)."""
    if not prompt or not prompt.strip():
        raise ValidationError("prompt is empty", where=where, field="prompt")
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
