"""Train the 256-token demo models (``image``: SD3/MMDiT on rotation-symmetric canvases; ``video``:
Wan 2.1 on moving digits; see ``scenes.py`` and ``variants.py``), their class embeddings and their
classifiers, deterministically, on the CPU, with one torch thread, and measure them through
ComfyUI's loader and KSampler:

    COMFYUI_PATH=/path/to/ComfyUI python -m demo_model.train --model image
    COMFYUI_PATH=/path/to/ComfyUI python -m demo_model.train --model video
    COMFYUI_PATH=... python -m demo_model.train --model video --steps 20 --out /tmp/x   # a trial

Same objective as the 64-token demo (``train.py``): rectified flow with the target ComfyUI's
CONST sampling implies (``out = noise - x0`` at timestep ``1000 sigma``), sigma half uniform and
half through the model's shift (SD3 3, Wan 8), AdamW with warm-up and cosine decay, EMA, 10%
null-class dropout for CFG. Outputs: the DiT in ``diffusion_models/``, and the class embeddings,
classifier and ``training_record.json`` in ``weights/<model>/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RECIPES = {
    "image": {"seed": 0, "threads": 1, "steps": 1500, "batch": 48, "lr": 1e-3, "warmup": 100, "weight_decay": 0.0,
              "ema": 0.995, "cond_dropout": 0.1, "classifier_steps": 2000, "classifier_batch": 64,
              "classifier_lr": 2e-3, "eval_per_class": 20},
    "video": {"seed": 0, "threads": 1, "steps": 1200, "batch": 48, "lr": 1e-3, "warmup": 100, "weight_decay": 0.0,
              "ema": 0.995, "cond_dropout": 0.1, "classifier_steps": 2000, "classifier_batch": 64,
              "classifier_lr": 2e-3, "eval_per_class": 20},
}


def build(name: str):
    from .conditioning import CONTEXT_DIM, POOLED_DIM, ClassEmbeddings
    from .variants import WAN_TEXT_DIM, build_video_dit, image_unet_config, video_unet_config

    if name == "image":
        from .train import build_dit

        config = image_unet_config()
        return build_dit(config), ClassEmbeddings(CONTEXT_DIM, POOLED_DIM), config
    config = video_unet_config()
    emb = ClassEmbeddings(WAN_TEXT_DIM, None)
    return build_video_dit(), emb, {**config, "patch_size": list(config["patch_size"]),
                                    "window_size": list(config["window_size"])}


def train_dit(v, r, train_x, train_y, log):
    from .conditioning import NULL
    from .train import sample_sigmas
    from .variants import dit_forward

    gen = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])
    dit, emb, config = build(v.name)
    forward = dit_forward(v.name)
    params = list(dit.parameters()) + list(emb.parameters())
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"], betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / r["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(i, r["steps"]) / r["steps"])))
    ema_dit, ema_emb = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(emb).requires_grad_(False)
    losses = []
    for step in range(r["steps"]):
        images, labels = v.random_batch(train_x, train_y, r["batch"], gen)
        drop = torch.rand(len(labels), generator=gen) < r["cond_dropout"]
        labels = torch.where(drop, torch.full_like(labels, NULL), labels)
        x0 = v.to_model_latent(images)
        noise = torch.randn(x0.shape, generator=gen)
        sigmas = sample_sigmas(len(labels), gen, v.shift)
        s = sigmas.view(-1, *[1] * (x0.dim() - 1))
        context, pooled = emb(labels)
        out = forward(dit, (1 - s) * x0 + s * noise, sigmas * 1000.0, context, pooled)
        loss = F.mse_loss(out, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            for ema, live in ((ema_dit, dit), (ema_emb, emb)):
                for pe, p in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(p, 1 - r["ema"])
        losses.append(loss.item())
        if step % 50 == 0 or step == r["steps"] - 1:
            log(f"dit step {step}/{r['steps']} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema_dit.eval(), ema_emb.eval(), losses, config


def train_classifier(v, r, train_x, train_y, log):
    gen = torch.Generator().manual_seed(r["seed"] + 1)
    torch.manual_seed(r["seed"] + 1)
    clf = v.new_classifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=r["classifier_lr"], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, r["classifier_steps"])
    for step in range(r["classifier_steps"]):
        images, labels = v.random_batch(train_x, train_y, r["classifier_batch"], gen)
        scale = 0.8 + 0.4 * torch.rand(len(labels), *[1] * (images.dim() - 1), generator=gen)
        images = (images * scale + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(clf(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == r["classifier_steps"] - 1:
            log(f"classifier step {step}/{r['classifier_steps']} loss {loss.item():.4f}")
    return clf.eval()


def evaluate_full_samples(v, dit_file, emb, clf, per_class: int, log) -> dict:
    from .variants import CFG, SAMPLER, SCHEDULER, STEPS

    model = v.load(dit_file)
    labels = [c for c in range(10) for _ in range(per_class)]
    images = torch.cat([v.latent_to_image(v.sample(model, emb, labels[i:i + 50], seed=1234 + i // 50))
                        for i in range(0, len(labels), 50)])
    acc = (clf.predict(images) == torch.tensor(labels)).float().mean().item()
    err = v.structure_error(images).mean().item()
    log(f"FULL samples: class accuracy {acc:.4f} over {len(labels)}, structure error {err:.4f}")
    return {"samples": len(labels), "seed": "1234 + i // 50", "steps": STEPS, "cfg": CFG, "sampler": SAMPLER,
            "scheduler": SCHEDULER, "class_accuracy": acc, "structure_error": err,
            "detected_as": type(model.model.model_config).__name__}


def main() -> None:
    from .variants import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("image", "video"), required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classifier-steps", type=int, default=None)
    parser.add_argument("--eval-per-class", type=int, default=None)
    parser.add_argument("--reuse-dit", action="store_true",
                        help="keep the DiT and embeddings already written; retrain the classifier, re-measure")
    parser.add_argument("--out", type=Path, default=None, help="write every output into this folder instead")
    args = parser.parse_args()
    v = VARIANTS[args.model]
    r = dict(RECIPES[args.model])
    for key in ("steps", "batch", "threads", "classifier_steps", "eval_per_class"):
        if getattr(args, key) is not None:
            r[key] = getattr(args, key)
    from .train import import_comfy

    import_comfy()
    torch.set_num_threads(r["threads"])
    from safetensors.torch import save_file

    paths = {"dit": v.dit_file, "emb": v.class_embeddings_file, "clf": v.classifier_file, "record": v.record_file}
    if args.out is not None:
        paths = {k: args.out / p.name for k, p in paths.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    from .data import load_digits_split

    train_x, train_y, test_x, test_y = load_digits_split()
    if args.reuse_dit:
        from .conditioning import load_class_embeddings

        previous = json.loads(paths["record"].read_text())
        emb = load_class_embeddings(paths["emb"])
    else:
        loads = []
        t0 = time.time()
        dit, emb, losses, config = train_dit(v, r, train_x, train_y,
                                             lambda m: (loads.append(os.getloadavg()[0]), log(m)))
        dit_wall = time.time() - t0
        state = {k: t.detach().contiguous() for k, t in dit.state_dict().items()}
        save_file(state, str(paths["dit"]), metadata={"ditfastattn_demo": json.dumps({"model": v.name, **r})})
        save_file({k: t.detach().contiguous() for k, t in emb.state_dict().items()}, str(paths["emb"]))
        previous = {
            "model": v.name, "description": v.description, "recipe": r, "unet_config": config,
            "parameters": sum(t.numel() for t in state.values()),
            "dit_file_bytes": paths["dit"].stat().st_size,
            "final_loss_last100_mean": sum(losses[-100:]) / len(losses[-100:]),
            "loss_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                               for i in range(0, len(losses), 100)],
            "dit_train_wall_s": round(dit_wall, 1),
            "load_average_1min_during_dit_training": {"min": min(loads), "mean": sum(loads) / len(loads),
                                                      "max": max(loads)},
        }
    t0 = time.time()
    clf = train_classifier(v, r, train_x, train_y, log)
    clf_wall = time.time() - t0
    save_file({k: t.contiguous() for k, t in clf.state_dict().items()}, str(paths["clf"]))
    held_x, held_y = v.real_set(test_x, test_y, seed=1)
    held_acc = (torch.cat([clf.predict(c) for c in held_x.split(512)]) == held_y).float().mean().item()
    log(f"classifier held-out accuracy {held_acc:.4f} over {len(held_y)} ({len(test_y)} digits)")
    full = evaluate_full_samples(v, paths["dit"], emb, clf, r["eval_per_class"], log)
    record = {
        **previous,
        "classifier_recipe": {k: r[k] for k in ("classifier_steps", "classifier_batch", "classifier_lr")},
        "classifier_train_wall_s": round(clf_wall, 1),
        "total_wall_s": round(time.time() - start, 1),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "classifier_held_out": {"accuracy": held_acc, "samples": len(held_y), "digits": len(test_y)},
        "full_samples": full,
    }
    paths["record"].write_text(json.dumps(record, indent=2) + "\n")
    log(f"done: {json.dumps({k: record[k] for k in ('final_loss_last100_mean', 'dit_train_wall_s')})}")


if __name__ == "__main__":
    main()
