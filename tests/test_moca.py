"""MoCa (mir_lightning.moca) on a tiny Hugging Face LLaVA, against hand computations."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from mir_lightning import ModalityIntegrationRate  # noqa: E402
from mir_lightning.capture import LayerCapture  # noqa: E402
from mir_lightning.integrations.transformers import (  # noqa: E402
    find_decoder_layers,
    find_final_norm,
    find_hidden_state_modules,
)
from mir_lightning.moca import MoCa, load_moca_state  # noqa: E402

from lightning_helpers import official_masks  # noqa: E402
from moca_ddp_script import ddp_batch, ddp_worker, train, trainable  # noqa: E402
from reference import reference_from_hidden  # noqa: E402
from vlm_factory import (  # noqa: E402
    FAMILIES,
    HIDDEN,
    IMAGE_TOKEN_ID,
    NUM_LAYERS,
    make_tiny_causal_lm,
    make_tiny_vlm,
    model_class,
)


@pytest.fixture()
def llava():
    model, make_inputs = make_tiny_vlm("llava")
    return model, make_inputs(3, 5)


def _layer_inputs(model: torch.nn.Module, batch: dict) -> tuple[list[torch.Tensor], object]:
    """What each decoder layer after the first, and the final norm, receive as their input
    (i.e. the outputs of layers 0 .. K-1 after every hook), and the model's outputs."""
    receivers = [*list(find_decoder_layers(model))[1:], find_final_norm(model)]
    seen: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in receivers]
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def test_attach_registers_parameters_and_is_identity_at_init(llava):
    model, batch = llava
    with torch.no_grad():
        before = model(**batch, output_hidden_states=True)
    moca = MoCa.attach(model)
    assert model.moca is moca
    assert moca.scale.shape == moca.shift.shape == (NUM_LAYERS, HIDDEN)
    assert moca.scale.dtype == moca.shift.dtype == torch.float32
    assert torch.equal(moca.scale, torch.ones(NUM_LAYERS, HIDDEN))
    assert torch.equal(moca.shift, torch.zeros(NUM_LAYERS, HIDDEN))
    params = dict(model.named_parameters())
    assert params["moca.scale"] is moca.scale and params["moca.shift"] is moca.shift
    state = model.state_dict()
    assert torch.equal(state["moca.scale"], moca.scale) and torch.equal(state["moca.shift"], moca.shift)
    # an optimizer built afterwards holds them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(moca.scale), id(moca.shift)} <= held
    with torch.no_grad():
        after = model(**batch, output_hidden_states=True)
    assert torch.equal(after.logits, before.logits)
    for a, b in zip(after.hidden_states, before.hidden_states):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_layer_vision_outputs_are_scaled_and_shifted(llava, dtype):
    model, batch = llava
    model = model.to(dtype)
    raw, _ = _layer_inputs(model, batch)  # without MoCa: layer 0's output as layer 1 receives it
    moca = MoCa.attach(model)
    assert moca.scale.dtype == torch.float32  # the map is computed in float32 for any model dtype
    with torch.no_grad():
        moca.scale.fill_(1.5)
        moca.shift.fill_(0.25)
    calibrated, out = _layer_inputs(model, batch)
    vision = batch["input_ids"] == IMAGE_TOKEN_ID
    assert int(vision.sum()) == 3 * 16
    h, got = raw[0], calibrated[0]
    assert got.dtype == dtype
    expected = 1.5 * h[vision].double() + 0.25  # by hand, in float64
    # float32: two roundings (product, sum); bfloat16: the float32 result rounded to 8 bits.
    # Measured max error 0.50 eps * |expected| for both dtypes; bound 2 eps * |expected|. Here
    # |expected| < 0.4, so the bound is < 0.0063 (bfloat16) and a missing shift (0.25) fails.
    eps = torch.finfo(dtype).eps
    error = (got[vision].double() - expected).abs()
    assert bool((error <= 2 * eps * expected.abs()).all()), float((error / expected.abs()).max())
    assert float(expected.abs().max()) < 0.4
    # text, system prompt and padding positions: bit for bit what layer 0 produced
    assert torch.equal(got[~vision], h[~vision])
    assert bool((~batch["attention_mask"].bool()).any())  # the batch does contain padding
    # MoCa's hooks run first, so transformers' output_hidden_states records calibrated values
    assert torch.equal(out.hidden_states[1], got)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_family_is_found_and_calibrated(family):
    """Layers, image token and hidden size found automatically; a shift of 0.25 reaches
    exactly the image-token positions of what the second decoder layer receives."""
    try:
        model, make_inputs = make_tiny_vlm(family)
    except (AttributeError, ImportError) as exc:  # family missing in this transformers
        pytest.skip(f"{family} unavailable: {exc}")
    batch = make_inputs(2, 3, padding_side="left")
    raw, _ = _layer_inputs(model, batch)
    moca = MoCa.attach(model)
    assert moca.scale.shape == (NUM_LAYERS, HIDDEN)
    with torch.no_grad():
        moca.shift.fill_(0.25)
    calibrated, _ = _layer_inputs(model, batch)
    vision = batch["input_ids"] == IMAGE_TOKEN_ID
    assert torch.equal(calibrated[0][~vision], raw[0][~vision])
    # one float32 rounding of the sum: <= eps/2 * |value|; bound eps * |value| (< 1e-6 here, as
    # |value| < 8), while a missing shift is 0.25 off
    expected = raw[0][vision].double() + 0.25
    error = (calibrated[0][vision].double() - expected).abs()
    assert bool((error <= torch.finfo(torch.float32).eps * expected.abs()).all())
    assert float(expected.abs().max()) < 8


