"""Shared helpers of the benchmarks: machine description, interleaved timing, tables and
synthetic LLM-like hidden states. Not part of the package."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

# Threads that wait at an OpenMP barrier sleep instead of spinning. On this shared 2-core
# machine, with 2 torch threads and other processes busy, the default spin-wait made one
# float64 eigvalsh(512) ~100x slower (8 s instead of 0.08 s) and the timings meaningless.
# Must be set before torch loads its OpenMP runtime: import this module before torch and numpy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS (numpy/scipy: the official "accurate" route) gets as many threads as torch
# (``--threads`` of the calling script, default 2), so that every comparison runs at equal
# thread counts; an OPENBLAS_NUM_THREADS in the environment wins. Must be set before numpy
# loads. (Under heavy load OpenBLAS's spin-waiting threads can be pathological, like OpenMP's
# above: run the official-route comparison on an otherwise idle machine.)


def _threads_argument(default: int = 2) -> int:
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if arg.startswith("--threads=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return default


os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_threads_argument()))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from anywhere without installing
    sys.path.insert(0, str(REPO))


def setup(threads: int = 2) -> None:
    """Fix the intra-op thread count (the machine has 2 shared cores)."""
    torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> str:
    """One line: CPU model, visible cores, torch/numpy/scipy versions, threads, load."""
    versions = {}
    for lib in ("numpy", "scipy"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:  # pragma: no cover
            versions[lib] = "n/a"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    line = (
        f"CPU: {cpu_model()} ({os.cpu_count()} visible cores) | torch {torch.__version__} | numpy {versions['numpy']} | "
        f"scipy {versions['scipy']} | torch threads {torch.get_num_threads()} | "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} | OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} | "
        f"load avg at start {load}"
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        line += f" | GPU: {torch.cuda.get_device_name()}"
    return line


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def time_call(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Wall seconds of one call (``sync`` before and after, e.g. torch.cuda.synchronize)."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def run_interleaved(
    methods: dict[str, Callable[[], object]],
    repeats: int | dict[str, int],
    sync: Callable[[], None] | None = None,
    warmup: bool = True,
    settle: float = 0.1,
) -> dict[str, list[float]]:
    """Time every method ``repeats`` times, interleaved: each round calls all methods once,
    in an order rotated from round to round (so slow drifts of the shared machine's load
    hit all methods alike); ``repeats`` may give a count per method (a method drops out of
    the later rounds once it has its count). One untimed warm-up call each when ``warmup``. Before each timed
    call the process sleeps ``settle`` seconds, so that the spinning worker threads of the
    previous call's library (OpenBLAS after scipy, OpenMP after torch) go idle and do not
    steal the 2 cores from the next method."""
    names = list(methods)
    if warmup:
        for name in names:
            methods[name]()
    counts = repeats if isinstance(repeats, dict) else {name: repeats for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(counts.values())):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if len(times[name]) >= counts[name]:
                continue
            gc.collect()
            if settle:
                time.sleep(settle)
            times[name].append(time_call(methods[name], sync))
    return times


def fmt(x: float, digits: int = 3) -> str:
    if x != x:  # NaN
        return "nan"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (strings as given, floats through :func:`fmt`)."""
    cells = [[fmt(c) if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(out)


class SyntheticLLM:
    """LLM-like hidden states of one model, both modalities, any layer.

    Every token is ``s_k * (offset + shift_m + z diag(sqrt(lam_m)) Q_m^T)`` with ``z`` standard
    normal: a large common offset (entries ~ N(0, offset^2) plus ``n_massive`` "massive"
    dimensions at +-``massive``, the residual-stream outlier features of real LLMs), a
    power-law spectrum ``lam_i ~ i^-alpha`` (mean 1) in a random orthonormal basis that
    differs between modalities, a vision mean shift, a vision spread ``vision_scale`` times
    wider, and a per-layer scale ``s_k = 1 + 0.25 k`` (the residual stream grows with depth).
    """

    def __init__(
        self,
        hidden_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        offset: float = 5.0,
        massive: float = 200.0,
        n_massive: int = 4,
        alpha_text: float = 1.0,
        alpha_vision: float = 1.3,
        vision_scale: float = 3.0,
        vision_shift: float = 1.0,
    ) -> None:
        self.D = d = int(hidden_size)
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        kw = dict(generator=self.gen, device=self.device, dtype=torch.float32)
        self.offset = torch.randn(d, **kw) * offset
        idx = torch.arange(min(n_massive, d), device=self.device) * max(1, d // max(1, n_massive))
        self.offset[idx] = massive * torch.where(torch.arange(idx.numel(), device=self.device) % 2 == 0, 1.0, -1.0)
        self.shift = {"text": torch.zeros(d, device=self.device), "vision": torch.randn(d, **kw) * vision_shift}
        self.factor = {}
        for m, alpha, scale in (("text", alpha_text, 1.0), ("vision", alpha_vision, vision_scale)):
            q, _ = torch.linalg.qr(torch.randn(d, d, **kw))
            lam = torch.arange(1, d + 1, device=self.device, dtype=torch.float32) ** -alpha
            lam *= d / lam.sum()
            self.factor[m] = (lam.sqrt() * scale)[:, None] * q.mT  # z @ factor: cov Q diag(lam) Q^T
        del q

    @staticmethod
    def layer_scale(layer: int) -> float:
        return 1.0 + 0.25 * layer

    def tokens(self, modality: str, n: int, layer: int) -> torch.Tensor:
        """``[n, D]`` float32 tokens of ``modality`` in ``layer``."""
        z = torch.randn(n, self.D, generator=self.gen, device=self.device, dtype=torch.float32)
        x = z @ self.factor[modality]
        x += self.offset + self.shift[modality]
        return x.mul_(self.layer_scale(layer))

    def near_identical_text(self, vision: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Text tokens almost distributed like ``vision``: ``(1+eps)`` times its spread about
        the offset plus ``eps`` times independent noise of another basis (so the two
        covariances do not commute). FD / (tr S_V + tr S_T) is then ~eps^2."""
        centre = vision.mean(0)
        z = torch.randn(vision.shape, generator=self.gen, device=self.device, dtype=torch.float32)
        noise = (z @ self.factor["text"]) * (eps * float(vision.std(0).mean()))
        return (vision - centre) * (1.0 + eps) + centre + noise


class ShapedStack(torch.nn.Module):
    """A stack with an LLM's width and depth but no weights worth the name, for probe
    benchmarks: layer k maps ``x`` to ``(x + shift_k) * (1 + 0.01 k)`` (``shift_k`` a fixed
    random ``[D]`` vector), so the probe's hooks see ``[B, T, D]`` hidden states that differ
    per layer at the cost of two element-wise ops. ``forward(inputs)``: ``[B, T, D]``."""

    class Layer(torch.nn.Module):
        def __init__(self, shift: torch.Tensor, scale: float) -> None:
            super().__init__()
            self.register_buffer("shift", shift)
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + self.shift) * self.scale

    def __init__(self, hidden_size: int, num_layers: int, seed: int = 0, device: str | torch.device = "cpu") -> None:
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        self.layers = torch.nn.ModuleList(
            self.Layer(torch.randn(hidden_size, generator=g, device=device), 1.0 + 0.01 * k) for k in range(num_layers)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            inputs = layer(inputs)
        return inputs


def shaped_probe_batches(llm: SyntheticLLM, n_batches: int = 4) -> list[dict[str, torch.Tensor]]:
    """Probe batches for :class:`ShapedStack`: ``1.25 D`` vision and ``1.5 D`` text tokens of
    ``llm`` in all, split over ``n_batches`` batches ``[1, T, D]`` with their masks."""
    nv, nt = -(-int(1.25 * llm.D) // n_batches), -(-int(1.5 * llm.D) // n_batches)
    batches = []
    for _ in range(n_batches):
        inputs = torch.cat([llm.tokens("vision", nv, 0), llm.tokens("text", nt, 0)])[None]
        vision = torch.zeros(1, nv + nt, dtype=torch.bool, device=inputs.device)
        vision[0, :nv] = True
        batches.append({"inputs": inputs, "vision_mask": vision, "text_mask": ~vision})
    return batches


def live_tensor_bytes(device: str | None = None) -> int:
    """Bytes of the distinct storages of every live tensor (found through ``gc``), on
    ``device`` (a type such as ``"cpu"``) or everywhere."""
    gc.collect()
    seen: dict[tuple[str, int], int] = {}
    with warnings.catch_warnings():  # (deprecated torch.distributed aliases warn when type-checked)
        warnings.simplefilter("ignore", FutureWarning)
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta or (device and obj.device.type != device):
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - half-built or fake tensors
            continue
        seen[(str(obj.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; psutil as fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return psutil.Process().memory_info().rss


def hwm_bytes() -> int:
    """Peak resident set size (VmHWM) of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs`` = 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so RSS reflects live data."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@contextlib.contextmanager
def timed_patches(acc: dict[str, float], targets: Sequence[tuple[object, str, str]]) -> Iterator[None]:
    """Within the block, every ``(owner, name, key)`` of ``targets`` is replaced by a wrapper
    that adds its wall time to ``acc[key]``; afterwards the originals are back (an instance
    attribute is dropped so that the class method shows again)."""
    patches = []
    for owner, name, key in targets:
        orig = getattr(owner, name)

        def timed(*a, _orig=orig, _key=key, **kw):
            t0 = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                acc[_key] = acc.get(_key, 0.0) + time.perf_counter() - t0

        had_own = name in getattr(owner, "__dict__", {})
        setattr(owner, name, timed)
        patches.append((owner, name, orig, had_own))
    try:
        yield
    finally:
        for owner, name, orig, had_own in reversed(patches):
            if isinstance(owner, type) or had_own or not hasattr(type(owner), name):
                setattr(owner, name, orig)
            else:
                delattr(owner, name)
