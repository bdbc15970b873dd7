"""Tiny random-initialised Hugging Face VLMs for tests (no downloads).

``make_tiny_vlm(family)`` returns ``(model, make_inputs)`` where
``make_inputs(batch_size, n_text, padding_side="right", seed=0) -> dict`` builds a batch
that the model accepts: per row ``BOS, PREFIX_LEN prefix tokens, the image tokens, text``,
with ``n_text + row`` text tokens in row ``row`` (so rows differ in length and padding
shows up on the chosen side). ``model.config`` carries the image token id.

All families share one tiny vocabulary (``VOCAB_SIZE`` ids); the special ids below are
fixed so that tests can build a matching tokenizer (see :func:`make_tiny_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VOCAB_SIZE = 128
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
IMAGE_TOKEN_ID = 100
VISION_START_ID = 101  # Qwen2-VL <|vision_start|>
VISION_END_ID = 102  # Qwen2-VL <|vision_end|>
VIDEO_TOKEN_ID = 103  # Qwen2-VL <|video_pad|>
BOI_ID = 104  # Gemma 3 <start_of_image>
EOI_ID = 105  # Gemma 3 <end_of_image>
FAKE_IMAGE_ID = 106  # Idefics3 <fake_token_around_image>
GLOBAL_IMG_ID = 107  # Idefics3 <global-img>
FIRST_WORD_ID = 8  # ids [FIRST_WORD_ID, IMAGE_TOKEN_ID) are ordinary text tokens
PREFIX_LEN = 2  # text tokens placed before the image (a "system prompt")
HIDDEN = 64
NUM_LAYERS = 3

FAMILIES = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
)

MakeInputs = Callable[..., dict[str, torch.Tensor]]


def _text_config(model_type: str = "llama", **extra: Any) -> dict[str, Any]:
    """A tiny decoder config (hidden ``HIDDEN``, ``NUM_LAYERS`` layers); ``extra`` overrides."""
    cfg = dict(
        model_type=model_type,
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    cfg.update(extra)
    return cfg


def _vision_config(model_type: str | None, image_size: int = 32, patch_size: int = 8, **extra: Any) -> dict[str, Any]:
    """A tiny CLIP/SigLIP-style vision tower config (2 layers, hidden 32); no ``model_type``
    key when it is None (the family's own vision config class is used)."""
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=image_size, patch_size=patch_size, **extra)
    return cfg if model_type is None else {"model_type": model_type, **cfg}


