"""Family detection by exact class, geometry from config, layer keying and token layouts.

Runs without ComfyUI: detection only reads class names, configs and module attributes."""

from __future__ import annotations

import types

import pytest

from ditfastattn_core.comfy_bridge import families
from ditfastattn_core.comfy_bridge.families import (
    FAMILIES,
    IMAGE_FIRST,
    IMAGE_LAST,
    UnsupportedModelError,
    detect_family,
    resolve,
)


@pytest.fixture(autouse=True)
def no_comfyui(monkeypatch):
    """Detection as outside ComfyUI (no version gate), whichever tree the suite runs with."""
    monkeypatch.setattr(families, "comfyui_version", lambda: None)


def fake_model(class_name: str, unet_config: dict, *, bases: tuple = (), config_class: str = "Config",
               diffusion_model=None):
    cls = type(class_name, bases, {})
    model = cls()
    model.model_config = type(config_class, (), {})()
    model.model_config.unet_config = unet_config
    model.diffusion_model = diffusion_model or types.SimpleNamespace()
    return model


FLUX = {"depth": 2, "depth_single_blocks": 3, "patch_size": 2}


def test_a_subclass_with_other_geometry_is_never_taken_for_its_parent():
    flux_cls = type("Flux", (), {})
    flux2 = fake_model("Flux2", {**FLUX, "patch_size": 1}, bases=(flux_cls,))
    assert detect_family(flux2).name == "flux2"
    assert resolve(flux2).patch == (1, 1)
    long_cat = fake_model("LongCatImage", FLUX, bases=(flux_cls,))
    with pytest.raises(UnsupportedModelError, match="LongCatImage is not a diffusion transformer this pack supports"):
        detect_family(long_cat)


@pytest.mark.parametrize("name,reason", [("WAN21_CausalAR", "KV cache"),
                                         ("HunyuanDiT", "transformer_options")])
def test_models_that_cannot_be_reached_safely_are_refused_by_name(name, reason):
    with pytest.raises(UnsupportedModelError, match=rf"{name} is not supported: .*{reason}"):
        detect_family(fake_model(name, {}))


def test_one_model_class_two_families_by_config_class():
    z = fake_model("Lumina2", {"n_layers": 4}, config_class="ZImage",
                   diffusion_model=types.SimpleNamespace(pad_tokens_multiple=32))
    classic = fake_model("Lumina2", {"n_layers": 4}, config_class="Lumina2",
                         diffusion_model=types.SimpleNamespace(pad_tokens_multiple=None))
    assert resolve(z).family == "z_image" and resolve(z).pad_multiple == 32
    assert resolve(classic).family == "lumina2" and resolve(classic).pad_multiple == 1
    with pytest.raises(UnsupportedModelError, match=r"Lumina2 \(NewBie\) is not a diffusion transformer"):
        detect_family(fake_model("Lumina2", {"n_layers": 4}, config_class="NewBie"))


def test_families_newer_than_the_running_comfyui_are_refused(monkeypatch):
    monkeypatch.setattr(families, "comfyui_version", lambda: (0, 3, 64))
    with pytest.raises(UnsupportedModelError, match="Wan VACE needs ComfyUI 0.29.0 or later"):
        detect_family(fake_model("WAN21_Vace", {"num_layers": 2}))
    monkeypatch.setattr(families, "comfyui_version", lambda: (0, 29, 0))
    assert detect_family(fake_model("WAN21_Vace", {"num_layers": 2})).name == "wan_vace"


def test_geometry_comes_from_the_config():
    radiance = resolve(fake_model("ChromaRadiance", {**FLUX, "patch_size": 32}))
    assert radiance.patch == (32, 32) and radiance.layers == 5
    video15 = resolve(fake_model("HunyuanVideo15", {**FLUX, "patch_size": [1, 1, 1]}))
    assert video15.patch == (1, 1, 1)
    mage = resolve(fake_model("MageFlow", {"num_layers": 3}, diffusion_model=types.SimpleNamespace(patch_size=1)))
    assert mage.patch == (1, 1) and mage.layers == 3


def test_hunyuan_token_order_follows_the_model():
    flipped = types.SimpleNamespace(double_blocks=[types.SimpleNamespace(flipped_img_txt=True)])
    text_first = types.SimpleNamespace(double_blocks=[types.SimpleNamespace()])
    cfg = {**FLUX, "patch_size": [1, 2, 2]}
    assert resolve(fake_model("HunyuanVideo", cfg, diffusion_model=flipped)).order == IMAGE_FIRST
    assert resolve(fake_model("HunyuanVideo", cfg, diffusion_model=text_first)).order == IMAGE_LAST


def test_layers_are_keyed_by_block_type_and_index():
    flux = resolve(fake_model("Flux", FLUX))
    assert flux.layer_of({"block_type": "double", "block_index": 1}, call_order=7) == 1
    assert flux.layer_of({"block_type": "single", "block_index": 0}, call_order=7) == 2
    assert flux.layer_of({}, call_order=4) == 4  # a tree without block indices: call order
    assert flux.layer_of({"block_type": "vace", "block_index": 0}, call_order=0) is None
    z = resolve(fake_model("Lumina2", {"n_layers": 2}, config_class="ZImage",
                           diffusion_model=types.SimpleNamespace(pad_tokens_multiple=32)))
    assert z.layer_of({}, call_order=0) is None  # keyed: a call without a block index is a refiner


