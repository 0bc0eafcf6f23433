"""Settings from the environment: one prefix, ``FLUXFLEET_``, nested with ``__``.

Usage::

    settings = Settings()                      # reads FLUXFLEET_* from the environment
    settings.broker.url                        # FLUXFLEET_BROKER__URL
    settings.worker.task_time_limit_s          # FLUXFLEET_WORKER__TASK_TIME_LIMIT_S

Precedence, lowest first: these defaults < the preset's TOML < environment < command-line flags.
Nothing is read at import time: entrypoints build ``Settings()`` once and pass it down.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from fluxfleet.caching import parse_policy
from fluxfleet.errors import ConfigurationError, ValidationError
from fluxfleet.redaction import redact_url

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESETS_DIR = REPO_ROOT / "config" / "presets"


def default_presets_dir() -> Path:
    """``config/presets`` of this checkout (or editable install); for a package installed from a wheel,
    the copy pip put under ``<prefix>/share/fluxfleet/presets`` (found through the package's file list,
    so user and virtualenv installs alike)."""
    if DEFAULT_PRESETS_DIR.is_dir():
        return DEFAULT_PRESETS_DIR
    from importlib import metadata

    try:
        files = metadata.files("fluxfleet") or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.parts[-3:-1] == ("fluxfleet", "presets") and file.suffix == ".toml":
            return Path(str(file.locate())).parent.resolve()
    return DEFAULT_PRESETS_DIR  # absent either way: an unknown preset then names this directory


class BrokerSettings(BaseModel):
    """Where Redis is and how long an unacknowledged task may stay out."""

    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    visibility_timeout_s: int = Field(3600, gt=0, description="seconds before an unacked task is re-queued")
    restore_interval_s: float = Field(
        10.0, gt=0, description="seconds between sweeps that re-queue overdue unacked tasks"
    )
    connect_timeout_s: float = Field(3.0, gt=0, description="seconds to wait for Redis before giving up")
    key_prefix: str = "fluxfleet"
    tls_ca_file: Path | None = Field(
        None, description="CA bundle that signed the Redis server's certificate (rediss://); system CAs when unset"
    )

    @field_validator("tls_ca_file", mode="before")
    @classmethod
    def _empty_ca_file_is_unset(cls, value: Any) -> Any:
        # An empty FLUXFLEET_BROKER__TLS_CA_FILE (a template's blank line) means unset, not Path("") == ".".
        return None if isinstance(value, str) and not value.strip() else value

    def tls_options(self) -> dict[str, Any]:
        """Certificate checks for ``rediss://`` (always verified), as redis-py and kombu name them."""
        if not self.url.startswith("rediss://"):
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": "required"}
        if self.tls_ca_file is not None:
            if not self.tls_ca_file.is_file():
                raise ConfigurationError(
                    f"FLUXFLEET_BROKER__TLS_CA_FILE ({self.tls_ca_file}) is not a file; name the CA bundle "
                    "(PEM) that signed the Redis server's certificate, or unset it to use the system CAs"
                )
            options["ssl_ca_certs"] = str(self.tls_ca_file)
        return options

    def display_url(self) -> str:
        """The URL for messages and files: a password inside it masked (``password`` is never in it)."""
        return redact_url(self.url)

    def url_with_password(self) -> str:
        """The broker URL with ``password`` spliced in (a password already in the URL wins)."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(
                f"FLUXFLEET_BROKER__URL must start with redis:// or rediss://, got '{parts.scheme}://'"
            )
        if self.password is None or parts.password:
            return self.url
        host = parts.hostname or "127.0.0.1"
        netloc = f":{quote(self.password.get_secret_value(), safe='')}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class StorageSettings(BaseModel):
    """Where images and manifests go: ``file:///path`` or ``s3://bucket/prefix``."""

    url: str = "file://./outputs"
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. MinIO")
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    max_attempts: int = Field(8, ge=1, description="boto3 standard-mode attempts per request")
    upload_threads: int = Field(4, ge=1, description="background threads encoding and uploading images")


class WorkerSettings(BaseModel):
    """How a worker process runs its tasks."""

    task_time_limit_s: int = Field(1800, gt=0, description="hard limit per task, seconds")
    task_soft_time_limit_s: int = Field(1700, gt=0, description="soft limit per task, seconds")
    max_attempts: int = Field(3, ge=1, description="times one task may start before its items fail")
    load_timeout_s: int = Field(3600, gt=0, description="seconds allowed for loading and warming the model")
    warmup: bool = True
    metrics_port: int = Field(0, ge=0, description="Prometheus port; 0 turns the endpoint off")
    metrics_address: str = Field("127.0.0.1", description="address the metrics endpoint binds to (loopback by default)")
    gpu: str = Field("0", description="GPU index (or comma-separated indices) this worker owns")
    device: str = Field("auto", description="'auto' (cuda when present), 'cuda' or 'cpu'")
    max_rss_bytes: int = Field(
        0, ge=0, description="host RSS of the pool child above which it is replaced between tasks; 0: no limit"
    )
    max_gpu_reserved_bytes: int = Field(
        0, ge=0, description="GPU reserved bytes above which the pool child is replaced between tasks; 0: no limit"
    )
    ready_file: Path | None = Field(
        None, description="written once the pipeline is loaded and warm (a Kubernetes readiness probe checks it)"
    )


