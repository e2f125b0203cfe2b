"""Plan files on disk: safe names, size-capped reads, atomic writes. No ComfyUI here: the
nodes pass in the folders that ComfyUI's folder_paths registered."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .plan import MAX_TEXT_BYTES, Plan, PlanError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
"""Matched with ``fullmatch``: ``$`` would also accept a name ending in a newline."""
SUFFIX = ".json"
WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{n}" for port in ("COM", "LPT") for n in "123456789"}
)
"""Names Windows reserves in every folder, whatever the extension (``nul.json`` is the device)."""
FILE_MODE = 0o644
"""Plans are shared data: readable by everyone, like the models beside them."""


class PlanNameError(ValueError):
    """A plan name that could escape its folder or is not a plain file name."""


def clean_name(name: str) -> str:
    """``name`` without ``.json``, after checking it is a plain, safe file name."""
    if not isinstance(name, str):
        raise PlanNameError("the plan name must be text")
    stem = name[: -len(SUFFIX)] if name.lower().endswith(SUFFIX) else name
    if not NAME.fullmatch(stem) or ".." in stem or stem.endswith((".", " ")):
        raise PlanNameError(
            f"plan name {name!r} is not allowed: use 1-64 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit, with no path separators and no '..'"
        )
    if stem.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        raise PlanNameError(f"plan name {name!r} is a Windows device name: pick another name")
    return stem


def save_plan(plan: Plan, folder: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Write ``plan`` as ``folder/name.json``; refuses to replace a file unless asked."""
    folder = Path(folder)
    path = folder / (clean_name(name) + SUFFIX)
    if path.resolve().parent != folder.resolve():
        raise PlanNameError(f"plan name {name!r} leaves the plans folder")
    if path.exists() and not overwrite:
        raise FileExistsError(f"a plan named {path.name!r} exists already: pick another name or enable overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    text = plan.dumps()
    fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_plan(path: str | os.PathLike) -> Plan:
    """Load and validate a plan file (JSON only, size-capped)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise PlanError(f"cannot read plan {path.name!r}: {e.strerror}") from None
    if size > MAX_TEXT_BYTES:
        raise PlanError(f"plan {path.name!r} is {size} bytes; plans are at most {MAX_TEXT_BYTES}")
    try:
        return Plan.loads(path.read_bytes())
    except PlanError as e:
        raise PlanError(f"plan {path.name!r}: {e}") from None
