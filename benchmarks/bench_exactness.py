"""Exactness of the streaming metric at evaluation-set scale, against a float64 reference.

Beyond ``median_buffer`` tokens per layer and modality the per-dimension median (which
replaces outlier rows) comes from a histogram, and beyond ``norm_buffer`` the median norm
does too. This script measures the relative error of the FD sum against an independent
float64 implementation of the spec (tests/reference.py: numpy + scipy.linalg.sqrtm) on
hard data, with the metric fed in random batches, and prints the worst case.

    python benchmarks/bench_exactness.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from reference import reference_mir  # noqa: E402

from mir_lightning import ModalityIntegrationRate  # noqa: E402


def make_tokens(kind: str, samples: int, n_vis: int, n_txt: int, dim: int, layers: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(-1.5, 0.5, dim, dtype=torch.float64)
    vis_layers, txt_layers = [], []
    for _ in range(layers):
        rot = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
        common = 100.0 * torch.randn(dim, generator=g, dtype=torch.float64)

        def draw(n):
            if kind == "heavy_tailed":
                # Student t, 3 degrees of freedom: normal / sqrt(chi-square(3) / 3), from the seeded generator
                chi2 = torch.randn(3, n, dim, generator=g, dtype=torch.float64).square().sum(0)
                z = torch.randn(n, dim, generator=g, dtype=torch.float64) / (chi2 / 3.0).sqrt()
            else:
                z = torch.randn(n, dim, generator=g, dtype=torch.float64)
            return (z * spectrum) @ rot.T + common

        vis = draw(samples * n_vis) * 1.5 + 2.0 * torch.randn(dim, generator=g, dtype=torch.float64)
        txt = draw(samples * n_txt)
        massive = {"massive_1pct": 1, "massive_8pct": 5}.get(kind, 1)
        median_norm = txt.norm(dim=1).median()
        for s in range(samples):  # attention-sink-like tokens in each sample's image span
            vis[s * n_vis:s * n_vis + massive, :3] += 150.0 * median_norm
        if kind == "drift":  # each sample shifted: the first rows do not represent the rest
            shift = torch.linspace(-3, 3, samples, dtype=torch.float64)
            vis += shift.repeat_interleave(n_vis)[:, None] * spectrum
            txt += shift.repeat_interleave(n_txt)[:, None] * spectrum
        if kind == "bf16":
            vis, txt = vis.to(torch.bfloat16).double(), txt.to(torch.bfloat16).double()
        vis_layers.append(vis)
        txt_layers.append(txt)
    return vis_layers, txt_layers


def stream(vis_layers, txt_layers, samples, seed, **kwargs):
    layers, dim = len(vis_layers), vis_layers[0].shape[1]
    n_vis, n_txt = vis_layers[0].shape[0] // samples, txt_layers[0].shape[0] // samples
    metric = ModalityIntegrationRate(layers, dim, **kwargs)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed)).tolist()
    batch = 4
    for start in range(0, samples, batch):
        rows = order[start:start + batch]
        hidden = torch.zeros(layers, len(rows), n_vis + n_txt, dim, dtype=torch.float64)
        for k in range(layers):
            for b, s in enumerate(rows):
                hidden[k, b, :n_vis] = vis_layers[k][s * n_vis:(s + 1) * n_vis]
                hidden[k, b, n_vis:] = txt_layers[k][s * n_txt:(s + 1) * n_txt]
        vmask = torch.zeros(len(rows), n_vis + n_txt, dtype=torch.bool)
        vmask[:, :n_vis] = True
        metric.update(hidden, vmask, ~vmask)
    return metric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    samples, n_vis, n_txt, dim, layers = (40, 32, 48, 96, 2) if args.quick else (100, 64, 96, 256, 3)
    kinds = ["massive_1pct", "massive_8pct", "heavy_tailed", "drift", "bf16"]
    print(f"{samples} samples x ({n_vis} vision + {n_txt} text) tokens, D={dim}, {layers} layers; "
          f"{samples * n_vis} vision / {samples * n_txt} text tokens per layer (default buffers: median 512, norm 262144)")
    print(f"{'data':<14}{'outliers V/T':>14}{'rel.err exact-median':>22}{'rel.err default':>18}{'rel.err sigma=None':>20}")
    worst = 0.0
    for kind in kinds:
        vis, txt = make_tokens(kind, samples, n_vis, n_txt, dim, layers, seed=1)
        t0 = time.perf_counter()
        ref_on, _, ref_layers = reference_mir(vis, txt, 3.0)
        ref_off, _, _ = reference_mir(vis, txt, None)
        errors = []
        for kwargs, ref in (({"median_buffer": samples * (n_vis + n_txt)}, ref_on), ({}, ref_on), ({"outlier_sigma": None}, ref_off)):
            metric = stream(vis, txt, samples, seed=2, **kwargs)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fd_sum = float(metric.per_layer_fd().sum())
            errors.append(abs(fd_sum / 10**ref - 1))
        worst = max(worst, errors[1])
        outliers = f"{sum(d['outliers_vision'] for d in ref_layers)}/{sum(d['outliers_text'] for d in ref_layers)}"
        print(f"{kind:<14}{outliers:>14}{errors[0]:>22.2e}{errors[1]:>18.2e}{errors[2]:>20.2e}   ({time.perf_counter() - t0:.1f} s)")
    print(f"worst relative FD-sum error with default (histogram) medians: {worst:.2e}  (target 1e-4, never 1e-3)")


if __name__ == "__main__":
    main()
