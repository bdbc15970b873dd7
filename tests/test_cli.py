"""Tests of ``mir-lightning evaluate`` against an independent float64 numpy/scipy MIR.

Tiny random models of several families are saved with ``save_pretrained`` next to a
processor built offline (character-level tokenizer, PIL image processors at 32 px). The
reference below re-runs the model on the same prompts and recomputes the official
algorithm from ``output_hidden_states`` with numpy / ``scipy.linalg.sqrtm``.

Sample counts are chosen so that every layer has more vision and text tokens than the
hidden width (full-rank covariances) and at most 512 tokens per modality (the metric's
exact median buffer), so the comparison holds to 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")
scipy_linalg = pytest.importorskip("scipy.linalg")

from PIL import Image  # noqa: E402

from mir_lightning.cli import main, parse_layers, UserError  # noqa: E402
from mir_lightning.evaluate import COUNT_KEYS, ProbeBatches, evaluate_checkpoint  # noqa: E402
from mir_lightning.probe_data import probe_image_array  # noqa: E402

from reference import reference_layer  # noqa: E402
from vlm_factory import (  # noqa: E402
    IMAGE_TOKEN_ID,
    build_token_rows,
    extra_inputs,
    make_tiny_tokenizer,
    make_tiny_vlm,
    pad_rows,
    pixel_inputs,
    save_tiny_vlm,
)

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24
SHORT_TEXTS = [
    "red kite.", "a cold sea.", "the old mill", "rain at dusk", "green hills",
    "salt & wind", "two owls", "bread, milk", "a long road", "ice on glass",
    "the clock", "dry leaves", "blue door", "warm soup", "a paper boat",
    "tall grass", "city lights", "quiet lake", "small stones", "open sky",
    "late train", "new snow", "soft moss", "wild bees",
]
# family -> (samples, batch size, chat template?)
CASES = {
    "llava": (20, 6, True),
    "llava_next": (12, 5, True),
    "idefics3": (20, 8, True),
    "paligemma": (20, 7, False),
    "gemma3": (20, 8, True),
}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mir_data")
    images = root / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(probe_image_array(i, size=40 + 4 * (i % 3))).save(images / f"img_{i:03d}.png")
    (root / "texts.txt").write_text("\n".join(SHORT_TEXTS) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mir_models")
    out = {}
    for family, (_, _, chat) in CASES.items():
        out[family] = save_tiny_vlm(family, root / family, chat_template=chat)
    return out


# ----------------------------------------------------------------------------- reference
def reference_fd(vision: np.ndarray, text: np.ndarray, sqrt_mode: str = "exact") -> float:
    """The official per-layer FD in float64 (tests/reference.py)."""
    return reference_layer(vision, text, 3.0, fast=sqrt_mode != "exact")["fd"]


def command_batches(model_dir: Path, data_dir: Path, n: int, batch_size: int) -> list[dict]:
    """The batches the command builds: one image + one text per sample, chat template if any."""
    processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    paths = sorted((data_dir / "images").glob("*.png"))[:n]
    texts = SHORT_TEXTS[:n]
    batches = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        images = [[Image.open(paths[i]).convert("RGB")] for i in idx]
        if processor.chat_template:
            prompts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[i]}]}],
                    add_generation_prompt=True, tokenize=False,
                )
                for i in idx
            ]
        else:
            prompts = [processor.image_token + texts[i] for i in idx]
        enc = dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))
        enc.pop("labels", None)
        batches.append(enc)
    return batches


def reference_run(
    model_dir: Path, data_dir: Path, n: int, batch_size: int, text_mode: str = "after_image",
    sqrt_mode: str = "exact",
) -> tuple[float, list[float]]:
    """Independent MIR: same prompts and batches as the command, float64 numpy statistics."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    image_token = model.config.image_token_id
    vis_rows: list[list[np.ndarray]] = []
    txt_rows: list[list[np.ndarray]] = []
    for enc in command_batches(model_dir, data_dir, n, batch_size):
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[1:]
        ids = enc["input_ids"].numpy()
        att = enc["attention_mask"].numpy().astype(bool)
        is_img = ids == image_token
        vmask = is_img & att
        tmask = att & ~is_img
        if text_mode == "after_image":
            tmask &= np.cumsum(vmask, axis=1) > 0
        if not vis_rows:
            vis_rows = [[] for _ in hidden]
            txt_rows = [[] for _ in hidden]
        for k, h in enumerate(hidden):
            arr = h.double().numpy()
            vis_rows[k].append(arr[vmask])
            txt_rows[k].append(arr[tmask])
    fds = [reference_fd(np.concatenate(v), np.concatenate(t), sqrt_mode) for v, t in zip(vis_rows, txt_rows)]
    return float(np.log10(sum(fds))), fds


