"""The package's layers: old import paths the README documents are the moved modules."""

from __future__ import annotations

import importlib

import pytest

# old path -> the module it now names
MOVED = {
    "mir_lightning.callback": "mir_lightning.adapters.lightning",
    "mir_lightning.early_stopping": "mir_lightning.adapters.early_stopping",
    "mir_lightning.integrations.hf_trainer": "mir_lightning.adapters.hf_trainer",
    "mir_lightning.integrations.transformers": "mir_lightning.models.transformers",
    "mir_lightning.integrations.llava": "mir_lightning.models.llava",
}


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_import_paths_are_the_moved_modules(old: str, new: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)


def test_documented_names_import_from_old_and_new_paths() -> None:
    from mir_lightning.adapters.hf_trainer import MIRTrainerCallback
    from mir_lightning.callback import MIRCallback
    from mir_lightning.early_stopping import MIREarlyStopping
    from mir_lightning.integrations import hf_trainer
    from mir_lightning.integrations.llava import llava_mask_fn
    from mir_lightning.integrations.transformers import build_masks, find_hidden_state_modules

    import mir_lightning

    assert hf_trainer.MIRTrainerCallback is MIRTrainerCallback
    assert mir_lightning.MIRCallback is MIRCallback
    assert mir_lightning.MIREarlyStopping is MIREarlyStopping
    assert mir_lightning.build_masks is build_masks
    assert mir_lightning.find_hidden_state_modules is find_hidden_state_modules
    assert callable(llava_mask_fn)
    from mir_lightning.probe import Measurement, MIRResult  # the engine's names stay importable from probe

    assert Measurement.__module__ == "mir_lightning.measurement" and MIRResult.__module__ == "mir_lightning.measurement"
