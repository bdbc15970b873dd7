"""mir_lightning: the Modality Integration Rate (MIR) of vision-language models, while they train.

Public API:

* :class:`ModalityIntegrationRate` -- streaming torchmetrics metric.
* :class:`MIRProbe` / :class:`MIRResult` -- the probe engine every trainer adapter uses:
  run a fixed probe set through a model and measure MIR (any training loop).
* :class:`MIRCallback` -- Lightning callback (validation runs or every N training steps).
* :class:`MIREarlyStopping` -- stop Lightning pre-training when MIR has plateaued.
* :class:`MIRPlateau` -- the plateau rule itself (shared by every adapter).
* :class:`MoCa` -- the paper's modality calibration, attached to an unmodified HF VLM.
* :mod:`mir_lightning.adapters.hf_trainer` -- ``MIRTrainerCallback`` for the HF Trainer.
* :func:`paper_probe` -- the paper's probe protocol (unrelated image + text samples, as
  ``mir-lightning evaluate`` uses) as a loader for every adapter.
* :func:`build_masks`, :func:`find_hidden_state_modules` -- vision/text masks from input
  ids, and the LLM's per-layer modules of a Hugging Face model.
* :mod:`mir_lightning.functional` -- pure functions (``frechet_distance``,
  ``modality_integration_rate``).

Importing the package does not import Lightning or transformers: the names above load
their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from mir_lightning import functional
from mir_lightning.metric import ModalityIntegrationRate
from mir_lightning.plateau import MIRPlateau

__version__ = "0.1.0"

# name -> module that defines it (imported on first access: Lightning, transformers are heavy)
_LAZY = {
    "FailureKind": "mir_lightning.measurement",
    "MIRCallback": "mir_lightning.adapters.lightning",
    "MIREarlyStopping": "mir_lightning.adapters.early_stopping",
    "MIRProbe": "mir_lightning.probe",
    "MIRResult": "mir_lightning.probe",
    "MoCa": "mir_lightning.moca",
    "build_masks": "mir_lightning.models.transformers",
    "find_hidden_state_modules": "mir_lightning.models.transformers",
    "paper_probe": "mir_lightning.probe_data",
}

__all__ = ["MIRPlateau", "ModalityIntegrationRate", "functional", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mir_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
