"""Peak memory of ``mir-lightning evaluate`` against ``--num-samples``.

    python benchmarks/bench_cli_memory.py                          # 16, 64, 160 samples
    python benchmarks/bench_cli_memory.py --compare-with /path/to/other/checkout

A tiny LLaVA model (tests/vlm_factory.py, built from a config, nothing downloaded) and a
folder of large generated JPEGs (768 x 768, what a user's photos look like; the processor
shrinks them to 32 px, so decoding them is what memory could grow with). Each row runs the
command (``mir_lightning.cli.main``, batch size 4, CPU, one thread) in a fresh subprocess
and reads its peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``): imports,
model, decoded images and metric state together. The ratio of the largest to the smallest
sample count says whether memory grows with the sample count (1.0 = flat).

``--compare-with PATH`` runs the same rows with ``PYTHONPATH=PATH`` as well (another
checkout of the package, e.g. an older commit), in the same process of this script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

WRAPPER = """
import resource, sys
import mir_lightning
from mir_lightning.cli import main
rc = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "RC", rc, "FROM", mir_lightning.__file__)
"""


def make_inputs(root: Path, n: int, size: int) -> tuple[Path, Path, Path]:
    """A tiny LLaVA checkpoint, ``n`` JPEGs of ``size`` px and ``n`` texts under ``root``."""
    import numpy as np
    from PIL import Image

    from vlm_factory import save_tiny_vlm

    model_dir = save_tiny_vlm("llava", root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([np.sin(2 * np.pi * (xx * (i % 7 + 1) + c)) for c in rng.random(3)], axis=-1)
        pixels = np.clip(127.5 * (1 + 0.7 * base) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img_{i:04d}.jpg", quality=90)
    texts = root / "texts.txt"
    texts.write_text("\n".join(f"sample {i}: a short caption about a striped pattern" for i in range(n)) + "\n")
    return model_dir, images, texts


def peak_rss_mb(pythonpath: Path, model_dir: Path, images: Path, texts: Path, n: int, batch: int) -> tuple[float, float]:
    """Peak RSS (MB) and wall time (s) of one run of the command in a fresh subprocess."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    argv = ["evaluate", str(model_dir), "--images", str(images), "--texts", str(texts), "--num-samples", str(n),
            "--batch-size", str(batch), "--device", "cpu", "--no-progress"]
    start = time.perf_counter()
    # cwd: not a checkout (``python -c`` puts the working directory before PYTHONPATH)
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env,
                          cwd=model_dir.parent, timeout=1800)
    seconds = time.perf_counter() - start
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_KB")]
    if proc.returncode != 0 or not line or " RC 0 " not in line[-1]:
        raise RuntimeError(f"the command failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    loaded_from = Path(line[-1].split(" FROM ")[1])
    if not loaded_from.is_relative_to(pythonpath):
        raise RuntimeError(f"the run imported {loaded_from}, not the package under {pythonpath}")
    return int(line[-1].split()[1]) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64, 160])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=768, help="JPEG side in pixels (default 768)")
    parser.add_argument("--compare-with", type=Path, help="another checkout to run the same rows with")
    args = parser.parse_args()
    args.samples = sorted(set(args.samples))
    import torch

    versions = [("this checkout", REPO)] + ([("compared", args.compare_with.resolve())] if args.compare_with else [])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, images, texts = make_inputs(Path(tmp), max(args.samples), args.size)
        print(f"# mir-lightning evaluate peak RSS: tiny LLaVA, {args.size} px JPEGs, batch {args.batch_size}, CPU, "
              f"1 thread | torch {torch.__version__} | {os.cpu_count()} cores")
        print("| code | samples | peak RSS (MB) | wall (s) |")
        print("|---|---|---|---|")
        for name, path in versions:
            peaks = []
            for n in args.samples:
                mb, seconds = peak_rss_mb(path, model_dir, images, texts, n, args.batch_size)
                peaks.append(mb)
                print(f"| {name} ({path}) | {n} | {mb:.0f} | {seconds:.1f} |", flush=True)
            print(f"| {name}: ratio {max(args.samples)} / {min(args.samples)} samples | | "
                  f"**{peaks[-1] / peaks[0]:.2f}x** (+{peaks[-1] - peaks[0]:.0f} MB) | |", flush=True)


if __name__ == "__main__":
    main()