def make_tiny_config(family: str) -> Any:
    """A tiny config of ``family`` (hidden 64, ``NUM_LAYERS`` decoder layers, small vision tower)."""
    import transformers as tf

    if family == "llava":
        return tf.LlavaConfig(
            vision_config=_vision_config("clip_vision_model", projection_dim=32),
            text_config=_text_config(),
            image_token_index=IMAGE_TOKEN_ID,
            image_seq_length=16,
            vision_feature_layer=-1,
        )
    if family == "llava_next":
        return tf.LlavaNextConfig(
            vision_config=_vision_config("clip_vision_model", projection_dim=32),
            text_config=_text_config(),
            image_token_index=IMAGE_TOKEN_ID,
            image_grid_pinpoints=[[32, 32]],
            image_seq_length=36,
            vision_feature_layer=-1,
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        is25 = family == "qwen2_5_vl"
        text = _text_config(
            "qwen2_5_vl_text" if is25 else "qwen2_vl_text",
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        if is25:
            vision.update(intermediate_size=64, out_hidden_size=HIDDEN, window_size=16, fullatt_block_indexes=[1])
            cls = tf.Qwen2_5_VLConfig
        else:
            vision.update(embed_dim=32, mlp_ratio=2)
            vision["hidden_size"] = HIDDEN  # Qwen2-VL: merger output size
            cls = tf.Qwen2VLConfig
        return cls(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=VIDEO_TOKEN_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
        )
    if family in ("idefics3", "smolvlm"):
        cls = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        vision = _vision_config(None)
        return cls(
            vision_config=vision,
            text_config=_text_config(),
            image_token_id=IMAGE_TOKEN_ID,
            scale_factor=2,
            pad_token_id=PAD_ID,
        )
    if family == "paligemma":
        return tf.PaliGemmaConfig(
            vision_config=_vision_config("siglip_vision_model"),
            text_config=_text_config("gemma", head_dim=16),
            image_token_index=IMAGE_TOKEN_ID,
            vocab_size=VOCAB_SIZE,
            projection_dim=HIDDEN,
            hidden_size=HIDDEN,
        )
    if family == "gemma3":
        return tf.Gemma3Config(
            vision_config=_vision_config("siglip_vision_model"),
            text_config=_text_config("gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
            mm_tokens_per_image=4,
            image_token_index=IMAGE_TOKEN_ID,
            boi_token_index=BOI_ID,
            eoi_token_index=EOI_ID,
        )
    raise KeyError(f"unknown family {family!r}; known: {FAMILIES}")


# Image tokens per image for the configs above.
IMAGE_TOKENS = {
    "llava": 16,  # (32/8)^2 patches (CLS dropped)
    "llava_next": 36,  # base 16 + one 4x4 tile + 4 newlines
    "qwen2_vl": 4,  # 4x4 patches merged 2x2
    "qwen2_5_vl": 4,
    "idefics3": 4,  # 16 patches, pixel shuffle by 2
    "smolvlm": 4,
    "paligemma": 16,
    "gemma3": 4,  # mm_tokens_per_image
}


_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


def hf_llava_splices() -> bool:
    """Whether the installed transformers' HF LLaVA splices one ``<image>`` token per image into
    its features (before 4.44) rather than expecting expanded image tokens."""
    import transformers as tf

    return hasattr(tf.LlavaForConditionalGeneration, "_merge_input_ids_with_image_features") and not hasattr(
        tf.LlavaConfig(), "image_seq_length")


def model_class(family: str) -> type:
    """The ``...ForConditionalGeneration`` class of ``family``; the calling test is skipped when
    the installed transformers has no such class (older versions, e.g. 4.37 has LLaVA only)."""
    import pytest
    import transformers as tf

    name = _MODEL_CLASSES[family]
    cls = getattr(tf, name, None)
    if cls is None:
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    if family == "llava" and hf_llava_splices():
        # before 4.44 the HF LLaVA forward splices one <image> token into the image features
        # (the original LLaVA's layout, tested in tests/test_llava_codebase.py and
        # tests/test_hf_llava_splice.py): rows with an expanded image span do not fit it
        pytest.skip(f"transformers {tf.__version__}: HF LLaVA splices one <image> token per image")
    return cls


def pixel_inputs(family: str, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random pixel inputs for one image per row, in the layout ``family``'s forward expects."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if family in ("llava", "paligemma", "gemma3"):
        return {"pixel_values": rand(batch_size, 3, 32, 32)}
    if family == "llava_next":
        return {
            "pixel_values": rand(batch_size, 2, 3, 32, 32),  # base image + one tile
            "image_sizes": torch.tensor([[32, 32]] * batch_size),
        }
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # grid 1 x 4 x 4 patches of 3 * 2 * 4 * 4 values per image
        return {
            "pixel_values": rand(batch_size * 16, 3 * 2 * 4 * 4),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * batch_size),
        }
    if family in ("idefics3", "smolvlm"):
        return {"pixel_values": rand(batch_size, 1, 3, 32, 32)}
    raise KeyError(family)


def build_token_rows(
    family: str, batch_size: int, n_text: int, generator: torch.Generator | None = None
) -> list[list[int]]:
    """Unpadded token rows: ``BOS, prefix, [image span], text`` with ``n_text + row`` text tokens."""
    n_img = IMAGE_TOKENS[family]
    rows: list[list[int]] = []
    for r in range(batch_size):
        words = torch.randint(FIRST_WORD_ID, IMAGE_TOKEN_ID, (PREFIX_LEN + n_text + r,), generator=generator)
        words = words.tolist()
        prefix, text = words[:PREFIX_LEN], words[PREFIX_LEN:]
        image = [IMAGE_TOKEN_ID] * n_img
        if family in ("qwen2_vl", "qwen2_5_vl"):
            image = [VISION_START_ID, *image, VISION_END_ID]
        elif family == "gemma3":
            image = [BOI_ID, *image, EOI_ID]
        elif family in ("idefics3", "smolvlm"):
            image = [FAKE_IMAGE_ID, GLOBAL_IMG_ID, *image, FAKE_IMAGE_ID]
        rows.append([BOS_ID, *prefix, *image, *text])
    return rows


def pad_rows(rows: list[list[int]], padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows with ``PAD_ID``; returns ``(input_ids, attention_mask)``, int64 ``[B, T]``."""
    if padding_side not in ("left", "right"):
        raise ValueError(padding_side)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(length - len(r), length)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def extra_inputs(family: str, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Family-specific token-type inputs (Qwen2-VL ``mm_token_type_ids``, Gemma ``token_type_ids``)."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return {"mm_token_type_ids": (input_ids == IMAGE_TOKEN_ID).long()}
    if family in ("gemma3", "paligemma"):
        return {"token_type_ids": (input_ids == IMAGE_TOKEN_ID).long()}
    return {}


def make_tiny_vlm(family: str, seed: int = 0) -> tuple[torch.nn.Module, MakeInputs]:
    """Build a tiny random ``family`` VLM in eval mode, and a batch maker for it.

    Returns:
        ``(model, make_inputs)``; ``make_inputs(batch_size, n_text, padding_side="right",
        seed=0)`` returns a dict with ``input_ids`` / ``attention_mask`` (int64 ``[B, T]``),
        pixel inputs and any family-specific extras, ready for ``model(**inputs)``.
    """
    torch.manual_seed(seed)
    model = model_class(family)(make_tiny_config(family)).eval()

    def make_inputs(
        batch_size: int, n_text: int, padding_side: str = "right", seed: int = 0
    ) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        rows = build_token_rows(family, batch_size, n_text, gen)
        input_ids, attention_mask = pad_rows(rows, padding_side)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update(pixel_inputs(family, batch_size, gen))
        batch.update(extra_inputs(family, input_ids))
        return batch

    return model, make_inputs


def make_tiny_causal_lm(seed: int = 0) -> torch.nn.Module:
    """A tiny random ``LlamaForCausalLM`` (hidden 64, ``NUM_LAYERS`` layers) in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _text_config()
    cfg.pop("model_type")
    return tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()


# ----------------------------------------------------------------------------- processors
# A character-level vocabulary: every character below is one token.
CHARS = (
    " \n"
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,;:!?'\"-()/&%$#@*+=<>[]_|~"
)
IMAGE_TOKEN_STRINGS = {"qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "gemma3": "<image_soft_token>"}
# What a prompt writes where the image goes (the processor expands it into image tokens).
PROMPT_IMAGE_STRINGS = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
}
SYSTEM_PROMPT = "A chat between a curious user and an assistant. USER: "
# Families whose processor builds offline here (Qwen2-VL and SmolVLM processors need a
# video processor, which needs torchvision).
PROCESSOR_FAMILIES = ("llava", "llava_next", "idefics3", "paligemma", "gemma3")


def chat_template_for(family: str) -> str:
    """A tiny Jinja chat template: system prefix, then the user's image and text, then ``ASSISTANT:``."""
    image = PROMPT_IMAGE_STRINGS.get(family, "<image>")
    return (
        SYSTEM_PROMPT.replace("'", "")
        + "{% for m in messages %}{% for c in m['content'] %}"
        + "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        + "{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )


def make_tiny_tokenizer(family: str) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` whose special ids match the constants above."""
    import transformers as tf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID, "<unk>": 3, "<|im_start|>": 4, "<|im_end|>": 5,
             "<end_of_utterance>": 6, "<start_of_turn>": 7}
    for i, ch in enumerate(CHARS):
        vocab[ch] = FIRST_WORD_ID + i
    assert FIRST_WORD_ID + len(CHARS) <= IMAGE_TOKEN_ID
    specials = {
        IMAGE_TOKEN_STRINGS.get(family, "<image>"): IMAGE_TOKEN_ID,
        "<|vision_start|>": VISION_START_ID,
        "<|vision_end|>": VISION_END_ID,
        "<|video_pad|>": VIDEO_TOKEN_ID,
        "<start_of_image>": BOI_ID,
        "<end_of_image>": EOI_ID,
        "<fake_token_around_image>": FAKE_IMAGE_ID,
        "<global-img>": GLOBAL_IMG_ID,
    }
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    extra: dict[str, Any] = {}
    if family == "gemma3":
        extra["extra_special_tokens"] = {
            "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"
        }
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", **extra
    )
    fast.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<start_of_turn>", *specials]}
    )
    return fast


def make_tiny_processor(family: str, chat_template: bool = True) -> Any:
    """A processor matching :func:`make_tiny_config` (32 px images), built offline."""
    import transformers as tf

    tok = make_tiny_tokenizer(family)
    template = chat_template_for(family) if chat_template else None
    if family in ("llava", "llava_next"):
        if family == "llava":
            ip = tf.LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            cls = tf.LlavaProcessor
        else:
            ip = tf.LlavaNextImageProcessorPil(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]]
            )
            cls = tf.LlavaNextProcessor
        return cls(
            image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=template,
        )
    if family == "idefics3":
        ip = tf.Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
        )
        return tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
    if family == "paligemma":
        ip = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
        ip.image_seq_length = 16
        return tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    if family == "gemma3":
        ip = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        return tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=template)
    raise NotImplementedError(f"no offline processor for {family!r} (needs torchvision); have {PROCESSOR_FAMILIES}")


def save_tiny_vlm(family: str, path: Any, chat_template: bool = True, seed: int = 0) -> Any:
    """Save a tiny ``family`` model and its processor to ``path`` (``save_pretrained``); returns ``path``."""
    model, _ = make_tiny_vlm(family, seed=seed)
    model.save_pretrained(path)
    make_tiny_processor(family, chat_template=chat_template).save_pretrained(path)
    return path
