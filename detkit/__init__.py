"""detkit: a config-driven object-detector training framework.

``detkit.load_detector(checkpoint).predict(images)`` is the Python API (see :mod:`detkit.api`).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_detector", "DetectorModel", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load_detector", "DetectorModel"):
        # lazy: detkit.api imports torch; ``import detkit`` and ``detkit --help`` stay light
        from detkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'detkit' has no attribute {name!r}")
