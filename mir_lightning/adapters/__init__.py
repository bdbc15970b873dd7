"""Trainer adapters: when to run the probe and where to log its result.

* :mod:`mir_lightning.adapters.lightning` -- ``MIRCallback`` (Lightning).
* :mod:`mir_lightning.adapters.early_stopping` -- ``MIREarlyStopping`` (Lightning).
* :mod:`mir_lightning.adapters.hf_trainer` -- ``MIRTrainerCallback`` (Hugging Face Trainer).

Each sits above the engine (:mod:`mir_lightning.probe`); nothing below imports them.
"""
