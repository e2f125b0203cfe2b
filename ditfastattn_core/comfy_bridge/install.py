"""The one place the pack attaches to a model: a ModelPatcher clone with a config installed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from .attention_hooks import CallSlot, attach_modules
from .families import Geometry, resolve
from .keys import CONFIG_KEY, KEY
from .run import Run
from .wrappers import (
    fastattn_calc_cond_batch,
    fastattn_predict_noise,
    make_apply_model_wrapper,
    make_outer_sample_wrapper,
)


class InstalledConfig(Protocol):
    """What an install needs from an apply or a calibration config."""

    geometry: Geometry

    def start_run(self, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...],
                  model_options: Mapping[str, Any]) -> Run: ...


def model_geometry(model: Any) -> Geometry:
    """A ModelPatcher's family and attention geometry, detected once (before sampling) and
    passed down from there."""
    return resolve(model.model)


def install(model: Any, config: InstalledConfig) -> Any:
    """A clone of ``model`` with ``config`` installed: module patches now where the family
    attaches by them, the attention override per run (OUTER_SAMPLE), the keyed wrappers.

    On a model that already carries FastAttn (two Apply nodes in a row, Calibrate after
    Apply) the new config replaces the old one: attention goes through the pack once, other
    overrides stay chained."""
    import comfy.patcher_extension as ext

    m = model.clone()
    for wrapper_type in WRAPPED:
        m.remove_wrappers_with_key(getattr(ext.WrappersMP, wrapper_type), KEY)
    m.model_options.setdefault("transformer_options", {})[CONFIG_KEY] = config
    slot = CallSlot()
    attach_modules(m, config.geometry, slot)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, KEY, make_outer_sample_wrapper(slot))
    m.add_wrapper_with_key(ext.WrappersMP.PREDICT_NOISE, KEY, fastattn_predict_noise)
    m.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, KEY, fastattn_calc_cond_batch)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, KEY, make_apply_model_wrapper(slot))
    return m


WRAPPED = ("OUTER_SAMPLE", "PREDICT_NOISE", "CALC_COND_BATCH", "APPLY_MODEL")
"""The ComfyUI wrapper types the pack installs a keyed wrapper for."""