class LimitSettings(BaseModel):
    """Bounds the producer and the worker both enforce on every item."""

    min_size: int = 64
    max_size: int = 2048
    size_multiple: int = 16
    max_steps: int = 150
    max_guidance: float = 30.0
    max_prompt_tokens: int = 512
    max_images_per_prompt: int = 16
    max_prompt_chars: int = Field(4000, gt=0, description="characters in one prompt")
    max_images_per_job: int = Field(100_000, gt=0, description="items in one job")
    max_payload_bytes: int = Field(4_000_000, gt=0, description="bytes of one task message's JSON body")
    max_input_image_bytes: int = Field(
        32 * 2**20, gt=0, description="bytes of one image-to-image input file, object or download"
    )
    max_input_image_pixels: int = Field(
        4096 * 4096, gt=0, description="width x height of one image-to-image input, checked before it is decoded"
    )
    input_image_timeout_s: float = Field(
        20.0, gt=0, allow_inf_nan=False, description="seconds one http(s) read of an input image may take in all"
    )


class GenerationDefaults(BaseModel):
    """Job-level defaults; a preset overrides them, the environment and flags override the preset."""

    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    max_sequence_length: int = 512
    cache: str = Field("none", description="step caching policy (fluxfleet.caching): none, magcache, fbcache, ...")

    @field_validator("cache")
    @classmethod
    def _a_cache_policy(cls, value: str) -> str:
        # Checked here, kept as written (a setting keeps its text); items carry the canonical form.
        try:
            parse_policy(value)
            return value
        except ValidationError as e:
            raise ValueError(e.args[0] if e.args else str(e)) from None


class WebhookSettings(BaseModel):
    """Completion webhooks: how workers sign and send the POST a job's ``webhook`` URL receives."""

    secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of X-Fluxfleet-Signature; a job with a webhook is refused while unset"
    )
    timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False, description="seconds one delivery attempt may wait")
    give_up_after_s: float = Field(
        3600.0, gt=0, allow_inf_nan=False, description="seconds after the job ends that deliveries stop being retried"
    )
    max_backoff_s: float = Field(60.0, gt=0, allow_inf_nan=False, description="longest wait between two attempts")
    poll_interval_s: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="seconds a worker waits between looks for due deliveries"
    )


class AdapterSettings(BaseModel):
    """LoRA adapters on a worker: a local cache of adapter files, and how many stay loaded in the pipeline."""

    cache_dir: Path = Field(
        Path("~/.cache/fluxfleet/adapters"), description="where a worker keeps fetched adapter files, by sha256"
    )
    cache_bytes: int = Field(
        8 * 2**30, gt=0, description="bytes of adapter files kept; the least recently used go first"
    )
    max_loaded: int = Field(8, ge=4, le=64, description="adapters kept loaded in the pipeline (an item uses up to 4)")


class Settings(BaseSettings):
    """Every setting of fluxfleet; see ``config/fluxfleet.env.example`` for the full list."""

    model_config = SettingsConfigDict(env_prefix="FLUXFLEET_", env_nested_delimiter="__", extra="ignore", env_file=None)

    broker: BrokerSettings = BrokerSettings()
    storage: StorageSettings = StorageSettings()
    worker: WorkerSettings = WorkerSettings()
    limits: LimitSettings = LimitSettings()
    defaults: GenerationDefaults = GenerationDefaults()
    webhook: WebhookSettings = WebhookSettings()
    adapters: AdapterSettings = AdapterSettings()
    presets_dir: Path = Field(default_factory=default_presets_dir)
    model_dir: Path | None = Field(
        None, description="overrides every preset's model source (e.g. the tiny model's directory)"
    )

    def __init__(self, **values: Any) -> None:
        """Read the environment; a malformed or misspelt ``FLUXFLEET_*`` variable is a ConfigurationError
        naming it, never a pydantic traceback or a silently ignored value."""
        check_setting_names(os.environ)
        try:
            super().__init__(**values)
        except PydanticValidationError as e:
            raise ConfigurationError(describe_invalid(e)) from None
        except SettingsError as e:  # a whole section given as JSON (FLUXFLEET_BROKER='{...}') that does not parse
            raise ConfigurationError(f"a FLUXFLEET_* variable could not be read: {e}") from None

    def secret_values(self) -> list[str]:
        """The secrets these settings hold (for ``fluxfleet.redaction.redact``): never print these."""
        secrets = (self.broker.password, self.storage.secret_access_key, self.webhook.secret)
        values = [s.get_secret_value() for s in secrets if s]
        url_password = urlsplit(self.broker.url).password
        return values + ([url_password] if url_password else [])

    def with_overrides(self, **dotted: Any) -> Settings:
        """A copy with ``section__field=value`` overrides from command-line flags (None is ignored).

        Only explicitly set fields are carried over, so later layers can still tell what was set.
        """
        updates: dict[str, Any] = {}
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, field = key.partition("__")
            if not field:
                updates[section] = value
                continue
            current = updates.get(section, getattr(self, section))
            explicit = current.model_dump(include=current.model_fields_set)
            updates[section] = type(current).model_validate({**explicit, field: value})
        return self.model_copy(update=updates)


