"""Errors of fluxfleet, arranged by what the queue should do with them.

    FluxfleetError
    ├── JobError            invalid input: fail the item, never retry
    │   ├── InputFileError      a prompts file line is malformed (names file, line, field)
    │   ├── ValidationError     a parameter is out of range
    │   ├── UnknownPresetError  no preset of that name (lists the known ones)
    │   └── UnknownJobError     no job of that id (a typo, or a job Redis and storage both lost)
    ├── TransientError      storage or broker hiccups, GPU out of memory: retry with backoff
    │   ├── StorageError
    │   └── BrokerUnavailable   Redis cannot be reached
    ├── PermanentStorageError   storage refuses for good (no space, read-only, a link, access denied,
    │                           no such bucket): fail the item at once with the reason, never retry
    └── WorkerError         the worker cannot serve: stop taking work
        ├── ConfigurationError  settings that contradict each other
        ├── ModelLoadError      the preset's model cannot be loaded
        └── BackendMissingError a quantization backend's package is not installed

Every class says when it is raised; context travels as attributes, causes with ``raise ... from``.
"""

from __future__ import annotations


class FluxfleetError(Exception):
    """Base of every error fluxfleet raises on purpose."""


class JobError(FluxfleetError):
    """Raised when a request itself is wrong; retrying cannot help."""


class ValidationError(JobError):
    """Raised when a generation parameter or prompt breaks a limit.

    ``where`` names the place (``prompts.csv:12``) and ``field`` the parameter.
    """

    def __init__(self, message: str, *, where: str = "", field: str = "") -> None:
        self.where = where
        self.field = field
        prefix = f"{where}: " if where else ""
        suffix = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")


class InputFileError(ValidationError):
    """Raised when a prompts file cannot be read or one of its lines is malformed."""


class UnknownPresetError(JobError):
    """Raised when a preset name matches no file in the presets directory."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown preset '{name}'; known presets: {', '.join(known) or '(none)'}")


class UnknownJobError(JobError):
    """Raised when a job id names no job: nothing was recorded under it."""

    def __init__(self, job_id: str, detail: str = "") -> None:
        self.job_id = job_id
        super().__init__(f"no job '{job_id}'" + (f": {detail}" if detail else ""))


class TransientError(FluxfleetError):
    """Raised when an operation may succeed if tried again later."""


class StorageError(TransientError):
    """Raised when the object store fails or cannot be reached."""


class PermanentStorageError(FluxfleetError):
    """Raised when storage refuses an operation for a reason retrying cannot fix.

    No space left, a read-only file system, a key or a symbolic link that leads outside the storage
    root, missing or wrong credentials, a bucket that does not exist. The message names the path or
    object and the cause; ``fluxfleet.retry`` decides which faults are permanent.
    """


class BrokerUnavailable(TransientError):
    """Raised when Redis cannot be reached; nothing was submitted."""


class WorkerError(FluxfleetError):
    """Raised when a worker cannot serve its preset; it must stop taking work."""


class ConfigurationError(WorkerError):
    """Raised when settings contradict each other; names the setting to change."""


class ModelLoadError(WorkerError):
    """Raised when the preset's model cannot be found or loaded."""


class BackendMissingError(WorkerError):
    """Raised when a preset needs a package that is not installed; names the extra to install."""

    def __init__(self, backend: str, package: str, extra: str) -> None:
        self.backend = backend
        self.package = package
        self.extra = extra
        super().__init__(
            f"backend '{backend}' needs the package '{package}', which is not installed. "
            f"Run `pip install 'fluxfleet[{extra}]'`"
        )