def test_gradients_reach_scale_and_shift_as_derived_by_hand(llava):
    """At init (identity) the last layer's calibration gives, with x the final norm's input
    and g = dL/dx: dL/dshift[K-1] = sum of g over vision rows, dL/dscale[K-1] = sum of g * x."""
    model, batch = llava
    moca = MoCa.attach(model)
    norm = find_final_norm(model)
    seen = {}

    def keep_input(_module, args):
        args[0].retain_grad()
        seen["x"] = args[0]

    handle = norm.register_forward_pre_hook(keep_input)
    try:
        out = model(**batch)
        loss = out.logits.float().pow(2).mean()
        loss.backward()
    finally:
        handle.remove()
    x, g = seen["x"].detach().double(), seen["x"].grad.double()
    vision = batch["input_ids"] == IMAGE_TOKEN_ID
    expected_shift = g[vision].sum(0)
    expected_scale = (g * x)[vision].sum(0)
    # float32 autograd vs float64 sums of the same float32 gradients: measured max difference
    # 6e-8 of the largest entry; 1e-5 leaves > 100x margin and still fails on a missing or
    # extra position (one vision row alone is 3e-2 of the largest entry)
    for got, want in ((moca.shift.grad[-1], expected_shift), (moca.scale.grad[-1], expected_scale)):
        assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    for k in range(NUM_LAYERS):
        assert float(moca.scale.grad[k].abs().max()) > 0 and float(moca.shift.grad[k].abs().max()) > 0


def test_gradients_equal_with_activation_checkpointing(llava):
    """transformers checkpoints a layer's forward, not its hooks: MoCa runs once per layer
    and the recomputation in backward needs no vision mask."""
    model, batch = llava
    moca = MoCa.attach(model)
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert all(layer.gradient_checkpointing for layer in find_decoder_layers(model))
        moca.zero_grad()
        model(**batch).logits.float().pow(2).mean().backward()
        grads.append((moca.scale.grad.clone(), moca.shift.grad.clone()))
    # the same float32 operations in the same order: measured equal bit for bit
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert float(grads[0][1].abs().min()) > 0


def test_remove_restores_the_model_bit_for_bit(llava):
    model, batch = llava
    with torch.no_grad():
        before = model(**batch, output_hidden_states=True)
    # counted after a forward: transformers installs its output recorders on the first one
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    moca = MoCa.attach(model)
    with torch.no_grad():
        moca.scale.uniform_(0.5, 2.0)
        moca.shift.normal_(0.0, 0.5)
        changed = model(**batch).logits
    assert not torch.equal(changed, before.logits)
    moca.remove()
    moca.remove()  # a second call does nothing
    assert not hasattr(model, "moca")
    assert not any(k.startswith("moca") for k in model.state_dict())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks_before
    with torch.no_grad():
        after = model(**batch, output_hidden_states=True)
    assert torch.equal(after.logits, before.logits)
    for a, b in zip(after.hidden_states, before.hidden_states):
        assert torch.equal(a, b)


def test_checkpoints_round_trip(llava, tmp_path):
    """save_pretrained keeps moca.*; from_pretrained drops it (unexpected keys), and
    load_moca_state + attach gives the trained model back; Lightning-style files work too."""
    model, batch = llava
    moca = MoCa.attach(model)
    with torch.no_grad():
        moca.scale.uniform_(0.5, 2.0)
        moca.shift.normal_(0.0, 0.5)
        trained = model(**batch).logits
    model.save_pretrained(tmp_path / "hf")
    reloaded = model_class("llava").from_pretrained(tmp_path / "hf").eval()
    assert not hasattr(reloaded, "moca")
    MoCa.attach(reloaded).load_state_dict(load_moca_state(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)
    lightning_style = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(lightning_style, tmp_path / "last.ckpt")
    state = load_moca_state(tmp_path / "last.ckpt")
    assert torch.equal(state["scale"], moca.scale) and torch.equal(state["shift"], moca.shift)
    moca.remove()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(KeyError, match="MoCa parameters"):
        load_moca_state(tmp_path / "plain.pt")


def test_attaching_twice_raises(llava):
    model, _ = llava
    MoCa.attach(model)
    with pytest.raises(RuntimeError, match="already has MoCa"):
        MoCa.attach(model)
    wrapper = torch.nn.ModuleDict({"vlm": model})
    with pytest.raises(RuntimeError, match="already has MoCa"):
        MoCa.attach(wrapper)
    model.moca.remove()
    MoCa.attach(wrapper)  # on a wrapper: the inner model's layers are hooked once only
    with pytest.raises(RuntimeError, match="already calibrated"):
        MoCa.attach(model)


def test_clear_errors_when_the_vision_mask_cannot_be_found(llava):
    model, batch = llava
    MoCa.attach(model)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        with pytest.raises(RuntimeError, match="ran outside LlavaForConditionalGeneration.forward"):
            model.model.language_model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="image_token_id"):
        MoCa.attach(make_tiny_causal_lm())  # no image token in a plain LM's config


