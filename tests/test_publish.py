"""The adapter core (mir_lightning/publish.py) and the adapters' shared constructor arguments.

Values are checked against hand-built expectations (the tag spelling the README documents,
plain dicts of the result's numbers), never against the code under test.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from mir_lightning import MIRCallback, MIRPlateau, MIRProbe
from mir_lightning.adapters.hf_trainer import MIRTrainerCallback
from mir_lightning.measurement import MIRResult
from mir_lightning.metric import STAT_KEYS
from mir_lightning.publish import MIRHistoryEntry, MIRPublisher, MIRTags

README = Path(__file__).resolve().parents[1] / "README.md"
ADAPTERS = {"MIRCallback": MIRCallback, "MIRTrainerCallback": MIRTrainerCallback, "MIRProbe": MIRProbe}
# one meaning, names seen for it: each adapter may use only the first (the others are deprecated aliases)
SYNONYMS = [("probe_step", "step"), ("every_n_steps", "every_n_train_steps"), ("probe_dataloader", "probe_loader")]


def result(mir: float = 0.5, layers=(0, 2, 5), error: str | None = None) -> MIRResult:
    stats = {key: torch.arange(len(layers), dtype=torch.float64) + 0.25 * i for i, key in enumerate(STAT_KEYS)}
    return MIRResult(mir=mir, per_layer_fd=stats["fd"].clone(), stats=stats, layers=list(layers), n_vision=10,
                     n_text=12, forwards=2, seconds=0.1, error=error)


def parameters(cls) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


# ------------------------------------------------------------------ the core
def test_tags_use_the_models_layer_ids_and_the_name():
    published = MIRPublisher("mir_probe", ("fd",)).publish(7, result(layers=(0, 2, 5)))
    assert published.scalars == {"mir_probe": 0.5, "mir_probe_fd/layer_00": 0.0, "mir_probe_fd/layer_02": 1.0,
                                 "mir_probe_fd/layer_05": 2.0}
    assert MIRTags("mir").per_layer_figure == "mir/per_layer" and MIRTags("x").history_figure == "x/history"


def test_a_failure_publishes_nan_alone():
    published = MIRPublisher().publish(3, result(mir=math.nan, error="boom"))
    assert list(published.scalars) == ["mir"] and math.isnan(published.scalars["mir"])
    assert published.entry.error == "boom" and published.entry.stats == {}


def test_unknown_stats_and_bad_names_are_refused_at_construction():
    # before: MIRCallback raised KeyError inside _publish at the first measurement
    with pytest.raises(ValueError, match="log_layer_stats"):
        MIRCallback(log_layer_stats=("fd", "fdd"))
    with pytest.raises(ValueError, match="log_layer_stats"):
        MIRTrainerCallback([], 10, log_layer_stats=("fdd",))
    with pytest.raises(ValueError, match="name"):
        MIRPublisher("")
    with pytest.raises(TypeError, match="MIRPlateau"):
        MIRCallback(early_stopping=3)


def test_history_entry_is_typed_readable_as_before_and_checkpoint_safe():
    publisher = MIRPublisher()
    entry = publisher.publish(4, result(layers=(1, 3))).entry
    assert isinstance(entry, MIRHistoryEntry)
    assert (entry.step, entry.mir, entry.layers) == (4, 0.5, [1, 3])
    # the former dict view: step, mir, layers and the per-layer lists at the top level
    assert entry["step"] == 4 and entry["layers"] == [1, 3] and entry["fd"] == [0.0, 1.0]
    assert "norm_ratio" in entry and set(dict(entry)) == {"step", "mir", "layers", *STAT_KEYS}
    saved = publisher.state_dict()
    torch.save(saved, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    restored = MIRPublisher()
    restored.load_state_dict(torch.load(buffer, weights_only=True))  # plain types only
    assert restored.history == [entry]
    # an untyped entry of an older checkpoint
    old = {"step": 2, "mir": 0.25, "layers": [0, 1], "fd": [1.0, 2.0], "norm_ratio": [0.5, 0.6]}
    assert MIRHistoryEntry.from_dict(old).stats == {"fd": [1.0, 2.0], "norm_ratio": [0.5, 0.6]}


def test_a_measurement_again_at_an_earlier_step_replaces_the_later_entries():
    publisher = MIRPublisher()
    for step in (2, 4, 6):
        publisher.publish(step, result())
    publisher.publish(4, result(mir=0.7))  # a resumed run measuring step 4 again
    assert [(h.step, h.mir) for h in publisher.history] == [(2, 0.5), (4, 0.7)]


def test_plateau_decision_and_its_resume():
    publisher = MIRPublisher(early_stopping=MIRPlateau(patience=2, min_delta=0.05))
    decisions = [publisher.publish(s, result(mir=v)).stop for s, v in enumerate((3.0, 2.0, 2.01, 2.02), 1)]
    assert decisions == [False, False, False, True]
    fresh = MIRPublisher(early_stopping=MIRPlateau(patience=2, min_delta=0.05))
    fresh.load_state_dict(publisher.state_dict())  # replayed from the history
    assert fresh.early_stopping.recent == pytest.approx([2.0, 2.01, 2.02], abs=1e-6)
    assert fresh.publish(5, result(mir=2.03)).stop


def test_figures_go_to_every_writer_once_and_are_closed():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    class Writer:
        def __init__(self):
            self.tags = []

        def add_figure(self, tag, figure, global_step, close):
            self.tags.append((tag, global_step))

    publisher = MIRPublisher()
    writers = [Writer(), Writer()]
    open_before = set(plt.get_fignums())  # other tests' figures may still be open in this process
    for step in (1, 2):
        publisher.write_figures(publisher.publish(step, result()).entry, writers, prefix="train/")
    assert writers[0].tags == writers[1].tags == [("train/mir/per_layer", 1), ("train/mir/history", 1),
                                                  ("train/mir/per_layer", 2), ("train/mir/history", 2)]
    assert set(plt.get_fignums()) == open_before
    class Broken(Writer):
        def add_figure(self, *args, **kwargs):
            raise OSError("disk full")

    failing = MIRPublisher(owner="MIRTest")
    with pytest.warns(UserWarning, match="MIRTest: figures skipped .*disk full") as caught:
        for step in (1, 2):  # training goes on; one warning for the run
            failing.write_figures(failing.publish(step, result()).entry, [Broken()])
    assert sum("figures skipped" in str(w.message) for w in caught) == 1
    assert set(plt.get_fignums()) == open_before
    off = MIRPublisher(log_figures=False)
    off.write_figures(off.publish(1, result()).entry, writers)
    assert len(writers[0].tags) == 4


# ------------------------------------------------------------------ one name per meaning
def test_shared_arguments_have_one_name_and_one_default():
    signatures = {name: parameters(cls) for name, cls in ADAPTERS.items()}
    shared = {arg for params in signatures.values() for arg in params
              if sum(arg in other for other in signatures.values()) >= 2}
    assert {"probe_dataloader", "probe_step", "layers", "masks", "image_token_id", "layer_indices", "text_tokens",
            "hidden_size", "every_n_steps", "name", "log_layer_stats", "log_figures", "early_stopping"} <= shared
    for arg in shared:
        # (a required argument has no default: MIRCallback's probe set is optional, the others' not)
        defaults = {name: params[arg].default for name, params in signatures.items()
                    if arg in params and params[arg].default is not inspect.Parameter.empty}
        assert len({repr(d) for d in defaults.values()}) == 1, (arg, defaults)
    for preferred, *former in SYNONYMS:
        for name, params in signatures.items():
            assert not set(former) & set(params), f"{name} still names {former} (one name: {preferred})"
    # what the callbacks share with each other: everything but the trigger specific to each trainer
    both = set(signatures["MIRCallback"]) & set(signatures["MIRTrainerCallback"])
    assert {"name", "log_layer_stats", "log_figures", "early_stopping", "every_n_steps", "probe_step"} <= both


def test_readme_table_lists_every_shared_argument():
    text = README.read_text()
    table = text[text.index("| argument | MIRProbe | MIRCallback | MIRTrainerCallback |"):]
    table = table[: table.index("\n\n")]
    rows = {re.match(r"\| `(\w+)`", line).group(1): line for line in table.splitlines()[2:]}
    for name, cls in ADAPTERS.items():
        column = ["MIRProbe", "MIRCallback", "MIRTrainerCallback"].index(name) + 2  # after "|" and the argument
        for arg, row in rows.items():
            cell = row.split("|")[column].strip()
            assert (arg in parameters(cls)) == (cell == "yes"), (arg, name, cell)
    shared = {arg for cls in ADAPTERS.values() for arg in parameters(cls)
              if sum(arg in parameters(other) for other in ADAPTERS.values()) >= 2}
    assert shared <= set(rows)


def test_former_names_are_deprecated_aliases():
    def step(model, batch):
        return model(**batch)

    with pytest.warns(DeprecationWarning, match="every_n_steps"):
        callback = MIRCallback(probe_dataloader=[{}], every_n_train_steps=3)
    assert callback.every_n_steps == 3 and callback.every_n_train_steps == 3
    with pytest.warns(DeprecationWarning, match="probe_step"):
        assert MIRProbe([{}], step=step).probe_step is step
    with pytest.warns(DeprecationWarning, match="probe_step"):
        assert MIRTrainerCallback([{}], 10, step=step).probe.probe_step is step
    with pytest.raises(TypeError, match="former name"):
        MIRProbe([{}], step=step, probe_step=step)


def test_the_hf_callback_takes_name_and_log_figures():
    callback = MIRTrainerCallback([{}], 10, name="mir_probe", log_figures=False)
    assert callback.name == "mir_probe" and callback.publisher.log_figures is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names warn nothing
        MIRTrainerCallback([{}], 10, probe_step=lambda m, b: None)
        MIRCallback(probe_dataloader=[{}], every_n_steps=2, probe_step=lambda m, b: None)
