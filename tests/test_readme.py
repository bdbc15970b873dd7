"""The README's metric example runs as written, and its numbers match a float64 reference."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from reference import reference_layer  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_metric_example_runs_and_matches_reference(capsys):
    import torch

    from mir_lightning.integrations.transformers import build_masks

    namespace: dict = {}
    exec(compile(_block_after("## The metric"), "README.md", "exec"), namespace)
    assert "MIR" in capsys.readouterr().out
    # the same batches again, materialised, through the float64 reference of the spec
    model, image = namespace["model"], namespace["IMAGE"]
    vision_rows, text_rows = [[], []], [[], []]
    for seed in range(8):
        ids = torch.randint(0, 99, (4, 48), generator=torch.Generator().manual_seed(seed))
        ids[:, 4:20] = image
        vision, text = build_masks(ids, image)
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        for k, h in enumerate(hidden):
            vision_rows[k].append(h[vision].double().numpy())
            text_rows[k].append(h[text].double().numpy())
    fds = [reference_layer(np.concatenate(v), np.concatenate(t), 3.0)["fd"] for v, t in zip(vision_rows, text_rows)]
    assert float(namespace["mir"]) == pytest.approx(math.log10(sum(fds)), rel=1e-6)
    assert namespace["fd"].tolist() == pytest.approx(fds, rel=1e-6)
