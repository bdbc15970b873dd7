"""mir_lightning: the Modality Integration Rate (MIR) of vision-language models, while they train.

Public API:

* :class:`ModalityIntegrationRate` -- streaming torchmetrics metric.
* :class:`MIRCallback` -- Lightning callback: capture hidden states in validation, log MIR.
* :class:`MIREarlyStopping` -- stop pre-training when MIR has plateaued.
* :mod:`mir_lightning.functional` -- pure functions (``frechet_distance``,
  ``modality_integration_rate``).
"""

from mir_lightning import functional
from mir_lightning.metric import ModalityIntegrationRate

__all__ = ["MIRCallback", "MIREarlyStopping", "ModalityIntegrationRate", "functional"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the metric must not import Lightning
    if name == "MIRCallback":
        from mir_lightning.callback import MIRCallback

        return MIRCallback
    if name == "MIREarlyStopping":
        from mir_lightning.early_stopping import MIREarlyStopping

        return MIREarlyStopping
    raise AttributeError(f"module 'mir_lightning' has no attribute {name!r}")