def test_given_layers_and_vision_mask_function(llava):
    """``layers=`` and ``vision_mask=``: only the chosen layer and positions change."""
    model, batch = llava
    raw, _ = _layer_inputs(model, batch)
    chosen = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    chosen[:, 1:3] = True  # two prefix (text) positions, an arbitrary choice
    moca = MoCa.attach(model, layers=[find_decoder_layers(model)[1]], vision_mask=lambda inputs: chosen)
    assert moca.scale.shape == (1, HIDDEN)
    with torch.no_grad():
        moca.shift.fill_(0.25)
    calibrated, _ = _layer_inputs(model, batch)
    assert torch.equal(calibrated[0], raw[0])  # layer 0 not hooked
    out1 = calibrated[1]
    h1 = raw[1]  # layer 1's input is unchanged, so its own output before MoCa is raw[1]
    assert torch.equal(out1[~chosen], h1[~chosen])
    torch.testing.assert_close(out1[chosen], h1[chosen] + 0.25, rtol=0, atol=1e-6)


def test_generation_uses_the_calibrated_cache(llava):
    """Greedy generation with the KV cache equals full forwards of the growing sequence."""
    model, _ = llava
    _, make_inputs = make_tiny_vlm("llava")
    batch = make_inputs(1, 5)
    moca = MoCa.attach(model)
    with torch.no_grad():
        moca.scale.uniform_(0.5, 2.0)
        moca.shift.normal_(0.0, 0.5)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        ids = batch["input_ids"]
        for _ in range(3):
            full = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
            next_id = model(**full).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("capture_first", [True, False])
def test_mir_from_layer_capture_sees_calibrated_states(capture_first):
    """ModalityIntegrationRate fed by LayerCapture hooks, registered before or after MoCa,
    equals the float64 reference on the states the next layers receive."""
    model, make_inputs = make_tiny_vlm("llava")
    batch = make_inputs(6, 20)
    vision, text = official_masks(batch)
    modules = find_hidden_state_modules(model)
    metric = ModalityIntegrationRate(len(modules), HIDDEN)
    capture = LayerCapture(modules)

    def sink(k, hidden):
        metric.update_layer(k, hidden, vision, text)

    if capture_first:
        capture.attach(sink)
    moca = MoCa.attach(model)
    if not capture_first:
        capture.attach(sink)
    with torch.no_grad():
        moca.scale.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
        moca.shift.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    capture.active = True
    received, out = _layer_inputs(model, batch)  # the first forward: transformers' recorders come after MoCa
    capture.detach()
    for recorded, seen in zip(out.hidden_states[1:-1], received[:-1]):
        assert torch.equal(recorded, seen)
    norm = find_final_norm(model)
    with torch.no_grad():
        hidden = [*received[:-1], norm(received[-1])]  # hidden_states[1:] convention: last after the norm
    _, ref_fd, _ = reference_from_hidden(hidden, vision, text)
    # measured: metric vs reference agree to 4e-16 relative per layer; rtol 1e-9; the FD of
    # the uncalibrated states differs by > 10% in every layer (checked below; measured > 80%)
    got_fd = metric.per_layer_fd().double().numpy()
    assert np.allclose(got_fd, ref_fd, rtol=1e-9, atol=0), (got_fd, ref_fd)
    moca.remove()
    raw, _ = _layer_inputs(model, batch)
    with torch.no_grad():
        _, raw_fd, _ = reference_from_hidden([*raw[:-1], norm(raw[-1])], vision, text)
    assert np.all(np.abs(raw_fd / ref_fd - 1) > 0.1), (raw_fd, ref_fd)


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_trains_moca_like_one_process(tmp_path):
    world = 2
    model_class("llava")  # skips here, not in the workers, where the installed LLaVA cannot run the test
    # the workers live in a small module so that the spawned processes import little
    mp.spawn(ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    model, _ = make_tiny_vlm("llava")
    moca = MoCa.attach(model)
    train(model, ddp_batch(), trainable(model))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, single in moca.state_dict().items():
        moved = float((single - (1.0 if name == "scale" else 0.0)).abs().max())
        for got in ranks:
            # measured: max |2 ranks - 1 process| 2.4e-7 after 3 steps (float32 sums in another
            # order), while parameters moved by 0.1 (scale) and 3.7 (shift) and a rank training
            # on its half alone (no gradient all-reduce) ends 0.036 / 0.51 away: 1e-5 separates them
            assert float((got[name] - single).abs().max()) <= 1e-5, name
        assert moved > 1e-3, (name, moved)
    assert torch.equal(ranks[0]["scale"], ranks[1]["scale"]) and torch.equal(ranks[0]["shift"], ranks[1]["shift"])
