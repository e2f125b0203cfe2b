"""Writes the template browser's thumbnail of every example workflow: ``example_workflows/<name>.jpg``.

ComfyUI's template browser shows a custom node's template with its file name as the title and
``<name>.jpg`` beside it as the picture (a missing one is a 404 and a console warning). Each card
shows the model and what the workflow does over a plan heatmap drawn in the strategies' own
colours (``strategies.legend()``), so the cards look like what the nodes show. Deterministic:
run it again after adding or renaming a workflow.

    python bench/template_thumbnails.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditfastattn_core.strategies import legend  # noqa: E402

SIZE = (512, 384)
BACKGROUND = "#1f2430"


TASKS = {"calibrate": "calibrate, then apply the plan", "saved plan": "apply a saved plan",
         "saved plans": "apply saved plans, one per expert"}
"""The card's subtitle for what a template does (its file name says it in a word)."""


def thumbnail(name: str) -> Image.Image:
    model, _, task = name.partition(" - ")
    task = TASKS.get(task, task)
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    offered = [entry["colour"] for entry in legend() if entry["letter"] in "FWCXT"]
    rng = random.Random(name)  # the same picture every run
    cols, rows, cell, x0, y0 = 16, 6, 26, 48, 150
    for r in range(rows):
        for c in range(cols):
            colour = offered[0] if c == 0 else rng.choice(offered)
            draw.rounded_rectangle((x0 + c * cell, y0 + r * cell, x0 + c * cell + cell - 4, y0 + r * cell + cell - 4),
                                   radius=3, fill=colour)
    draw.text((48, 40), model, font=ImageFont.load_default(size=40), fill="#f3f4f6")
    draw.text((48, 96), task, font=ImageFont.load_default(size=26), fill="#cbd5e1")
    draw.text((48, 324), "DiTFastAttn for ComfyUI", font=ImageFont.load_default(size=20), fill="#94a3b8")
    return image


def main() -> None:
    for workflow in sorted((ROOT / "example_workflows").glob("*.json")):
        out = workflow.with_suffix(".jpg")
        thumbnail(workflow.stem).save(out, "JPEG", quality=85, optimize=True)
        print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
