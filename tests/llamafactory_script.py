"""LLaMA-Factory's own SFT trainer (``llamafactory.train.tuner.run_exp``) on a tiny LLaVA saved
to disk, with ``MIRTrainerCallback`` passed through its Python API.

Run by tests/test_llamafactory.py with the Python of a LLaMA-Factory environment:

    python tests/llamafactory_script.py MODEL_DIR WORK_DIR

``WORK_DIR`` gets the dataset (``dataset_info.json``, images, a ShareGPT json), the
Trainer's output (``out/``: ``trainer_state.json`` with ``log_history``, ``trainer_log.jsonl``)
and ``callback.json`` (the callback's own history). Learning rate 0: the weights do not move,
so every MIR equals the MIR of the saved checkpoint on the probe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

N_TRAIN = 8
PROBE_SAMPLES, PROBE_BATCH = 6, 3
EVERY_N_STEPS, MAX_STEPS = 2, 4
# the built-in texts are long: exact medians and no outlier rule, as in tests/test_paper_probe.py
METRIC = dict(median_buffer=8192, outlier_sigma=None)


def write_dataset(root: Path) -> None:
    """A ShareGPT-format image dataset of ``N_TRAIN`` samples, registered in ``dataset_info.json``."""
    from PIL import Image

    from mir_lightning.probe_data import probe_image_array

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(N_TRAIN):
        Image.fromarray(probe_image_array(i, size=32)).save(root / f"img_{i}.png")
        rows.append({
            "messages": [{"from": "human", "value": f"<image>what is shown in picture {i}?"},
                         {"from": "gpt", "value": f"a small test picture, number {i}."}],
            "images": [str(root / f"img_{i}.png")],
        })
    (root / "tiny.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"tiny": {"file_name": "tiny.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "images": "images"}}}
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def main() -> None:
    model_dir, work = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    from llamafactory.train.tuner import run_exp
    from transformers import AutoProcessor

    from mir_lightning import paper_probe
    from mir_lightning.adapters.hf_trainer import MIRTrainerCallback

    write_dataset(work / "data")
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    callback = MIRTrainerCallback(paper_probe(processor, PROBE_SAMPLES, PROBE_BATCH), every_n_steps=EVERY_N_STEPS,
                                  **METRIC)
    run_exp(
        args=dict(
            stage="sft", do_train=True, model_name_or_path=model_dir, template="llava", dataset="tiny",
            dataset_dir=str(work / "data"), finetuning_type="full", output_dir=str(work / "out"),
            overwrite_output_dir=True, per_device_train_batch_size=2, max_steps=MAX_STEPS, learning_rate=0.0,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", cutoff_len=512,
            use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0,
            preprocessing_num_workers=None, plot_loss=False,
        ),
        callbacks=[callback],
    )
    entries = [entry if isinstance(entry, dict) else vars(entry) for entry in callback.history]
    (work / "callback.json").write_text(json.dumps([{k: v for k, v in e.items() if k in ("step", "mir")}
                                                    for e in entries]), encoding="utf-8")


if __name__ == "__main__":
    main()
