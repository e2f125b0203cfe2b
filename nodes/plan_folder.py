"""models/fastattn_plans, registered with folder_paths (so extra_model_paths.yaml works),
plus the plans shipped in the pack's plans/ folder."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

FOLDER = "fastattn_plans"
PACK_PLANS = Path(__file__).resolve().parents[1] / "plans"
EXTENSIONS = {".json"}


def register() -> None:
    user = os.path.join(folder_paths.models_dir, FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    for p in (user, str(PACK_PLANS)):
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


def save_folder() -> str:
    """Where Save Plan writes: the first registered folder that is not the pack's own."""
    for p in folder_paths.get_folder_paths(FOLDER):
        if Path(p).resolve() != PACK_PLANS.resolve():
            return p
    return os.path.join(folder_paths.models_dir, FOLDER)


def plan_names() -> list[str]:
    return sorted(n for n in folder_paths.get_filename_list(FOLDER) if n.endswith(".json"))


def unknown_plan_message(name: str) -> str:
    """Says what to do without naming the server's folders (the message reaches any client)."""
    return (f"no plan named {name!r} in models/fastattn_plans or the pack's plans: pick one from the list "
            "(press R in the editor after adding files), or paste the plan into embedded_plan")


def plan_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name) if name in plan_names() else None
    if path is None:
        raise FileNotFoundError(unknown_plan_message(name))
    return path
