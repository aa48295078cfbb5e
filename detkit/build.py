"""Imports every module that registers components, so that all registries are filled.

Registries are filled by explicit imports here (no folder scanning): a component exists for
``build`` and ``detkit list`` exactly when its module is imported below.
"""

import detkit.analysis.diagnostics_hook  # noqa: F401  (registers HOOKS: DiagnosticsHook, the val pictures)
import detkit.assigners  # noqa: F401,E402  (registers ASSIGNERS)
import detkit.data  # noqa: F401,E402  (registers DATASETS and TRANSFORMS)
import detkit.engine.hooks  # noqa: F401,E402  (registers HOOKS)
import detkit.engine.optim  # noqa: F401,E402  (registers OPTIMIZERS and SCHEDULERS)
import detkit.engine.writers  # noqa: F401,E402  (registers WRITERS)
import detkit.losses  # noqa: F401  (registers LOSSES and WEIGHT_SCHEDULES)
import detkit.models  # noqa: F401,E402  (registers BACKBONES, NECKS, HEADS, DETECTORS)
