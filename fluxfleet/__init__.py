"""fluxfleet's contract: job and result schemas, settings, storage keys, queue and metric names.

Shared by the producer and the workers; never imports torch.
"""

from fluxfleet.errors import (
    BackendMissingError,
    BrokerUnavailable,
    ConfigurationError,
    FluxfleetError,
    InputFileError,
    JobError,
    ModelLoadError,
    PermanentStorageError,
    StorageError,
    TransientError,
    UnknownJobError,
    UnknownPresetError,
    ValidationError,
    WorkerError,
)
from fluxfleet.keys import TASK_GENERATE, image_key, item_key, manifest_key, queue_name
from fluxfleet.presets import Preset, load_preset, preset_names
from fluxfleet.schema import GenerationParams, Item, ItemFailure, ItemRecord, JobStatus, TaskPayload, Timings
from fluxfleet.settings import Settings

__all__ = [
    "TASK_GENERATE",
    "BackendMissingError",
    "BrokerUnavailable",
    "ConfigurationError",
    "FluxfleetError",
    "GenerationParams",
    "InputFileError",
    "Item",
    "ItemFailure",
    "ItemRecord",
    "JobError",
    "JobStatus",
    "ModelLoadError",
    "PermanentStorageError",
    "Preset",
    "Settings",
    "StorageError",
    "TaskPayload",
    "Timings",
    "TransientError",
    "UnknownJobError",
    "UnknownPresetError",
    "ValidationError",
    "WorkerError",
    "image_key",
    "item_key",
    "load_preset",
    "manifest_key",
    "preset_names",
    "queue_name",
]