def reference_token_counts(model_dir: Path, data_dir: Path, n: int, batch_size: int) -> tuple[int, int]:
    """Vision and text ('after_image') tokens of the command's batches, counted on the input ids."""
    image_token = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True).image_token_id
    n_vision = n_text = 0
    for enc in command_batches(model_dir, data_dir, n, batch_size):
        ids = enc["input_ids"].numpy()
        att = enc["attention_mask"].numpy().astype(bool)
        vmask = (ids == image_token) & att
        n_vision += int(vmask.sum())
        n_text += int((att & ~vmask & (np.cumsum(vmask, axis=1) > 0)).sum())
    return n_vision, n_text


def _run(argv: list[str]) -> tuple[int, dict | None]:
    rc = main(argv)
    out = None
    if "--out" in argv:
        path = Path(argv[argv.index("--out") + 1])
        out = json.loads(path.read_text()) if path.exists() else None
    return rc, out


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", list(CASES))
def test_cli_matches_float64_reference(family, model_dirs, data_dir, tmp_path):
    n, batch, _ = CASES[family]
    out = tmp_path / "result.json"
    rc, result = _run([
        "evaluate", str(model_dirs[family]), "--images", str(data_dir / "images"),
        "--texts", str(data_dir / "texts.txt"), "--num-samples", str(n), "--batch-size", str(batch),
        "--device", "cpu", "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    ref_mir, ref_fd = reference_run(model_dirs[family], data_dir, n, batch)
    assert result["mir"] == pytest.approx(ref_mir, rel=1e-6)
    assert result["per_layer"]["fd"] == pytest.approx(ref_fd, rel=1e-6)
    hidden = 64
    assert result["counts"]["vision_tokens"] > hidden and result["counts"]["text_tokens"] > hidden
    assert result["counts"]["vision_tokens"] <= 512 and result["counts"]["text_tokens"] <= 512
    assert result["counts"]["samples"] == n
    assert result["counts"]["skipped_images"] == 0
    assert result["settings"]["image_token_id"] == IMAGE_TOKEN_ID
    for key in ("fd", "mean_term", "trace_vision", "trace_text", "cross_term", "norm_ratio",
                "n_vision", "n_text", "outliers_vision", "outliers_text"):
        assert len(result["per_layer"][key]) == len(result["layers"]) == 3
    # counts are JSON integers (they were written as 160.0) and equal the counts of the input ids
    n_vision, n_text = reference_token_counts(model_dirs[family], data_dir, n, batch)
    assert result["per_layer"]["n_vision"] == [n_vision] * 3 and result["per_layer"]["n_text"] == [n_text] * 3
    for key in COUNT_KEYS:
        assert all(type(v) is int for v in result["per_layer"][key]), key
    assert all(type(v) is int for k, v in result["counts"].items() if k != "skipped_image_files")


# families whose processors need torchvision (their video processors); torchvision's wheel does
# not load beside the CPU torch these tests run on, so a stand-in processor tokenizes instead
STUB_FAMILIES = {"qwen2_vl": (16, 5), "qwen2_5_vl": (16, 5), "smolvlm": (18, 6)}


class StandInProcessor:
    """Deterministic token rows (BOS, prefix, the family's image span, text) and pixel inputs
    for a batch, seeded by its prompts: stands in for the processor, nothing else changes."""

    chat_template = None
    image_token = "<image>"
    image_processor = object()

    def __init__(self, family: str):
        self.family = family

    def __call__(self, images=None, text=(), padding=True, return_tensors="pt"):
        gen = torch.Generator().manual_seed(zlib.crc32("\n".join(text).encode()))
        rows = build_token_rows(self.family, len(text), 10, gen)
        input_ids, attention_mask = pad_rows(rows)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                **pixel_inputs(self.family, len(text), gen), **extra_inputs(self.family, input_ids)}


@pytest.mark.parametrize("family", list(STUB_FAMILIES))
def test_cli_model_path_for_families_with_torchvision_processors(family, data_dir, tmp_path, monkeypatch):
    model, _ = make_tiny_vlm(family)
    model_dir = tmp_path / family
    model.save_pretrained(model_dir)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        staticmethod(lambda *a, **k: StandInProcessor(family)))
    n, batch = STUB_FAMILIES[family]
    out = tmp_path / "result.json"
    rc, result = _run([
        "evaluate", str(model_dir), "--images", str(data_dir / "images"), "--texts", str(data_dir / "texts.txt"),
        "--num-samples", str(n), "--batch-size", str(batch), "--device", "cpu", "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    ref_mir, ref_fd = reference_run(model_dir, data_dir, n, batch)
    assert result["mir"] == pytest.approx(ref_mir, rel=1e-6)
    assert result["per_layer"]["fd"] == pytest.approx(ref_fd, rel=1e-6)
    assert result["counts"]["samples"] == n and result["settings"]["image_token_id"] == IMAGE_TOKEN_ID


def test_cli_options_layers_text_all_fast(model_dirs, data_dir, tmp_path):
    model_dir = model_dirs["llava"]
    n, batch = 16, 8
    common = ["evaluate", str(model_dir), "--images", str(data_dir / "images"), "--texts",
              str(data_dir / "texts.txt"), "--batch-size", str(batch), "--no-progress"]
    # 6 samples: with the system prompt counted as text, still <= 512 text tokens (exact median)
    rc, res = _run([*common, "--num-samples", "6", "--text-tokens", "all", "--layers", "::2", "--out", str(tmp_path / "a.json"),
                    "--plot", str(tmp_path / "plot.png")])
    assert rc == 0
    assert res["layers"] == [0, 2]
    _, ref_fd = reference_run(model_dir, data_dir, 6, batch, text_mode="all")
    assert res["per_layer"]["fd"] == pytest.approx([ref_fd[0], ref_fd[2]], rel=1e-6)
    assert res["mir"] == pytest.approx(np.log10(ref_fd[0] + ref_fd[2]), rel=1e-6)
    assert (tmp_path / "plot.png").stat().st_size > 1000

    rc, res = _run([*common, "--num-samples", str(n), "--sqrt-mode", "official_fast", "--layers", "-1", "--out", str(tmp_path / "b.json")])
    assert rc == 0
    assert res["layers"] == [2]
    _, ref_fast = reference_run(model_dir, data_dir, n, batch, sqrt_mode="official_fast")
    assert res["per_layer"]["fd"] == pytest.approx([ref_fast[2]], rel=1e-6)


def test_cli_builtin_probe_set(model_dirs, tmp_path, capsys):
    out = tmp_path / "probe.json"
    rc, res = _run(["evaluate", str(model_dirs["llava"]), "--num-samples", "3", "--batch-size", "2",
                    "--out", str(out), "--no-progress"])
    assert rc == 0
    assert np.isfinite(res["mir"])
    assert res["settings"]["images"].startswith("built-in")
    printed = capsys.readouterr().out
    assert "MIR:" in printed and "|V|/|T|" in printed and "outV" in printed


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


def test_cli_torchrun_two_ranks_equals_one_and_reference(model_dirs, data_dir, tmp_path):
    """The command as a subprocess, under torchrun with 2 ranks (gloo): same MIR as 1 process."""
    out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
    n, batch = 11, 3
    args = ["evaluate", str(model_dirs["llava"]), "--images", str(data_dir / "images"), "--texts",
            str(data_dir / "texts.txt"), "--num-samples", str(n), "--batch-size", str(batch), "--device", "cpu",
            "--no-progress"]
    rc, single = _run([*args, "--out", str(out1)])
    assert rc == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mir_lightning", *args, "--out", str(out2)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("MIR:") == 1  # only rank 0 prints
    two = json.loads(out2.read_text())
    assert two["settings"]["world_size"] == 2
    assert two["counts"]["samples"] == n
    assert two["counts"]["vision_tokens"] == single["counts"]["vision_tokens"] == 16 * n
    assert two["counts"]["text_tokens"] == single["counts"]["text_tokens"]
    assert two["mir"] == pytest.approx(single["mir"], rel=1e-9)
    assert two["per_layer"]["fd"] == pytest.approx(single["per_layer"]["fd"], rel=1e-9)
    ref_mir, _ = reference_run(model_dirs["llava"], data_dir, n, batch)
    assert single["mir"] == pytest.approx(ref_mir, rel=1e-6)


def test_cli_subprocess_user_error(tmp_path):
    """A user error from the real command line (``python -m mir_lightning``): exit code 2, one
    message, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "mir_lightning", "evaluate", str(tmp_path / "nope")],
        capture_output=True, text=True, env=_env(), timeout=240,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "mir-lightning: error:" in proc.stderr and "not a folder" in proc.stderr


# ----------------------------------------------------------------------------- bad input
def test_corrupt_and_missing_images_are_skipped(model_dirs, data_dir, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        shutil.copy(data_dir / "images" / f"img_{i:03d}.png", images / f"ok_{i}.png")
    (images / "bad_0.png").write_bytes(b"this is not a png")
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/ok_0.png\nimgs/missing.png\nimgs/bad_0.png\nimgs/ok_1.png\nimgs/ok_2.png\n")
    rc, res = _run(["evaluate", str(model_dirs["llava"]), "--images", str(listing), "--num-samples", "3",
                    "--batch-size", "3", "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    assert res["counts"]["skipped_images"] == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "bad_0.png" in err

    # the folder form: 4 good + 1 corrupt, asking for 5 -> clear error with the count
    rc = main(["evaluate", str(model_dirs["llava"]), "--images", str(images), "--num-samples", "5", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "only 4 readable images exist" in err and "Traceback" not in err


def test_bad_text_inputs(model_dirs, data_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    rc = main(["evaluate", str(model_dirs["llava"]), "--texts", str(empty), "--num-samples", "2"])
    assert rc == 2
    assert "is empty" in capsys.readouterr().err

    rc = main(["evaluate", str(model_dirs["llava"]), "--texts", str(data_dir / "texts.txt"),
               "--images", str(data_dir / "images"), "--num-samples", "30"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"only {len(SHORT_TEXTS)} texts exist" in err

    rc = main(["evaluate", str(model_dirs["llava"]), "--num-samples", "100000"])
    assert rc == 2
    assert "built-in probe set has" in capsys.readouterr().err

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("first text")
    (folder / "b.txt").write_text("")
    (folder / "c.txt").write_text("second\ntext")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n')
    for source in (folder, jsonl):
        rc, res = _run(["evaluate", str(model_dirs["llava"]), "--texts", str(source), "--num-samples", "2",
                        "--out", str(tmp_path / "t.json"), "--no-progress"])
        assert rc == 0 and np.isfinite(res["mir"])


def test_model_errors(tmp_path, capsys):
    tok = make_tiny_tokenizer("llava")
    # a text-only model: no image token
    lm_dir = tmp_path / "lm"
    transformers.LlamaConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    rc = main(["evaluate", str(lm_dir), "--num-samples", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no image token" in err and "image_token_id" in err and "Traceback" not in err

    # an image token in the config but an architecture the command cannot run
    odd_dir = tmp_path / "odd"
    transformers.LlamaConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, image_token_id=100,
                             architectures=["LlamaForCausalLM"]).save_pretrained(odd_dir)
    rc = main(["evaluate", str(odd_dir), "--num-samples", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unsupported architecture" in err and "MIRCallback(layers=" in err

    rc = main(["evaluate", str(tmp_path / "does_not_exist")])
    assert rc == 2
    (tmp_path / "noconfig").mkdir()
    rc = main(["evaluate", str(tmp_path / "noconfig")])
    assert rc == 2
    assert "config.json" in capsys.readouterr().err

    assert main([]) == 2
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(lm_dir), "--dtype", "float8"])
    assert info.value.code == 2


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers("::2", 5) == [0, 2, 4]
    assert parse_layers("0,1,3", 4) == [0, 1, 3]
    assert parse_layers("-1", 4) == [3]
    assert parse_layers("1:3,-1", 6) == [1, 2, 5]
    for bad in ("x", "9", "1:2:3:4", "5:"):
        with pytest.raises(UserError, match="--layers"):
            parse_layers(bad, 4)


def test_cli_equals_callback_on_same_data(model_dirs, data_dir, tmp_path):
    """The command and MIRCallback (hooks inside a Trainer) agree on the same batches."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from mir_lightning import MIRCallback

    n, batch, _ = CASES["llava"]
    rc, result = _run([
        "evaluate", str(model_dirs["llava"]), "--images", str(data_dir / "images"),
        "--texts", str(data_dir / "texts.txt"), "--num-samples", str(n), "--batch-size", str(batch),
        "--out", str(tmp_path / "r.json"), "--no-progress",
    ])
    assert rc == 0

    class Wrapper(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(model_dirs["llava"], local_files_only=True)

        def validation_step(self, batch, batch_idx):
            self.model(**batch)

    callback = MIRCallback()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False)
    batches = command_batches(model_dirs["llava"], data_dir, n, batch)
    trainer.validate(Wrapper(), DataLoader(batches, batch_size=None), verbose=False)
    assert callback.history[-1]["mir"] == pytest.approx(result["mir"], rel=1e-9)  # float64 in the history
    assert float(trainer.callback_metrics["mir"]) == pytest.approx(result["mir"], rel=1e-6)  # logged as float32


# ----------------------------------------------------------------------------- defects of issue 10
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_is_an_error(device, model_dirs, tmp_path, capsys, monkeypatch):
    """``--device cuda:0`` used to run on the CPU when no CUDA device exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    rc = main(["evaluate", str(model_dirs["llava"]), "--num-samples", "2", "--device", device,
               "--out", str(out), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--device {device}: no CUDA device is available" in err and "Traceback" not in err
    assert not out.exists()


def test_bad_device_name_is_an_error(model_dirs, capsys):
    assert main(["evaluate", str(model_dirs["llava"]), "--device", "gpu0", "--num-samples", "2"]) == 2
    assert "--device must be cpu, cuda or cuda:N" in capsys.readouterr().err


def test_max_outliers_and_median_buffer_reach_the_metric(model_dirs, data_dir, tmp_path, capsys, monkeypatch):
    """The metric's warnings advise raising max_outliers / median_buffer: the command has both."""
    import functools

    from mir_lightning.metric import ModalityIntegrationRate

    seen = []
    original = ModalityIntegrationRate.__init__

    @functools.wraps(original)
    def recording_init(self, *args, **kwargs):
        seen.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ModalityIntegrationRate, "__init__", recording_init)
    n, batch = 6, 6
    rc, res = _run(["evaluate", str(model_dirs["llava"]), "--images", str(data_dir / "images"), "--texts",
                    str(data_dir / "texts.txt"), "--num-samples", str(n), "--batch-size", str(batch),
                    "--max-outliers", "7", "--median-buffer", "8", "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    assert seen[-1]["max_outliers"] == 7 and seen[-1]["median_buffer"] == 8
    assert res["settings"]["max_outliers"] == 7 and res["settings"]["median_buffer"] == 8
    # 96 vision tokens > 8: the median is interpolated, and the warning names the option
    assert res["counts"]["vision_tokens"] > 8
    err = capsys.readouterr().err
    assert "median_buffer=8" in err and "(command line: --median-buffer)" in err
    for bad in (["--max-outliers", "0"], ["--median-buffer", "0"]):
        assert main(["evaluate", str(model_dirs["llava"]), "--num-samples", "2", *bad]) == 2
        assert f"{bad[0]} must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--plot", "--out"])
def test_output_in_a_missing_folder_is_refused_before_any_work(option, model_dirs, tmp_path, capsys, monkeypatch):
    """``--plot /nonexistent/x.png`` used to create ``/nonexistent/`` after the whole run."""
    import mir_lightning.cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation started although the output folder is missing")

    monkeypatch.setattr(mir_lightning.cli, "evaluate_checkpoint", must_not_run)
    target = tmp_path / "missing" / "x.png"
    rc = main(["evaluate", str(model_dirs["llava"]), "--num-samples", "2", option, str(target)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"the folder {target.parent} does not exist" in err
    assert not target.parent.exists()


def test_plot_has_integer_ticks_at_the_real_layer_ids():
    from mir_lightning.plotting import per_layer_figure

    stats = {k: [1.0, 2.0, 3.0] for k in ("fd", "mean_term", "trace_vision", "trace_text", "cross_term", "norm_ratio")}
    fig = per_layer_figure(stats, layers=[0, 2, 5])
    assert list(fig.axes[1].get_xticks()) == [0, 2, 5]
    fig = per_layer_figure(stats)  # default ids 0, 1, 2: no fractional ticks
    fig.canvas.draw()
    assert list(fig.axes[1].get_xticks()) == [0, 1, 2]
    many = {k: [1.0] * 40 for k in stats}
    fig = per_layer_figure(many)
    fig.canvas.draw()
    ticks = fig.axes[1].get_xticks()
    assert len(ticks) > 2 and all(float(t).is_integer() for t in ticks)
    with pytest.raises(ValueError, match="layers has 2 ids"):
        per_layer_figure(stats, layers=[0, 1])


def test_probe_batches_decode_images_only_when_read(model_dirs, data_dir, monkeypatch):
    from mir_lightning.probe_data import ProbeSet, probe_set

    decoded = []
    decode = ProbeSet.image
    monkeypatch.setattr(ProbeSet, "image", lambda self, i: decoded.append(i) or decode(self, i))
    samples = probe_set(data_dir / "images", data_dir / "texts.txt", 5)
    assert decoded == [] and samples.image_paths is not None  # paths only, up front
    processor = transformers.AutoProcessor.from_pretrained(model_dirs["llava"], local_files_only=True)
    batches = ProbeBatches(samples, processor, 2, torch.float32, IMAGE_TOKEN_ID)
    assert len(batches) == 3
    last = batches[2]
    assert decoded == []
    assert last["input_ids"].shape[0] == 1 and decoded == [4]
    assert len(list(batches)) == 3 and decoded == [4]  # iterating reads nothing


def test_evaluate_checkpoint_is_importable_and_equals_the_command(model_dirs, data_dir, tmp_path):
    n, batch = 8, 4
    result = evaluate_checkpoint(model_dirs["llava"], images=data_dir / "images", texts=data_dir / "texts.txt",
                                 num_samples=n, batch_size=batch, device="cpu", layers="0,2", progress=False)
    ref_mir, ref_fd = reference_run(model_dirs["llava"], data_dir, n, batch)
    assert result.layers == [0, 2]
    assert result.per_layer["fd"] == pytest.approx([ref_fd[0], ref_fd[2]], rel=1e-6)
    assert result.mir == pytest.approx(np.log10(ref_fd[0] + ref_fd[2]), rel=1e-6)
    assert (result.num_samples, result.world_size, result.device, result.hidden_size) == (n, 1, "cpu", 64)
    assert (result.vision_tokens, result.text_tokens) == reference_token_counts(model_dirs["llava"], data_dir, n, batch)
    assert result.seconds > 0 and result.model_class == "LlavaForConditionalGeneration"


def _collective_forward_worker(rank: int, world: int, port: int, model_dir: str, data_dir: str, out_dir: str) -> None:
    """One rank: every forward of the model runs an all-reduce first, as FSDP and ZeRO-3 all-gather
    parameters in every forward; unequal forward counts across ranks then hang (here: time out)."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    cls = transformers.LlavaForConditionalGeneration
    original = cls.forward
    forwards = []

    def forward(self, *args, **kwargs):
        dist.all_reduce(torch.ones(1))
        forwards.append(1)
        return original(self, *args, **kwargs)

    cls.forward = forward
    from mir_lightning.probe_data import ProbeSet

    decode = ProbeSet.image
    decoded = []

    def image(self, index):
        decoded.append(index)
        return decode(self, index)

    ProbeSet.image = image
    try:
        result = evaluate_checkpoint(model_dir, images=Path(data_dir) / "images", texts=Path(data_dir) / "texts.txt",
                                     num_samples=5, batch_size=2, device="cpu", progress=False)
    finally:
        cls.forward, ProbeSet.image = original, decode
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"forwards": len(forwards), "decoded": decoded,
                                                             **result.to_dict()}))
    from distributed_helpers import end_process_group

    end_process_group(exit_if_held=True)  # its gloo threads joined (or no finalization) before exit


def test_ranks_run_equal_forward_counts_with_a_padding_batch(model_dirs, data_dir, tmp_path):
    """5 samples in batches of 2 = 3 batches on 2 ranks: rank 1 runs a padding batch whose tokens
    are not counted; without it rank 0's second forward waits for rank 1 and times out."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_collective_forward_worker, args=(2, port, str(model_dirs["llava"]), str(data_dir), str(tmp_path)),
             nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["forwards"] for r in ranks] == [2, 2]
    # images are decoded per batch on the rank that runs it: rank 0 batches 0 and 2, rank 1
    # batch 1 and the padding batch (batch 0 again)
    assert [r["decoded"] for r in ranks] == [[0, 1, 4], [2, 3, 0, 1]]
    ref_mir, ref_fd = reference_run(model_dirs["llava"], data_dir, 5, 2)
    n_vision, n_text = reference_token_counts(model_dirs["llava"], data_dir, 5, 2)
    for r in ranks:
        assert (r["counts"]["vision_tokens"], r["counts"]["text_tokens"]) == (n_vision, n_text)  # padding not counted
        assert r["mir"] == pytest.approx(ref_mir, rel=1e-6)
        assert r["per_layer"]["fd"] == pytest.approx(ref_fd, rel=1e-6)


def test_moca_option_defaults_to_none_and_documents_the_detection():
    """``--moca`` is off unless given; its help says what happens to MoCa weights in MODEL_DIR
    (behaviour tested in tests/test_moca_integration.py)."""
    from mir_lightning.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate", "m"]).moca is None
    assert parser.parse_args(["evaluate", "m", "--moca", "ckpt.safetensors"]).moca == "ckpt.safetensors"
    subparsers = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(subparsers.choices["evaluate"].format_help().split())
    assert "--moca PATH" in text and "suggests --moca MODEL_DIR" in text


# ----------------------------------------------------------------------------- progress bars (issue 20 item 4)
BARS = ("Loading weights", "MIR:")  # transformers' weight loading, the measurement's own bar


@pytest.mark.parametrize("terminal, flags, shown", [
    (True, [], True),                   # a person watching: bars
    (True, ["--no-progress"], False),   # --no-progress also silences transformers' weight loading
    (False, [], False),                 # stdout/stderr redirected (CI, nohup, a log file): no bars
])
def test_progress_bars_follow_the_flag_and_the_terminal(terminal, flags, shown, model_dirs, capsys, monkeypatch):
    import mir_lightning.cli

    monkeypatch.setattr(mir_lightning.cli, "on_terminal", lambda: terminal)
    assert main(["evaluate", str(model_dirs["llava"]), "--num-samples", "2", "--batch-size", "2",
                 "--device", "cpu", *flags]) == 0
    err = capsys.readouterr().err
    assert all((bar in err) == shown for bar in BARS), err[-2000:]
    assert transformers.utils.logging.is_progress_bar_enabled()  # the switch is restored afterwards


def test_on_terminal_needs_both_streams(monkeypatch):
    from mir_lightning._progress import on_terminal

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    for out, err, expected in ((True, True, True), (False, True, False), (True, False, False)):
        monkeypatch.setattr(sys, "stdout", Stream(out))
        monkeypatch.setattr(sys, "stderr", Stream(err))
        assert on_terminal() is expected


def test_example_gguf_loading_has_no_bars_without_a_terminal(capsys, monkeypatch):
    """examples/lvlm.py loads the GGUF LLM with transformers' de-quantisation bar (its own tqdm)
    and the weight-loading bar: neither is drawn when the output is not a terminal."""
    sys.path.insert(0, str(REPO / "examples"))
    import lvlm
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def from_pretrained(*args, **kwargs):  # what transformers' GGUF loading draws, without the file
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        list(hf_logging.tqdm(range(3), desc="Loading weights"))
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(lvlm, "HFTokenizer", lambda tok: tok)
    for terminal, shown in ((False, False), (True, True)):
        monkeypatch.setattr("mir_lightning._progress.on_terminal", lambda: terminal)
        lvlm._load_gguf(REPO, "model.gguf")
        err = capsys.readouterr().err
        assert ("de-quantizing" in err) == shown and ("Loading weights" in err) == shown, err
