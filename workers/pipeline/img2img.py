"""Image-to-image on a loaded pipeline: FLUX's img2img pipeline over the same components, and the inputs.

FluxImg2ImgPipeline is built from the text-to-image pipeline's components and shares every module (no second
copy of the weights, and the speed levers, step cache and compiled transformer apply to both); it is built on
the first image-to-image batch a worker serves and kept. Inputs are read again here, as the producer read them
(``fluxfleet.input_images``), and must still have the content hashed at submit: an input changed or gone since
then fails its item with the reason, and the batch's other items are generated.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from fluxfleet.errors import JobError
from fluxfleet.input_images import decode_image, read_source
from fluxfleet.schema import Item
from fluxfleet.settings import LimitSettings

logger = logging.getLogger(__name__)


class InputsRefused(JobError):
    """Raised by the generate function, before generating, when some items' inputs cannot be used: ``reasons``
    maps each such item's index to why. Those items fail; the engine generates the batch's others."""

    def __init__(self, reasons: dict[int, str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons.values()))


class Img2Img:
    """The image-to-image side of one worker's pipeline."""

    def __init__(self, pipe: Any, storage: Callable[[], Any] | None, limits: LimitSettings) -> None:
        self.pipe = pipe
        self.storage = storage or _no_storage
        self.limits = limits
        self._pipeline: Any = None

    def pipeline(self) -> Any:
        """The img2img pipeline sharing ``pipe``'s components, built once."""
        if self._pipeline is None:
            from diffusers import FluxImg2ImgPipeline

            # What ``from_pipe`` does, less its last step: diffusers 0.42.1's ``from_pipe`` ends with
            # ``.to(dtype=float32)`` unless given one dtype, which would cast the shared modules of a bf16 or
            # quantized pipeline in place.
            self._pipeline = FluxImg2ImgPipeline(**self.pipe.components)
            self._pipeline.set_progress_bar_config(disable=True)
            logger.info("image-to-image pipeline built from the loaded components")
        return self._pipeline

    def inputs(self, batch: list[Item]) -> tuple[list[Any], dict[int, str]]:
        """(each item's input as an RGB image of the item's size, {item index: why its input cannot be used}).
        A source is read and resized once per batch; a transient storage error is raised for the task to retry."""
        images: list[Any] = []
        refused: dict[int, str] = {}
        prepared: dict[tuple[str, str, int, int], Any] = {}
        for item in batch:
            ref, width, height = item.params.image, item.params.width, item.params.height
            assert ref is not None, "an image-to-image batch holds only items with an image"
            key = (ref.source, ref.sha256, width, height)
            if key not in prepared:
                decoded = self._read(ref.source, ref.sha256)
                prepared[key] = decoded if isinstance(decoded, str) else _resized(decoded, width, height)
            image = prepared[key]
            if isinstance(image, str):
                refused[item.index] = image
            else:
                images.append(image)
        return images, refused

    def _read(self, source: str, sha256: str) -> Any:
        """The decoded input, or a sentence saying why it cannot be used."""
        try:
            data = read_source(source, storage=self.storage, limits=self.limits)
        except JobError as e:
            return f"input image cannot be read any more: {e}"
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            return (
                f"input image {source} changed since the job was submitted (sha256 {digest[:12]}, submitted "
                f"{sha256[:12]}); submit the job again to use the new content"
            )
        try:
            return decode_image(data, source, self.limits)
        except JobError as e:
            return str(e)


def _resized(image: Any, width: int, height: int) -> Any:
    from PIL import Image

    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _no_storage() -> Any:
    return None
