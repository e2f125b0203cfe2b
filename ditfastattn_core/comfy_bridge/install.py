"""The one place the pack attaches to a model: a ModelPatcher clone with a config installed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from .attention_hooks import CallSlot, attach_modules
from .families import Geometry, resolve
from .keys import CONFIG_KEY, KEY
from .run import Run
from .wrappers import make_apply_model_wrapper, make_outer_sample_wrapper


class InstalledConfig(Protocol):
    """What an install needs from an apply or a calibration config."""

    geometry: Geometry

    def start_run(self, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> Run: ...


def model_geometry(model: Any) -> Geometry:
    """A ModelPatcher's family and attention geometry, detected once (before sampling) and
    passed down from there."""
    return resolve(model.model)


def install(model: Any, config: InstalledConfig, extra_wrappers: Mapping[str, Callable] | None = None) -> Any:
    """A clone of ``model`` with ``config`` installed: module patches now where the family
    attaches by them, the attention override per run (OUTER_SAMPLE), the keyed wrappers.

    On a model that already carries FastAttn (two Apply nodes in a row, Calibrate after
    Apply) the new config replaces the old one: attention goes through the pack once, other
    overrides stay chained."""
    import comfy.patcher_extension as ext

    m = model.clone()
    for wrapper_type in (ext.WrappersMP.OUTER_SAMPLE, ext.WrappersMP.APPLY_MODEL, ext.WrappersMP.CALC_COND_BATCH):
        m.remove_wrappers_with_key(wrapper_type, KEY)
    m.model_options.setdefault("transformer_options", {})[CONFIG_KEY] = config
    slot = CallSlot()
    attach_modules(m, config.geometry, slot)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, KEY, make_outer_sample_wrapper(slot))
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, KEY, make_apply_model_wrapper(slot))
    for wrapper_type, wrapper in (extra_wrappers or {}).items():
        m.add_wrapper_with_key(wrapper_type, KEY, wrapper)
    return m
