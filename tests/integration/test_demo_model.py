"""The pack's demo model through ComfyUI's own loader and KSampler, and the demo nodes."""

import pytest
import torch

from demo_model import CLASS_EMBEDDINGS_FILE, CLASSIFIER_FILE, DIT_FILE
from demo_model.conditioning import CONTEXT_DIM, CONTEXT_TOKENS, POOLED_DIM, load_class_embeddings
from demo_model.data import compose, image_to_model_latent

# The committed model's FULL samples measure 0.044 (mean over 200); an untrained model about 0.4.
SYMMETRY_LIMIT = 0.08


@pytest.fixture(scope="module")
def demo_dit():
    from demo_model.comfy_io import load_demo_dit

    return load_demo_dit()


def test_comfy_loader_detects_the_demo_dit_as_sd3(demo_dit):
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.model_base
    import comfy.supported_models

    assert type(demo_dit.model) is comfy.model_base.SD3
    assert type(demo_dit.model.model_config) is comfy.supported_models.SD3
    config = demo_dit.model.model_config.unet_config
    assert (config["in_channels"], config["patch_size"], config["depth"]) == (16, 2, 2)
    assert config["adm_in_channels"] == POOLED_DIM
    assert config["context_embedder_config"]["params"] == {"in_features": CONTEXT_DIM, "out_features": 128}
    assert (config["num_patches"], config["pos_embed_max_size"]) == (64, 8)
    dit = demo_dit.model.diffusion_model
    assert isinstance(dit, mmdit.MMDiT) and len(dit.joint_blocks) == 2
    assert demo_dit.model.model_type == comfy.model_base.ModelType.FLOW


def test_load_diffusion_model_node_lists_and_loads_the_demo_dit(pack, comfy_nodes):
    import folder_paths

    assert DIT_FILE.name in folder_paths.get_filename_list("diffusion_models")
    (model,) = comfy_nodes.UNETLoader().load_unet(DIT_FILE.name, "default")
    assert model.model.diffusion_model.depth == 2


def test_class_node_gives_the_shipped_embeddings(pack):
    from demo_model.conditioning import NULL

    emb = load_class_embeddings(CLASS_EMBEDDINGS_FILE)
    positive, negative = pack["DiTFastAttn_DemoClassConditioning"].execute(digit=7).args
    (context, extra), = positive
    assert context.shape == (1, CONTEXT_TOKENS, CONTEXT_DIM)
    torch.testing.assert_close(context[0], emb.context[7])
    torch.testing.assert_close(extra["pooled_output"][0], emb.pooled[7])
    torch.testing.assert_close(negative[0][0][0], emb.context[NULL])
    assert pack["DiTFastAttn_DemoClassConditioning"].execute(digit=2).args[0][0][0].ne(context).any()


def test_latent_to_image_node_inverts_the_latent_format(pack):
    import comfy.latent_formats

    images = compose(torch.rand(2, 8, 8))
    latent = comfy.latent_formats.SD3().process_out(image_to_model_latent(images))
    (decoded,) = pack["DiTFastAttn_DemoLatentToImage"].execute({"samples": latent}).args
    assert decoded.shape == (2, 64, 64, 3)
    torch.testing.assert_close(decoded[..., 0], images[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded[..., 2], decoded[..., 0])


def test_full_samples_show_the_class_they_were_conditioned_on(demo_dit):
    """One sample per class through the core KSampler with CFG: the classifier (trained on real
    images) must name the conditioned class for at least 9 of 10, and the mirror symmetry must hold
    (random or untrained weights give about 1 in 10 and no symmetry)."""
    from demo_model.classifier import load_classifier
    from demo_model.comfy_io import latent_to_image, sample_classes
    from demo_model.data import symmetry_error

    labels = list(range(10))
    emb = load_class_embeddings(CLASS_EMBEDDINGS_FILE)
    images = latent_to_image(sample_classes(demo_dit, emb, labels, seed=7))
    predicted = load_classifier(CLASSIFIER_FILE).predict(images)
    assert (predicted == torch.tensor(labels)).sum().item() >= 9, predicted.tolist()
    assert symmetry_error(images).mean().item() < SYMMETRY_LIMIT


def test_default_calibration_beats_paper_mode_on_the_demo_model(pack, comfy_nodes, demo_dit):
    """The Calibrate node's default mode (guided) against paper mode at the same delta (D2), on
    the ten calibration latents: fewer attention FLOPs and a smaller error of the final samples
    vs FULL (bench/calibration_quality.py: 53.7% / 0.101 vs 65.9% / 0.154 on 256 other samples), and one model call
    per step, as a plain generation."""
    import comfy.patcher_extension

    from demo_model.comfy_io import CFG, SAMPLER, SCHEDULER, STEPS, empty_latent
    from demo_model.conditioning import NULL, class_conditioning
    from ditfastattn_core import relative_l1

    schema = pack["DiTFastAttn_Calibrate"].define_schema()
    mode_input = next(i for i in schema.inputs if i.id == "mode")
    assert mode_input.default == "guided"
    emb = load_class_embeddings(CLASS_EMBEDDINGS_FILE)
    pos, neg = class_conditioning(emb, list(range(10))), class_conditioning(emb, [NULL] * 10)
    latent = empty_latent(10)
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    counted = demo_dit.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_count", count)
    (reference,) = comfy_nodes.KSampler().sample(counted, 5, STEPS, CFG, SAMPLER, SCHEDULER, pos, neg, latent)
    plain_calls = len(calls)
    results = {}
    for mode in ("paper", "guided"):
        calls.clear()
        plan, out, _ = pack["DiTFastAttn_Calibrate"].execute(
            counted, pos, neg, latent, 5, STEPS, CFG, SAMPLER, SCHEDULER, 1.0, 0.05, mode,
            window="band 1/8 (paper)", samples=1, window_kernel="auto").result
        results[mode] = (plan.cost().attention_flops, relative_l1(reference["samples"], out["samples"]), len(calls))
    (p_flops, p_err, p_calls), (g_flops, g_err, g_calls) = results["paper"], results["guided"]
    assert g_calls == plain_calls == STEPS, results
    assert p_calls > 2 * plain_calls, results
    assert g_flops < p_flops and g_err < p_err, results
