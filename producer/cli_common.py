"""What every command module of the CLI shares: the typer app they register on, the consoles, and how a
failure is printed. Its own module so that ``producer.cli`` can import the command modules and they can
import this, without either importing the other."""

from __future__ import annotations

import typer
from rich.console import Console

from fluxfleet.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Distributed batch text-to-image generation.")
console = Console()
err = Console(stderr=True)


def _plain(value: object) -> str:
    """``value`` as text rich prints as it is: brackets in it are not read as markup ('[lost]' stays).

    Put it last or before plain text: a final backslash stays single, where ``escape`` alone would double
    it (so it cannot escape a tag after it) and rich would then print both.
    """
    from rich.markup import escape

    return escape(f"{value}.")[:-1]


def _fail(e: BaseException, code: int = 1, settings: Settings | None = None) -> typer.Exit:
    """Print ``e`` as one sentence on stderr (secrets masked; a Redis failure names the broker and the
    setting to check) and return the exit to raise."""
    from fluxfleet.broker import broker_error, is_broker_failure
    from fluxfleet.redaction import environment_secrets, redact

    message = str(e)
    try:
        settings = settings or Settings()
        if is_broker_failure(e):
            message = str(broker_error(e, settings.broker))
        secrets = [*environment_secrets(), *settings.secret_values()]
    except Exception:  # settings that do not even load: mask what the environment marks as secret
        secrets = environment_secrets()
    err.print(f"[red]error:[/red] {_plain(redact(message, secrets))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