def check_time_limits(settings: Settings) -> None:
    """Refuse settings under which a long task would be delivered twice.

    Redis re-queues a message whose task has not finished within the visibility timeout, so a
    task allowed to run longer would run again, concurrently, on another worker.
    """
    worker, broker = settings.worker, settings.broker
    if worker.task_soft_time_limit_s >= worker.task_time_limit_s:
        raise ConfigurationError(
            f"FLUXFLEET_WORKER__TASK_SOFT_TIME_LIMIT_S ({worker.task_soft_time_limit_s}) must be below "
            f"FLUXFLEET_WORKER__TASK_TIME_LIMIT_S ({worker.task_time_limit_s})"
        )
    if broker.visibility_timeout_s <= worker.task_time_limit_s:
        raise ConfigurationError(
            f"FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S ({broker.visibility_timeout_s}) must exceed "
            f"FLUXFLEET_WORKER__TASK_TIME_LIMIT_S ({worker.task_time_limit_s}); raise the first or "
            "lower the second, or a long task is delivered to a second worker while it still runs"
        )


ENV_PREFIX = "FLUXFLEET_"
NOT_SETTINGS = frozenset(
    {
        "FLUXFLEET_LOGLEVEL",  # the worker's log level (workers.main)
        "FLUXFLEET_COMPILE_CACHE_DIR",  # overrides a preset's compile cache directory (workers.speed.compile_cache)
        "FLUXFLEET_TEST_FAULTS",  # fault injection in the test suite (workers.service.faults)
        "FLUXFLEET_TEST_MODEL_CACHE",  # the test suite's tiny model directory
        "FLUXFLEET_UP_TEST_TOKEN",  # marks the processes a test of `fluxfleet up` started
        "FLUXFLEET_APT_GET",  # scripts/bootstrap
        "FLUXFLEET_TORCH_INDEX",  # scripts/bootstrap
    }
)
"""``FLUXFLEET_*`` variables read outside the settings: neither refused nor suggested."""


def setting_names() -> list[str]:
    """Every ``FLUXFLEET_*`` variable the settings read, e.g. ``FLUXFLEET_WORKER__TASK_TIME_LIMIT_S``."""
    names = []
    for section, field in Settings.model_fields.items():
        names.append(f"{ENV_PREFIX}{section.upper()}")
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names += [f"{ENV_PREFIX}{section.upper()}__{name.upper()}" for name in nested.model_fields]
    return names


def check_setting_names(environ: Mapping[str, str]) -> None:
    """Refuse a ``FLUXFLEET_*`` variable that looks like a setting but is none (a typo would otherwise be
    ignored and its default used). Names unlike any setting pass: a Kubernetes Service called
    ``fluxfleet`` injects ``FLUXFLEET_PORT``, ``FLUXFLEET_SERVICE_HOST`` and the like."""
    known = setting_names()
    sections = {name.split("__")[0] for name in known if "__" in name}
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        # Compared without the prefix, which every name shares.
        suffixes = [k.removeprefix(ENV_PREFIX) for k in known]
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.8)
        if upper.split("__")[0] in sections or close:
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            raise ConfigurationError(f"{name} is not a setting{hint}; config/fluxfleet.env.example lists every setting")


def describe_invalid(error: PydanticValidationError) -> str:
    """One sentence per invalid setting, naming its variable; secrets' values are never repeated."""
    problems = []
    for detail in error.errors():
        loc = [str(part) for part in detail["loc"]]
        name = ENV_PREFIX + "__".join(part.upper() for part in loc)
        secret = any(word in name for word in ("PASSWORD", "SECRET", "KEY_ID"))
        value = detail.get("input")
        shown = "" if secret or isinstance(value, dict) else f", got {str(value)[:80]!r}"
        problems.append(f"{name}: {detail['msg']}{shown}")
    return "; ".join(problems)
