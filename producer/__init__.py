"""The submit side of fluxfleet: the Python client and the command line. Never imports torch."""

from producer.client import Client, Job
from producer.inputs import PromptSpec, read_prompts

__all__ = ["Client", "Job", "PromptSpec", "read_prompts"]
