"""The packages' ``__all__`` lists exactly the public names they define or re-export."""

from __future__ import annotations

import inspect

import fluxfleet
import producer


def test_all_is_complete_and_importable() -> None:
    for package in (fluxfleet, producer):
        public = {
            name
            for name, value in vars(package).items()
            if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
        }
        assert set(package.__all__) == public, package.__name__
        for name in package.__all__:
            assert getattr(package, name) is not None
