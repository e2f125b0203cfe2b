"""The main job in one command: calibrate -> save -> load -> apply -> generate through the pack's
nodes in real ComfyUI, on the pack's trained demo model (offline, no downloads), written as one PNG.

ComfyUI is $COMFYUI_PATH, or the ComfyUI the pack is installed in. The PNG shows the FULL and the
FastAttn samples of the same seeds side by side (a row per class), the plan's heatmap (layers x
steps, the editor's strategy colours), attention FLOPs % of FULL, the error vs FULL (mean relative
L1 of the latents), how many samples the demo's classifier reads as their class, and the speed:
the median ratio of FULL to FastAttn wall time over back-to-back pairs in this run.

    python bench/end_to_end.py [--mode guided|fast|paper] [--delta 0.1] [--classes 10] [--samples 4] [--out main_job.png]

``--model image`` or ``--model video`` runs the same job on the 256-token demo models (an SD3
image model on 128x128 canvases, a Wan video model with 4 frames shown side by side); ``digits``,
the default, is the 64-token demo.

``--speed`` runs the same pipeline on PixArt-Sigma-XL's architecture (random weights, reduced
depth) at 2048^2 and reports the speed ratio (no PNG: random weights draw noise).

    python bench/end_to_end.py --speed [--size 2048] [--depth 2] [--steps 8] [--delta 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from comfy_setup import import_comfy, load_pack, pixart_sigma_xl, text_cond
from timing import paired_ratio

from ditfastattn_core.calibrate import GUIDED, MODES

PLAN_NAME = "end_to_end"
CELL = 64  # a digits-demo sample is 64x64 pixels
GAP = 4
MARGIN = 16
HEAT = 16  # heatmap cell size
TEXT = 16  # text line height
HEADER_LINES = 3
FOOTER_LINES = 5
MIN_WIDTH = 720  # the text lines fit


@dataclass(frozen=True)
class Settings:
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    delta: float
    mode: str
    window: str
    seed: int
    calibration_seed: int
    repeats: int


@dataclass
class Outcome:
    plan: object
    full: object  # LATENT samples without the plan
    fast: object  # with the plan, same seed
    speedup: float  # median of FULL time / FastAttn time over the pairs
    full_seconds: float


class Progress:
    """One tqdm bar over the job's sampling steps, fed by ComfyUI's progress hook (which the
    pack's Calibrate and the core KSampler report to); their own bars are switched off."""

    def __init__(self, total_steps: int):
        import comfy.utils
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        self.done = 0
        self.stage_steps = 0
        comfy.utils.PROGRESS_BAR_ENABLED = False
        comfy.utils.set_progress_bar_global_hook(self._hook)

    def _hook(self, value, total, preview=None, **_):
        self.bar.n = self.done + round(self.stage_steps * min(value, total) / max(total, 1))
        self.bar.refresh()

    @contextlib.contextmanager
    def stage(self, name: str, steps: int):
        self.bar.set_description(name)
        self.stage_steps = steps
        yield
        self.done += steps
        self.bar.n = self.done
        self.bar.refresh()

    def close(self) -> None:
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(None)
        self.bar.close()


def total_steps(settings: Settings) -> int:
    """Calibration, then (1 warm-up + repeats) pairs of FULL and FastAttn generations."""
    return settings.steps * (1 + 2 * (1 + settings.repeats))


def run_pipeline(pack: dict, model, positive, negative, calibration_latent: dict, generate, settings: Settings,
                 progress: Progress) -> Outcome:
    """Calibrate FastAttn Plan -> Save Plan -> Load Plan -> Apply FastAttn -> ``generate`` with and
    without the plan, through the pack's nodes; plans go to a temporary folder."""
    import folder_paths

    with progress.stage("calibrate", settings.steps):
        plan, _, _ = pack["DiTFastAttn_Calibrate"].execute(
            model=model, positive=positive, negative=negative, latent_image=calibration_latent,
            seed=settings.calibration_seed, steps=settings.steps, cfg=settings.cfg, sampler_name=settings.sampler,
            scheduler=settings.scheduler, denoise=1.0, delta=settings.delta, mode=settings.mode, use_ast=True,
            use_wa_rs_asc=True, use_wa_rs=True, use_asc=True, window=settings.window, samples=1,
            window_kernel="auto").result
    with tempfile.TemporaryDirectory() as folder:
        folder_paths.add_model_folder_path("fastattn_plans", folder, is_default=True)
        pack["DiTFastAttn_SavePlan"].execute(plan=plan, name=PLAN_NAME, overwrite=True)
        loaded, _ = pack["DiTFastAttn_LoadPlan"].execute(plan_name=f"{PLAN_NAME}.json").result
    if loaded != plan:
        raise SystemExit("the loaded plan differs from the saved one")
    (patched,) = pack["DiTFastAttn_Apply"].execute(model=model, plan=loaded, window_kernel="auto",
                                                   step_matching="strict").result
    outputs = {}

    def timed(name: str, m):
        def run():
            with progress.stage(name, settings.steps):
                outputs[name] = generate(m)
        return run

    ratio, full_seconds = paired_ratio(timed("FastAttn", patched), timed("FULL", model), settings.repeats)
    return Outcome(loaded, outputs["FULL"], outputs["FastAttn"], 1 / ratio, full_seconds)


# -- the PNG --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each part of the PNG goes (pixels); the test reads the panels back from it."""

    classes: int
    samples: int
    steps: int
    layers: int
    cell: tuple[int, int] = (CELL, CELL)  # one sample's (width, height) in pixels

    @property
    def panel(self) -> tuple[int, int]:
        return self.samples * (self.cell[0] + GAP) - GAP, self.classes * (self.cell[1] + GAP) - GAP

    def panel_box(self, which: int) -> tuple[int, int, int, int]:
        """0: FULL, 1: FastAttn."""
        w, h = self.panel
        x = MARGIN + which * (w + 2 * MARGIN)
        y = MARGIN + (HEADER_LINES + 1) * TEXT
        return x, y, x + w, y + h

    def heatmap_box(self) -> tuple[int, int, int, int]:
        y = self.panel_box(0)[3] + MARGIN + TEXT
        return MARGIN, y, MARGIN + self.steps * HEAT, y + self.layers * HEAT

    @property
    def size(self) -> tuple[int, int]:
        panels = self.panel_box(1)[2] + MARGIN
        heat = self.heatmap_box()
        width = max(panels, heat[2] + MARGIN, MIN_WIDTH)
        return width, heat[3] + 2 * TEXT + FOOTER_LINES * TEXT + MARGIN


def render(layout: Layout, full_images, fast_images, letters: list[str], header: list[str], footer: list[str],
           path: Path) -> None:
    """Images are (N, 1, H, W) in [0, 1] (H, W = ``layout.cell``), class-major; letters are the plan's, one
    string per step."""
    from PIL import Image, ImageDraw, ImageFont

    from ditfastattn_core.strategies import legend

    font = ImageFont.load_default(size=12)
    img = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(header):
        draw.text((MARGIN, MARGIN + i * TEXT), line, fill="black", font=font)
    for which, (title, images) in enumerate((("FULL", full_images), ("FastAttn (the plan below)", fast_images))):
        x0, y0, _, _ = layout.panel_box(which)
        draw.text((x0, y0 - TEXT), title, fill="black", font=font)
        pixels = (images[:, 0].clamp(0, 1) * 255).round().byte().numpy()
        for k, sample in enumerate(pixels):
            row, col = divmod(k, layout.samples)
            img.paste(Image.fromarray(sample, "L"),
                      (x0 + col * (layout.cell[0] + GAP), y0 + row * (layout.cell[1] + GAP)))
    colours = {entry["letter"]: entry["colour"] for entry in legend()}
    x0, y0, x1, y1 = layout.heatmap_box()
    draw.text((x0, y0 - TEXT), "the plan: layers (rows) x steps (columns)", fill="black", font=font)
    for step, row in enumerate(letters):
        for layer, letter in enumerate(row):
            x, y = x0 + step * HEAT, y0 + layer * HEAT
            draw.rectangle((x, y, x + HEAT - 2, y + HEAT - 2), fill=colours[letter])
    x, y = MARGIN, y1 + TEXT // 2
    for entry in legend():
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=entry["colour"])
        label = f"{entry['letter']} {entry['label']}"
        draw.text((x + 14, y), label, fill="black", font=font)
        x += 24 + int(draw.textlength(label, font=font))
    for i, line in enumerate(footer):
        draw.text((MARGIN, y + (i + 1) * TEXT + TEXT // 2), line, fill="black", font=font)
    _palette(img).save(path, optimize=True)


def _palette(img):
    """The image on a palette of the strategy colours and grays (samples and text are gray): a
    third of the RGB file's size, every heatmap colour exact."""
    from PIL import Image

    from ditfastattn_core.strategies import legend

    colours = [tuple(int(e["colour"][i:i + 2], 16) for i in (1, 3, 5)) for e in legend()]
    grays = 256 - len(colours)
    palette = Image.new("P", (1, 1))
    palette.putpalette([c for rgb in colours + [(round(i * 255 / (grays - 1)),) * 3 for i in range(grays)]
                        for c in rgb])
    return img.quantize(palette=palette, dither=Image.Dither.NONE)


# -- the two jobs ---------------------------------------------------------------------------------


def demo_job(args, pack: dict) -> list[str]:
    import torch

    import nodes
    from demo_model.conditioning import NULL, class_conditioning
    from demo_model.variants import CFG, SAMPLER, SCHEDULER, variant
    from ditfastattn_core import relative_l1

    v = variant(args.model)
    settings = Settings(args.steps, CFG, SAMPLER, SCHEDULER, args.delta, args.mode, args.window, args.seed,
                        args.calibration_seed, args.repeats)
    (model,) = nodes.UNETLoader().load_unet(v.dit_file.name, "default")  # listed by the pack
    emb = v.load_embeddings()
    classes = list(range(args.classes))
    labels = [c for c in classes for _ in range(args.samples)]
    positive, negative = class_conditioning(emb, classes), class_conditioning(emb, [NULL] * len(classes))

    def generate(m):
        return v.sample(m, emb, labels, seed=settings.seed, steps=settings.steps)

    progress = Progress(total_steps(settings))
    try:
        out = run_pipeline(pack, model, positive, negative, v.empty_latent(len(classes)), generate, settings, progress)
    finally:
        progress.close()
    full_images, fast_images = v.latent_to_image(out.full), v.latent_to_image(out.fast)
    classifier = v.load_classifier()
    truth = torch.tensor(labels)
    read_full = (classifier.predict(full_images) == truth).sum().item()
    read_fast = (classifier.predict(fast_images) == truth).sum().item()
    if full_images.dim() == 5:  # video: a sample's frames side by side
        full_images, fast_images = (torch.cat(x.unbind(1), dim=-1) for x in (full_images, fast_images))
    cost = out.plan.cost()
    figures = [
        cost.describe(),
        f"error vs FULL (mean relative L1 of the latents): {relative_l1(out.full, out.fast):.3f}",
        f"read as their class by the demo's classifier: FULL {read_full}/{len(labels)}, FastAttn {read_fast}/{len(labels)}",
        f"speedup over FULL: {out.speedup:.2f}x (FULL {out.full_seconds:.1f} s per generation of {len(labels)} samples, "
        f"median of {settings.repeats} back-to-back pairs)",
        "(timed on this machine in this run; --speed times PixArt-Sigma-XL's architecture at 2048^2)",
    ]
    what = {"digits": "SD3/MMDiT, 2 layers, 64 image tokens + 4 text",
            "image": "SD3/MMDiT, 2 layers, 256 image tokens + 4 text",
            "video": "Wan 2.1, 2 layers, 4 frames x 8x8 tokens; frames left to right"}[v.name]
    header = [
        f"DiTFastAttn in ComfyUI on the pack's {v.name} demo model ({what})",
        f"digits {classes[0]}-{classes[-1]} (rows), one seed per column; {settings.sampler}/{settings.scheduler} "
        f"{settings.steps} steps, cfg {settings.cfg:g}; window {settings.window}",
        f"plan: {settings.mode} mode, delta {settings.delta:g}, calibrated on one latent per digit at seed "
        f"{settings.calibration_seed}",
    ]
    layout = Layout(args.classes, args.samples, settings.steps, out.plan.layers,
                    (full_images.shape[-1], full_images.shape[-2]))
    render(layout, full_images, fast_images, out.plan.schedule.to_letters(), header, figures, args.out)
    return [f"plan: {' '.join(out.plan.schedule.to_letters())}", *figures, f"wrote {args.out}"]


def speed_job(args, pack: dict) -> list[str]:
    import torch

    import nodes
    from ditfastattn_core import relative_l1

    settings = Settings(args.steps, 4.5, "euler", "normal", args.delta, args.mode,
                        "band 1/8, 256-token tiles (fast on CPU)", args.seed, args.calibration_seed, args.repeats)
    model = pixart_sigma_xl(args.depth)
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    positive, negative = text_cond(1), text_cond(2)

    def generate(m):
        return nodes.common_ksampler(m, settings.seed, settings.steps, settings.cfg, settings.sampler,
                                     settings.scheduler, positive, negative, latent)[0]["samples"]

    progress = Progress(total_steps(settings))
    try:
        out = run_pipeline(pack, model, positive, negative, latent, generate, settings, progress)
    finally:
        progress.close()
    return [
        f"PixArt-Sigma-XL architecture (random weights, depth {args.depth}) at {args.size}^2 "
        f"({(args.size // 16) ** 2} image tokens), {settings.steps} {settings.sampler} steps",
        f"plan: {' '.join(out.plan.schedule.to_letters())}",
        out.plan.cost().describe(),
        f"error vs FULL: mean relative L1 of the latents {relative_l1(out.full, out.fast):.3f}",
        f"speedup over FULL: {out.speedup:.2f}x (FULL {out.full_seconds:.1f} s per generation; median of "
        f"{settings.repeats} back-to-back pairs)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", action="store_true", help="PixArt-Sigma-XL's architecture at --size instead")
    ap.add_argument("--model", default="digits", choices=["digits", "image", "video"],
                    help="demo: the 64-token digits model, the 256-token image model or the Wan video model")
    ap.add_argument("--window", default="band 1/8 (paper)",
                    help="demo: the Calibrate node's window (a name from its list)")
    ap.add_argument("--classes", type=int, default=10, choices=range(1, 11), metavar="1-10",
                    help="demo: digits 0..classes-1, one row each")
    ap.add_argument("--samples", type=int, default=4, help="demo: samples per class")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (demo 20, --speed 8)")
    ap.add_argument("--delta", type=float, default=None,
                    help="calibration threshold (guided: 0.1, the Calibrate node's default; fast and paper mode: "
                    "demo 0.05, --speed 0.1)")
    ap.add_argument("--mode", default=GUIDED, choices=list(MODES),
                    help="calibration mode (default: guided, as the Calibrate node)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--calibration-seed", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5, help="timed pairs of FULL and FastAttn generations")
    ap.add_argument("--size", type=int, default=2048, help="--speed: image size")
    ap.add_argument("--depth", type=int, default=2, help="--speed: transformer blocks")
    ap.add_argument("--out", type=Path, default=Path("main_job.png"), help="demo: the PNG to write")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where ComfyUI runs the model")
    args = ap.parse_args()
    args.steps = args.steps or (8 if args.speed else 20)
    args.delta = args.delta or (0.1 if args.speed or args.mode == GUIDED else 0.05)
    comfyui = import_comfy(args.device)
    pack = load_pack()
    print(f"ComfyUI at {comfyui}", flush=True)
    lines = speed_job(args, pack) if args.speed else demo_job(args, pack)
    print("\nsummary")
    for line in lines:
        print(f"  {line}")


if __name__ == "__main__":
    main()