def test_z_image_layout_skips_padding_and_refiners():
    z = resolve(fake_model("Lumina2", {"n_layers": 2, "patch_size": 2}, config_class="ZImage",
                           diffusion_model=types.SimpleNamespace(pad_tokens_multiple=32)))
    grid = (6, 5)  # 30 image tokens, padded to 32
    assert z.token_layout(32, grid, text_len=7) is None  # the noise refiner: image + padding only
    joint = z.token_layout(64, grid, text_len=7)  # [text 7 -> 32][image 30 -> 32]
    assert (joint.image_start, joint.image_stop) == (32, 62)
    omni = z.token_layout(128, grid, text_len=7)  # references in front: the main image is last
    assert (omni.image_start, omni.image_stop) == (96, 126)


def test_every_family_names_its_classes_once():
    seen = {}
    for f in FAMILIES.values():
        for cls in f.model_classes:
            key = (cls, f.config_classes)
            assert key not in seen, f"{cls} is claimed by {seen[key]} and {f.name}"
            seen[key] = f.name


LTX2 = {"num_layers": 3}


def test_ltx2_takes_its_grid_from_the_packed_video_latent():
    ltx2 = resolve(fake_model("LTXAV", LTX2))
    assert (ltx2.family, ltx2.layers, ltx2.patch) == ("ltx2", 3, (1, 1, 1))
    packed = (2, 1, 128 * 3 * 4 * 6 + 8 * 10 * 16)  # x: video and audio packed into one row
    shapes = [(1, 128, 3, 4, 6), (1, 8, 10, 16)]
    assert ltx2.call_grid(packed, 1024, {"latent_shapes": shapes}) == (3, 4, 6)
    assert ltx2.call_grid((2, 128, 3, 4, 6), 1024, {"latent_shapes": [(1, 128, 3, 4, 6)]}) == (3, 4, 6)


@pytest.mark.parametrize("conds,text_len,key", [
    ({"latent_shapes": [(1, 128, 3, 4, 6), (1, 8, 72, 16)]}, 1024, "ltx2_audio_length"),
    ({"latent_shapes": [(1, 128, 3, 4, 6), (1, 8, 70, 16)],
      "ref_audio": {"tokens": types.SimpleNamespace(shape=(1, 2, 128))}}, 1024, "ltx2_audio_length"),
    ({"latent_shapes": [(1, 128, 3, 4, 6)]}, 72, "text_length"),
    ({"latent_shapes": [(1, 128, 4, 4, 6)], "keyframe_idxs": types.SimpleNamespace(shape=(1, 3, 24, 2))},
     1024, "ltx_guides"),
])
def test_ltx2_model_calls_whose_video_self_attention_is_ambiguous_are_refused(conds, text_len, key):
    """72 video tokens: an audio, a text or guide tokens that could pass for them make the call FULL."""
    ltx2 = resolve(fake_model("LTXAV", LTX2))
    with pytest.raises(families.UnplaceableCall) as refused:
        ltx2.call_grid((2, 1, 0), text_len, conds)
    assert refused.value.key == key


def test_ltx2_without_guides_or_equal_lengths_is_placed():
    ltx2 = resolve(fake_model("LTXAV", LTX2))
    conds = {"latent_shapes": [(1, 128, 3, 4, 6), (1, 8, 71, 16)], "keyframe_idxs": types.SimpleNamespace(shape=(1, 3, 0, 2))}
    assert ltx2.call_grid((2, 1, 0), 73, conds) == (3, 4, 6)


def test_ltxv_model_calls_with_guides_or_text_as_long_as_the_video_are_refused():
    """LTXV shares LTX-2's model code: same guides, same call-order keying."""
    ltxv = resolve(fake_model("LTXV", LTX2))
    assert ltxv.call_grid((2, 128, 3, 4, 6), 128, {}) == (3, 4, 6)
    with pytest.raises(families.UnplaceableCall, match="as many tokens as the text"):
        ltxv.call_grid((2, 128, 3, 4, 6), 72, {})
    with pytest.raises(families.UnplaceableCall, match="keyframe guides"):
        ltxv.call_grid((2, 128, 4, 4, 6), 128, {"keyframe_idxs": types.SimpleNamespace(shape=(1, 3, 24, 2))})


@pytest.mark.parametrize("name,config,latent", [
    ("WAN21", {"num_layers": 2, "patch_size": (1, 2, 2)}, (1, 16, 2, 8, 8)),
    ("CosmosVideo", {"num_blocks": 2}, (1, 16, 2, 8, 8)),
])
def test_image_only_families_refuse_a_text_as_long_as_the_image(name, config, latent):
    """32 image tokens: where the tree marks no blocks, a 32-token text cross-attention would
    pass for the self-attention of the next layer."""
    geometry = resolve(fake_model(name, config))
    assert geometry.call_grid(latent, 31, {}) == (2, 4, 4)
    with pytest.raises(families.UnplaceableCall, match="as many tokens as the text"):
        geometry.call_grid(latent, 32, {})
