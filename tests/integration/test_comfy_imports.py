"""Every ComfyUI name the pack uses exists in this ComfyUI tree (CI runs it against each one), or
the pack feature-detects it (``hasattr``/``getattr`` on it, or an ``ImportError`` guard).

Read from the pack's source (``ast``): its imports of ComfyUI modules (``comfy``, ``comfy_api``,
``comfy_extras``, ``folder_paths``, ``nodes``, ...) and the attributes it reads off them
(``comfy.samplers.calc_cond_batch``, ``ext.WrappersMP.OUTER_SAMPLE``), so a name ComfyUI removed or
renamed fails here, in the tree that lacks it, instead of in a user's graph."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("ditfastattn_core", "nodes", "demo_model") for p in (ROOT / d).rglob("*.py")) + [
    ROOT / "__init__.py"]
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "comfyui_version",
                 "latent_preview", "node_helpers")


def _is_comfy(module: str) -> bool:
    return module.split(".")[0] in COMFY_MODULES


def _guarded(tree: ast.AST) -> tuple[set[int], set[str]]:
    """Lines inside ``try`` blocks that catch ImportError/AttributeError/Exception, and the dotted
    names the file feature-detects with hasattr/getattr."""
    lines: set[int] = set()
    detected: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(n in ast.unparse(h.type) for n in ("ImportError", "AttributeError", "Exception"))
                for h in node.handlers):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            detected.add(f"{ast.unparse(node.args[0])}.{node.args[1].value}")
    return lines, detected


def _uses(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, attribute or None) for every ComfyUI module import and attribute read."""
    tree = ast.parse(path.read_text())
    guarded, detected = _guarded(tree)
    aliases: dict[str, str] = {}
    uses: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_comfy(a.name):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    if node.lineno not in guarded:
                        uses.append((node.lineno, a.name, None))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _is_comfy(node.module):
            for a in node.names:
                if node.lineno not in guarded:
                    uses.append((node.lineno, node.module, a.name))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.lineno in guarded:
            continue
        dotted = ast.unparse(node)
        head, _, rest = dotted.partition(".")
        if head not in aliases or not rest or "(" in dotted or "[" in dotted:
            continue
        if dotted in detected or any(d.startswith(dotted + ".") or dotted.startswith(d) for d in detected):
            continue
        parts = rest.split(".")
        module = aliases[head]
        # descend through submodules named in the chain (comfy.samplers.X -> module comfy.samplers)
        while parts and _is_package(module) and importlib.util.find_spec(f"{module}.{parts[0]}") is not None:
            module, parts = f"{module}.{parts[0]}", parts[1:]
        if parts:
            uses.append((node.lineno, module, parts[0]))
    return uses


def _is_package(module: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), "__path__")
    except ImportError:
        return False


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_every_comfy_name_the_pack_uses_exists_here(path, comfy_nodes):
    missing = []
    for line, module, name in _uses(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{path.name}:{line}: import {module} ({e})")
            continue
        if name is not None and not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            missing.append(f"{path.name}:{line}: {module}.{name}")
    assert missing == [], "names this ComfyUI does not have (feature-detect them, or raise the floor)"


def test_the_check_sees_the_pack_s_comfy_names():
    """The scan finds what the pack really uses (so an empty result above means something)."""
    found = {(m, n) for p in SOURCES for _, m, n in _uses(p)}
    assert ("comfy_api.latest", "io") in found
    assert ("comfy.patcher_extension", "WrappersMP") in found
    assert ("comfy.model_patcher", "create_model_options_clone") in found
