"""Train the demo model, its class embeddings and the judging classifier, deterministically, on the
CPU, and measure them through ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI python -m demo_model.train            # the committed recipe
    COMFYUI_PATH=... python -m demo_model.train --steps 200 --out /tmp/x  # a quick trial elsewhere
    COMFYUI_PATH=... python -m demo_model.train --model image            # the 256-token models:
    COMFYUI_PATH=... python -m demo_model.train --model video            # see train_scenes.py

The DiT is ComfyUI's own MMDiT class (built through ``comfy.supported_models.SD3``, the class
ComfyUI detects for these weights), trained as a rectified flow with the target that ComfyUI's
FLOW model sampling (CONST) implies: ``denoised = x - out * sigma`` on ``x = (1 - sigma) x0 +
sigma * noise``, so ``out = noise - x0``, at timestep ``1000 * sigma``. Outputs: the DiT in
``diffusion_models/``, the class embeddings, the classifier and ``training_record.json`` (recipe,
losses, wall times, accuracies) in ``weights/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import CLASS_EMBEDDINGS_FILE, CLASSIFIER_FILE, DIT_FILE, RECORD_FILE
from .classifier import DigitClassifier
from .conditioning import CONTEXT_DIM, NULL, POOLED_DIM, ClassEmbeddings
from .data import LATENT, every_shift, image_to_model_latent, load_digits_split, random_batch

# The recipe. depth 2 = hidden 128, 2 heads of 64 (ComfyUI's MMDiT ties width and heads to depth);
# patch 2 on a 16x16 latent = 64 image tokens, plus 4 text tokens.
RECIPE = {
    "seed": 0,
    "threads": 1,  # measured under load ~10 on 2 cores: 0.84 s/step with 1 thread, 7.8 with 2
    "depth": 2,
    "patch_size": 2,
    "steps": 2500,
    "batch": 64,
    "lr": 1e-3,
    "warmup": 100,
    "weight_decay": 0.0,
    "ema": 0.995,
    "cond_dropout": 0.1,
    "sigma_sampling": "half uniform, half shifted (shift 3, as sampled)",
    "classifier_steps": 4000,
    "classifier_batch": 128,
    "classifier_lr": 2e-3,
    "eval_per_class": 20,
}

UNET_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": RECIPE["patch_size"],
    "depth": RECIPE["depth"],
    "input_size": None,
    "adm_in_channels": POOLED_DIM,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": CONTEXT_DIM, "out_features": 64 * RECIPE["depth"]}},
    "num_patches": (LATENT // RECIPE["patch_size"]) ** 2,
    "pos_embed_max_size": LATENT // RECIPE["patch_size"],
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


def import_comfy() -> None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.exit("set COMFYUI_PATH to a ComfyUI tree (with its requirements installed)")
    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True


def build_dit(unet_config: dict | None = None) -> torch.nn.Module:
    """ComfyUI's MMDiT for ``unet_config`` (UNET_CONFIG), initialised as DiT does (adaLN-zero, zero
    output layer); the position embedding starts as the 2D sin-cos table and is learned."""
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    unet_config = unet_config or UNET_CONFIG
    config = comfy.supported_models.SD3(copy.deepcopy(unet_config))
    config.set_inference_dtype(torch.float32, None)
    dit = config.get_model({}).diffusion_model
    for module in dit.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for module in dit.modules():
        if hasattr(module, "adaLN_modulation"):
            torch.nn.init.zeros_(module.adaLN_modulation[-1].weight)
            torch.nn.init.zeros_(module.adaLN_modulation[-1].bias)
    torch.nn.init.zeros_(dit.final_layer.linear.weight)
    for mlp in (dit.t_embedder.mlp, dit.y_embedder.mlp):
        torch.nn.init.normal_(mlp[0].weight, std=0.02)
        torch.nn.init.normal_(mlp[2].weight, std=0.02)
    grid = unet_config["pos_embed_max_size"]
    table = torch.from_numpy(get_2d_sincos_pos_embed(dit.hidden_size, grid)).float()[None]
    del dit.pos_embed
    dit.pos_embed = torch.nn.Parameter(table)
    return dit


def sample_sigmas(size: int, generator: torch.Generator, shift: float = 3.0) -> torch.Tensor:
    """Half uniform in (0, 1), half through the model's shift (SD3's 3: where ComfyUI's default
    schedule samples)."""
    t = torch.rand(size, generator=generator).clamp(1e-4, 1 - 1e-4)
    shifted = shift * t / (1 + (shift - 1.0) * t)
    use_shift = torch.rand(size, generator=generator) < 0.5
    return torch.where(use_shift, shifted, t)


def flow_loss(dit, embeddings, x0, labels, sigmas, noise) -> torch.Tensor:
    s = sigmas.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    context, pooled = embeddings(labels)
    out = dit(xt, sigmas * 1000.0, context=context, y=pooled)
    return F.mse_loss(out, noise - x0)


def train_dit(train_x, train_y, log) -> tuple[torch.nn.Module, ClassEmbeddings, list[float]]:
    r = RECIPE
    gen = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])
    dit = build_dit()
    embeddings = ClassEmbeddings()
    params = list(dit.parameters()) + list(embeddings.parameters())
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"], betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / r["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(i, r["steps"]) / r["steps"])))
    ema_dit, ema_emb = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(embeddings).requires_grad_(False)
    losses = []
    for step in range(r["steps"]):
        images, labels = random_batch(train_x, train_y, r["batch"], gen)
        drop = torch.rand(len(labels), generator=gen) < r["cond_dropout"]
        labels = torch.where(drop, torch.full_like(labels, NULL), labels)
        x0 = image_to_model_latent(images)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(dit, embeddings, x0, labels, sample_sigmas(len(labels), gen), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            for ema, live in ((ema_dit, dit), (ema_emb, embeddings)):
                for pe, p in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(p, 1 - r["ema"])
        losses.append(loss.item())
        if step % 50 == 0 or step == r["steps"] - 1:
            log(f"dit step {step}/{r['steps']} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema_dit.eval(), ema_emb.eval(), losses


def train_classifier(train_x, train_y, log) -> DigitClassifier:
    r = RECIPE
    gen = torch.Generator().manual_seed(r["seed"] + 1)
    torch.manual_seed(r["seed"] + 1)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=r["classifier_lr"], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, r["classifier_steps"])
    for step in range(r["classifier_steps"]):
        images, labels = random_batch(train_x, train_y, r["classifier_batch"], gen)
        # a little pixel noise and contrast jitter, so samples that are slightly off still classify
        images = (images * (0.8 + 0.4 * torch.rand(len(labels), 1, 1, 1, generator=gen))
                  + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(clf(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == r["classifier_steps"] - 1:
            log(f"classifier step {step}/{r['classifier_steps']} loss {loss.item():.4f}")
    return clf.eval()


def evaluate_full_samples(dit_file, emb, clf, per_class: int, log) -> dict:
    """Sample ``per_class`` images of every class through ComfyUI (loader + KSampler, FULL attention)
    and classify them."""
    from .comfy_io import CFG, SAMPLER, SCHEDULER, STEPS, latent_to_image, load_demo_dit, sample_classes
    from .data import symmetry_error

    model = load_demo_dit(dit_file)
    labels = [c for c in range(10) for _ in range(per_class)]
    images = latent_to_image(sample_classes(model, emb, labels, seed=1234))
    pred = clf.predict(images)
    acc = (pred == torch.tensor(labels)).float().mean().item()
    sym = symmetry_error(images).mean().item()
    log(f"FULL samples: class accuracy {acc:.4f} over {len(labels)}, symmetry error {sym:.4f}")
    return {"samples": len(labels), "seed": 1234, "steps": STEPS, "cfg": CFG, "sampler": SAMPLER,
            "scheduler": SCHEDULER, "class_accuracy": acc, "symmetry_error": sym}


def main() -> None:
    if "--model" in sys.argv and sys.argv[sys.argv.index("--model") + 1:][:1] != ["digits"]:
        from .train_scenes import main as scenes_main

        return scenes_main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("digits", "image", "video"), default="digits",
                        help="digits: this 64-token model; image, video: demo_model/train_scenes.py")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--threads", type=int, default=RECIPE["threads"],
                        help="torch CPU threads; on a machine shared with other jobs 1 thread can be much "
                        "faster than 2 (threads waiting on each other while the other is descheduled)")
    parser.add_argument("--classifier-steps", type=int, default=RECIPE["classifier_steps"])
    parser.add_argument("--eval-per-class", type=int, default=RECIPE["eval_per_class"])
    parser.add_argument("--reuse-dit", action="store_true",
                        help="keep the DiT and class embeddings already written; retrain the classifier and "
                        "re-measure (the DiT figures in the record are kept)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write every output into this folder instead of the committed locations")
    args = parser.parse_args()
    RECIPE.update(steps=args.steps, threads=args.threads, classifier_steps=args.classifier_steps, eval_per_class=args.eval_per_class)
    import_comfy()
    torch.set_num_threads(RECIPE["threads"])
    from safetensors.torch import save_file

    paths = {"dit": DIT_FILE, "emb": CLASS_EMBEDDINGS_FILE, "clf": CLASSIFIER_FILE, "record": RECORD_FILE}
    if args.out is not None:
        paths = {k: args.out / p.name for k, p in paths.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    train_x, train_y, test_x, test_y = load_digits_split()
    if args.reuse_dit:
        from .conditioning import load_class_embeddings

        previous = json.loads(paths["record"].read_text())
        emb = load_class_embeddings(paths["emb"])
    else:
        loads = []
        t0 = time.time()
        dit, emb, losses = train_dit(train_x, train_y, lambda m: (loads.append(os.getloadavg()[0]), log(m)))
        dit_wall = time.time() - t0
        state = {k: v.detach().contiguous() for k, v in dit.state_dict().items()}
        save_file(state, str(paths["dit"]), metadata={"ditfastattn_demo": json.dumps(RECIPE)})
        save_file({k: v.detach().contiguous() for k, v in emb.state_dict().items()}, str(paths["emb"]))
        previous = {
            "recipe": RECIPE,
            "unet_config": UNET_CONFIG,
            "parameters": sum(v.numel() for v in state.values()),
            "dit_file_bytes": paths["dit"].stat().st_size,
            "final_loss_last100_mean": sum(losses[-100:]) / len(losses[-100:]),
            "loss_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                               for i in range(0, len(losses), 100)],
            "dit_train_wall_s": round(dit_wall, 1),
            "load_average_1min_during_dit_training": {"min": min(loads), "mean": sum(loads) / len(loads),
                                                      "max": max(loads)},
        }

    t0 = time.time()
    clf = train_classifier(train_x, train_y, log)
    clf_wall = time.time() - t0
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(paths["clf"]))
    held_x, held_y = every_shift(test_x, test_y)
    held_acc = (clf.predict(held_x) == held_y).float().mean().item()
    log(f"classifier held-out accuracy {held_acc:.4f} over {len(held_y)} images ({len(test_y)} digits)")

    full = evaluate_full_samples(paths["dit"], emb, clf, RECIPE["eval_per_class"], log)
    record = {
        **previous,
        "classifier_recipe": {k: RECIPE[k] for k in ("classifier_steps", "classifier_batch", "classifier_lr")},
        "classifier_train_wall_s": round(clf_wall, 1),
        "total_wall_s": round(time.time() - start, 1),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "classifier_held_out": {"accuracy": held_acc, "images": len(held_y), "digits": len(test_y)},
        "full_samples": full,
    }
    paths["record"].write_text(json.dumps(record, indent=2) + "\n")
    log(f"done: {json.dumps({k: record[k] for k in ('final_loss_last100_mean', 'dit_train_wall_s')})}")


if __name__ == "__main__":
    main()
