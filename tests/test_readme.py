"""The README's metric example runs as written, and its numbers match the float64 reference."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import mir_lightning  # noqa: E402
from reference import reference_layer  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"

# Measured on this example (torch.manual_seed(0); weights differ per seed): with exact medians
# the package is within 3e-12 of the reference and the reference within 4e-16 of 40-digit
# mpmath, so 1e-10 (test_metric.EXACT_RTOL). The example as written has 896 text tokens per
# layer, more than median_buffer = 512, so the median row comes from the histogram sketch (it
# warns): measured 7.7e-9 and 7.6e-7 per layer (<= 7.6e-7 over seeds 0-5): 1e-5 then.
EXACT_RTOL = 1e-10
SKETCH_RTOL = 1e-5


def _block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


class RecordingMetric(mir_lightning.ModalityIntegrationRate):
    """The package's metric that also keeps the tokens it was given, for the reference."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    def update(self, hidden, vision, text):
        self.seen.append(([h[vision].double().numpy() for h in hidden], [h[text].double().numpy() for h in hidden]))
        super().update(hidden, vision, text)


def test_readme_metric_example_runs_and_matches_reference(capsys, monkeypatch):
    monkeypatch.setattr(mir_lightning, "ModalityIntegrationRate", RecordingMetric)
    torch.manual_seed(0)  # the example's random model
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(_block_after("## The metric"), "README.md", "exec"), namespace)
    assert "MIR" in capsys.readouterr().out
    metric = namespace["metric"]
    assert isinstance(metric, RecordingMetric) and metric.seen, "the example must feed the metric with update()"
    sketch = any("median_buffer" in str(w.message) for w in caught)
    layers = len(metric.seen[0][0])
    refs = [reference_layer(np.concatenate([v[k] for v, _ in metric.seen]),
                            np.concatenate([t[k] for _, t in metric.seen]), 3.0) for k in range(layers)]
    fds = np.array([d["fd"] for d in refs])
    rtol = SKETCH_RTOL if sketch else EXACT_RTOL
    np.testing.assert_allclose(namespace["fd"].numpy(), fds, rtol=rtol, atol=0)
    assert abs(float(namespace["mir"]) - math.log10(fds.sum())) < rtol
    stats = namespace["stats"]
    for k, d in enumerate(refs):
        assert stats["outliers_vision"][k] == d["outliers_vision"] and stats["outliers_text"][k] == d["outliers_text"]
        assert abs(float(stats["norm_ratio"][k]) - d["norm_ratio"]) < EXACT_RTOL * d["norm_ratio"]


# ----------------------------------------------------------------------------- snippets and messages of issue 19
def _block_containing(needle: str) -> str:
    """The README's ```python block that contains ``needle``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [block for block in blocks if needle in block]
    assert len(found) == 1, needle
    return found[0]


class _TransformersFourLlava(torch.nn.Module):
    """The transformers 4.x module layout of LLaVA: the projector on the top-level model."""

    def __init__(self):
        super().__init__()
        self.vision_tower = torch.nn.Linear(4, 4)
        self.multi_modal_projector = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
        self.language_model = torch.nn.Module()
        self.language_model.model = torch.nn.Module()
        self.language_model.model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])


def test_readme_moca_snippet_finds_the_projector_on_both_transformers_layouts():
    """``model.multi_modal_projector`` (transformers 4) moved to ``model.model.multi_modal_projector``
    (transformers 5): the snippet trains the projector and MoCa on either."""
    from vlm_factory import make_tiny_vlm

    from mir_lightning.moca import multimodal_projector

    snippet = _block_containing("MoCa.attach(model)")
    model, _ = make_tiny_vlm("llava")
    assert not hasattr(model, "multi_modal_projector")  # transformers 5: the old snippet's AttributeError
    namespace = {"model": model, "torch": torch}
    exec(compile(snippet, "README.md", "exec"), namespace)
    trained = {id(p) for group in namespace["optimizer"].param_groups for p in group["params"]}
    expected = [*model.model.multi_modal_projector.parameters(), model.moca.scale, model.moca.shift]
    assert trained == {id(p) for p in expected}

    old = _TransformersFourLlava()
    assert multimodal_projector(old) is old.multi_modal_projector
    with pytest.raises(ValueError, match="no projector"):
        multimodal_projector(torch.nn.Linear(2, 2))


class _Captions(torch.utils.data.Dataset):
    """A training set of 5 samples, fewer than the snippet's 100."""

    def __init__(self, model_inputs):
        self.batch = model_inputs(5, 8, seed=3)

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {key: value[i] for key, value in self.batch.items()}


def test_readme_llava_train_py_probe_fits_a_small_dataset():
    """``Subset(ds, range(100))`` on fewer than 100 samples failed with IndexError (MIR NaN); the
    snippet takes ``min(100, len(ds))``, and the probe's message names that fix."""
    from vlm_factory import make_tiny_vlm

    from mir_lightning import MIRProbe

    model, make_inputs = make_tiny_vlm("llava")
    dataset = _Captions(make_inputs)
    added = []

    class Trainer:
        def add_callback(self, callback):
            added.append(callback)

    namespace = {"torch": torch, "trainer": Trainer(),
                 "data_module": {"train_dataset": dataset, "data_collator": torch.utils.data.default_collate}}
    exec(compile(_block_containing("Subset("), "README.md", "exec"), namespace)
    (callback,) = added
    result = callback.probe.run(model)
    assert result.error is None and math.isfinite(result.mir)
    assert result.n_vision == 5 * 16  # every sample once

    too_long = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(100)), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failed = MIRProbe(too_long).run(model)
    assert math.isnan(failed.mir)
    assert "IndexError" in failed.error and "range(min(100, len(dataset)))" in failed.error


def test_spliced_llava_layout_without_masks_names_llava_mask_fn():
    """On the original LLaVA code's ``-200`` layout the message suggested ``image_token_id=``, which
    then failed on the shape: it names ``llava_mask_fn`` now, and that works."""
    from test_llava_layout import BATCHES, N_IMG, StandInLLaVA

    from mir_lightning import MIRProbe
    from mir_lightning.capture import MaskRule
    from mir_lightning.models.llava import llava_mask_fn
    from mir_lightning.models.transformers import find_hidden_state_modules

    for rule in (MaskRule(), MaskRule(image_token_id=-200)):
        with pytest.raises(ValueError, match="-200") as info:
            rule(BATCHES[0])
        assert "llava_mask_fn" in str(info.value)
    options = dict(layers=lambda m: find_hidden_state_modules(m.llm), step=lambda m, b: m(**b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failed = MIRProbe(BATCHES, **options).run(StandInLLaVA(None, "right"))
    assert math.isnan(failed.mir) and "llava_mask_fn" in failed.error
    fixed = MIRProbe(BATCHES, masks=llava_mask_fn(N_IMG), **options).run(StandInLLaVA(None, "right"))
    assert fixed.error is None and math.isfinite(fixed.mir)
