"""MIR of the example model on two probes: training samples vs the paper's protocol.

* training samples: the first 100 training images with their training captions in the
  pre-training template (the README's ``Subset(train_set, range(min(100, len(train_set))))``);
* paper protocol: 100 held-out images, each with an unrelated English text of the built-in
  probe set (:func:`mir_lightning.probe_data.probe_texts`, as ``paper_probe`` and
  ``mir-lightning evaluate`` use), in the same chat layout (prefix, image, text, ``ASSISTANT:``).

Both are measured with :class:`~mir_lightning.MIRProbe` on the untrained projector (step 0)
and after ``examples/pretrain_lvlm.py`` trained it (same arguments, passed through).

    python benchmarks/probe_protocols.py --tiny            # random tiny parts, ~1 min
    python benchmarks/probe_protocols.py                   # real parts (examples/requirements-parts.txt)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]

import lvlm  # noqa: E402
import pretrain_lvlm  # noqa: E402

from mir_lightning import MIRProbe  # noqa: E402
from mir_lightning.probe_data import probe_texts  # noqa: E402

N = 100


def training_probe(parts: lvlm.Parts, batch_size: int) -> torch.utils.data.DataLoader:
    train_set = lvlm.FeatureDataset(parts.train_features, parts.train_labels)
    subset = torch.utils.data.Subset(train_set, range(min(N, len(train_set))))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=lvlm.Collate(parts.layout))


def paper_protocol_probe(parts: lvlm.Parts, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Held-out images with unrelated texts: prefix, image, `` text``, `` ASSISTANT:``."""
    layout, n = parts.layout, min(N, len(parts.probe_labels))
    texts = probe_texts(n)
    batches = []
    for start in range(0, n, batch_size):
        rows = []
        for i in range(start, min(n, start + batch_size)):
            text = layout.tok.encode(" " + texts[i]) + layout.assistant
            ids = layout.prefix + [layout.tok.image_placeholder_id] * layout.n_image + text
            rows.append((ids, [0] * len(layout.prefix) + [1] * layout.n_image + [2] * len(text)))
        batch, _ = lvlm.padded_batch(rows, layout.tok.pad_id, parts.probe_features[start:start + len(rows)])
        batches.append(batch)
    return batches


def measure(model: torch.nn.Module, loaders: dict[str, object], when: str) -> dict[str, float]:
    values = {}
    for name, loader in loaders.items():
        values[name] = MIRProbe(loader, median_buffer=4096).run(model).mir
        print(f"[probe] {when}, {name}: MIR {values[name]:.4f}", flush=True)
    return values


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    args = pretrain_lvlm.parse_args(argv)
    parts = lvlm.load_parts(args.tiny, args.n_train, args.n_val, args.seed, args.cache_dir, args.image_size)
    loaders = {"training samples": training_probe(parts, 25), "paper protocol": paper_protocol_probe(parts, 25)}
    torch.manual_seed(args.seed)
    before = measure(parts.model(projector=args.projector).eval(), loaders, "step 0")
    run = pretrain_lvlm.main(argv)
    last = f"step {run.rows[-1]['step']}"
    after = measure(run.module.model.eval(), loaders, last)
    result = {"command": "python benchmarks/probe_protocols.py " + " ".join(argv), "parts": parts.description,
              "step 0": before, last: after}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
