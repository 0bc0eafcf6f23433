"""Renders every ``FLUXFLEET_*`` setting as an example environment file (``config/fluxfleet.env.example``).

``python -m fluxfleet.envfile > config/fluxfleet.env.example``; a test keeps the file complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, SecretStr

from fluxfleet.settings import REPO_ROOT, Settings


def _line(variable: str, value: object) -> str:
    """``# NAME=default``: commented out, because a set variable would override the preset's own
    defaults (presets sit below the environment); uncomment what you change."""
    if value is None or isinstance(value, SecretStr):
        shown = ""
    elif isinstance(value, bool):
        shown = str(value).lower()
    elif isinstance(value, Path):
        shown = str(value.relative_to(REPO_ROOT)) if value.is_relative_to(REPO_ROOT) else str(value)
    else:
        shown = str(value)
    return f"# {variable}={shown}"


def env_lines() -> Iterator[str]:
    settings = Settings.model_construct()
    yield "# Every fluxfleet setting with its default. Precedence: defaults < preset TOML < environment < CLI flags."
    yield "# Lines are commented out: a set variable overrides the preset; uncomment only what you change."
    for name, field in Settings.model_fields.items():
        default = getattr(settings, name, field.default)
        if isinstance(default, BaseModel):
            yield ""
            yield f"# [{name}] {type(default).__doc__ or ''}".rstrip()
            for sub_name, sub_field in type(default).model_fields.items():
                if sub_field.description:
                    yield f"# {sub_field.description}"
                yield _line(f"FLUXFLEET_{name.upper()}__{sub_name.upper()}", getattr(default, sub_name))
        else:
            yield ""
            if field.description:
                yield f"# {field.description}"
            yield _line(f"FLUXFLEET_{name.upper()}", default)


if __name__ == "__main__":
    print("\n".join(env_lines()))
