"""Plan: the calibrated strategy table plus what it was calibrated for, as versioned JSON.

A plan file is untrusted input (shared workflows embed plans): it is parsed with ``json``
only, every field is type- and range-checked, unknown fields are refused, and every error
names the offending field. A plan is small: one letter per layer per step.

    {
      "format": "ditfastattn-plan", "version": 1, "pack_version": "0.1.0",
      "model": {"family": "pixart_sigma", "layers": 28},
      "sampling": {"steps": 20, "sigmas": [...21 floats...], "sampler": "euler",
                   "scheduler": "normal", "cfg": 4.5, "denoise": 1.0},
      "tokens": {"grid": [128, 128], "sequence": 16684, "width": 1152},
      "window": {"dims": 1, "extent": [0.125], "tile": []},
      "calibration": {"mode": "paper", "delta": 0.1, "samples": 1},
      "summary": {"attention_flops": 0.61},
      "strategies": ["FFFF...", "TWWC...", ...]
    }
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache_memory import AttentionSize, CacheEstimate, estimate_cache_memory
from .calibrate import MODES
from .cost import CostSummary, summarize
from .schedule import Schedule
from .sparse import cost_fraction
from .state import CachePlacement
from .version import __version__
from .window import TokenLayout, WindowSpec

FORMAT = "ditfastattn-plan"
VERSION = 1
MAX_TEXT_BYTES = 4 * 2**20
MAX_LAYERS = 1024
MAX_STEPS = 1000
MAX_NAME = 128
MAX_GRID_TOKENS = 2**24
MANUAL = "manual"
"""A plan written by hand, not calibrated."""
CALIBRATION_MODES = (*MODES, MANUAL)


class PlanError(ValueError):
    """A plan that cannot be used; the message names the field and what is wrong."""


@dataclass(frozen=True)
class Calibration:
    mode: str = MANUAL
    delta: float | None = None
    samples: int = 1


@dataclass(frozen=True)
class Plan:
    schedule: Schedule
    family: str
    sigmas: tuple[float, ...]
    sampler: str = ""
    scheduler: str = ""
    cfg: float = 1.0
    denoise: float = 1.0
    grid: tuple[int, ...] | None = None
    attention: AttentionSize | None = None
    """The compressible attention calls' size at ``grid``, seen during calibration (unknown
    in plans written by hand): what the cache memory estimate needs."""
    window: WindowSpec = field(default_factory=WindowSpec)
    calibration: Calibration = field(default_factory=Calibration)
    pack_version: str = __version__

    def __post_init__(self) -> None:
        if len(self.sigmas) != self.schedule.steps + 1:
            raise PlanError(
                f"sampling.sigmas must hold steps + 1 = {self.schedule.steps + 1} values, "
                f"got {len(self.sigmas)}"
            )
        problems = self.schedule.problems()
        if problems:
            raise PlanError("strategies: " + "; ".join(problems[:3]))

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def layers(self) -> int:
        return self.schedule.layers

    @property
    def has_cfg(self) -> bool:
        return self.cfg != 1.0

    def cost(self, grid: tuple[int, ...] | None = None) -> CostSummary:
        """The plan's attention FLOPs at ``grid`` (default: the calibration grid)."""
        grid = grid or self.grid
        if grid is None:
            raise PlanError("tokens.grid is unknown, so the window's cost cannot be computed")
        layout = TokenLayout.image_only(tuple(grid))
        return summarize(self.schedule, self.window.bind(layout).fraction, self.has_cfg,
                         cost_fraction(self.sparse_layout(tuple(grid))))

    def sparse_layout(self, grid: tuple[int, ...]) -> TokenLayout:
        """The token layout Sol-Attn's cost is counted on at ``grid``: with the text tokens the
        calibration saw (``attention``), which are exact blocks and weigh much at short lengths
        (the window's cost keeps the image-only layout plans have always been costed on)."""
        image = TokenLayout.image_only(grid)
        if self.attention is None or self.grid is None:
            return image
        tokens = self.attention.at_grid(self.grid, grid).tokens
        return TokenLayout(tokens, tokens - image.seq_len, grid) if tokens > image.seq_len else image

    def cache_estimate(
        self,
        grid: tuple[int, ...] | None = None,
        batch: int = 1,
        dtype: torch.dtype = torch.float16,
        placement: CachePlacement = CachePlacement.DEVICE,
    ) -> CacheEstimate | None:
        """Peak cache memory of sampling ``batch`` latents at ``grid`` (default: the
        calibration grid) with this plan; None where the plan does not know its attention size."""
        if self.attention is None or self.grid is None:
            return None
        grid = tuple(grid or self.grid)
        return estimate_cache_memory(self.schedule, self.attention.at_grid(self.grid, grid), batch=batch,
                                     cfg=self.has_cfg, dtype=dtype, placement=placement)

    # --- JSON -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        summary = {"attention_flops": round(self.cost().attention_flops, 6)} if self.grid else {}
        return {
            "format": FORMAT,
            "version": VERSION,
            "pack_version": self.pack_version,
            "model": {"family": self.family, "layers": self.layers},
            "sampling": {
                "steps": self.steps,
                "sigmas": list(self.sigmas),
                "sampler": self.sampler,
                "scheduler": self.scheduler,
                "cfg": self.cfg,
                "denoise": self.denoise,
            },
            "tokens": {
                "grid": list(self.grid) if self.grid else None,
                **({"sequence": self.attention.tokens, "width": self.attention.width} if self.attention else {}),
            },
            "window": self.window.to_json(),
            "calibration": {
                "mode": self.calibration.mode,
                "delta": self.calibration.delta,
                "samples": self.calibration.samples,
            },
            "summary": summary,
            "strategies": self.schedule.to_letters(),
        }

    def dumps(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_json(), indent=indent, allow_nan=False)

    @classmethod
    def loads(cls, text: str | bytes) -> Plan:
        if isinstance(text, bytes):
            if len(text) > MAX_TEXT_BYTES:
                raise PlanError(f"plan is {len(text)} bytes; plans are at most {MAX_TEXT_BYTES}")
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PlanError(f"plan is not UTF-8 text: {e}") from None
        if not isinstance(text, str):
            raise PlanError("plan must be JSON text")
        if len(text) > MAX_TEXT_BYTES:
            raise PlanError(f"plan is {len(text)} characters; plans are at most {MAX_TEXT_BYTES}")
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        r = _Fields(data, "plan")
        fmt = r.str("format")
        if fmt != FORMAT:
            raise PlanError(f"format is {fmt!r}, expected {FORMAT!r}: this is not a FastAttn plan")
        version = r.int("version", 1, 10**6)
        if version != VERSION:
            raise PlanError(
                f"version is {version}, this pack reads version {VERSION}: "
                + ("update comfyui-ditfastattn" if version > VERSION else "recalibrate the plan")
            )
        pack_version = r.str("pack_version")
        model = r.section("model")
        family = model.str("family")
        layers = model.int("layers", 1, MAX_LAYERS)
        sampling = r.section("sampling")
        steps = sampling.int("steps", 1, MAX_STEPS)
        sigmas = sampling.floats("sigmas", steps + 1, 0.0, 1e6)
        if any(b > a for a, b in zip(sigmas, sigmas[1:], strict=False)):
            raise PlanError("sampling.sigmas must not increase")
        sampler = sampling.str("sampler")
        scheduler = sampling.str("scheduler")
        cfg = sampling.float("cfg", 0.0, 1000.0)
        denoise = sampling.float("denoise", 1e-6, 1.0)
        tokens = r.section("tokens")
        grid = tokens.grid("grid")
        attention = None
        if "sequence" in tokens.data or "width" in tokens.data:
            if grid is None:
                raise PlanError("tokens.sequence and tokens.width need tokens.grid")
            attention = AttentionSize(tokens.int("sequence", math.prod(grid), MAX_GRID_TOKENS),
                                      tokens.int("width", 1, 1 << 20))
        window = r.window("window")
        cal = r.section("calibration")
        mode = cal.str("mode")
        if mode not in CALIBRATION_MODES:
            raise PlanError(f"calibration.mode is {mode!r}, expected one of {CALIBRATION_MODES}")
        delta = cal.optional_float("delta", 1e-9, 1e6)
        samples = cal.int("samples", 1, 1 << 16)
        summary = r.section("summary")
        if "attention_flops" in summary.data:
            summary.float("attention_flops", 0.0, 2.0)
        summary.done()
        rows = r.strategies("strategies", steps, layers)
        for s in (model, sampling, tokens, cal):
            s.done()
        r.done()
        try:
            schedule = Schedule.from_letters(rows)
        except ValueError as e:
            raise PlanError(f"strategies: {e}") from None
        return cls(
            schedule=schedule,
            family=family,
            sigmas=tuple(sigmas),
            sampler=sampler,
            scheduler=scheduler,
            cfg=cfg,
            denoise=denoise,
            grid=grid,
            attention=attention,
            window=window,
            calibration=Calibration(mode=mode, delta=delta, samples=samples),
            pack_version=pack_version,
        )


def _reject_constant(name: str) -> Any:
    raise PlanError(f"plan holds {name}, which is not a number JSON allows")


class _Fields:
    """Typed, range-checked reads from one JSON object; remembers what was read so that
    ``done()`` can refuse unknown fields."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise PlanError(f"{path} must be a JSON object, got {type(data).__name__}")
        self.data, self.path, self.seen = data, path, set()

    def _get(self, name: str) -> Any:
        self.seen.add(name)
        if name not in self.data:
            raise PlanError(f"{self._name(name)} is missing")
        return self.data[name]

    def _name(self, name: str) -> str:
        return name if self.path == "plan" else f"{self.path}.{name}"

    def done(self) -> None:
        unknown = sorted(str(k)[:40] for k in set(self.data) - self.seen)
        if unknown:
            raise PlanError(f"{self.path} has unknown field(s): {unknown[:5]}")

    def section(self, name: str) -> _Fields:
        return _Fields(self._get(name), self._name(name))

    def str(self, name: str) -> str:
        v = self._get(name)
        if not isinstance(v, str) or len(v) > MAX_NAME or not v.isprintable():
            raise PlanError(f"{self._name(name)} must be printable text of at most {MAX_NAME} characters")
        return v

    def int(self, name: str, lo: int, hi: int) -> int:
        v = self._get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise PlanError(f"{self._name(name)} must be an integer in [{lo}, {hi}], got {_show(v)}")
        return v

    def float(self, name: str, lo: float, hi: float) -> float:
        v = self._get(name)
        if not _is_number(v) or not lo <= v <= hi:
            raise PlanError(f"{self._name(name)} must be a number in [{lo}, {hi}], got {_show(v)}")
        return float(v)

    def optional_float(self, name: str, lo: float, hi: float) -> float | None:
        if self.data.get(name, None) is None:
            self.seen.add(name)
            return None
        return self.float(name, lo, hi)

    def floats(self, name: str, count: int, lo: float, hi: float) -> list[float]:
        v = self._get(name)
        if not isinstance(v, list) or len(v) != count:
            raise PlanError(f"{self._name(name)} must be a list of {count} numbers")
        if not all(_is_number(x) and lo <= x <= hi for x in v):
            raise PlanError(f"{self._name(name)} must hold numbers in [{lo}, {hi}]")
        return [float(x) for x in v]

    def grid(self, name: str) -> tuple[int, ...] | None:
        v = self._get(name)
        if v is None:
            return None
        if (
            not isinstance(v, list)
            or not 1 <= len(v) <= 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 65536 for x in v)
            or math.prod(v) > MAX_GRID_TOKENS
        ):
            raise PlanError(
                f"{self._name(name)} must be null or 1-3 positive integers with at most "
                f"{MAX_GRID_TOKENS} tokens in all, got {_show(v)}"
            )
        return tuple(v)

    def window(self, name: str) -> WindowSpec:
        v = self._get(name)
        try:
            return WindowSpec.from_json(v)
        except (ValueError, TypeError) as e:
            raise PlanError(f"{self._name(name)}: {e}") from None

    def strategies(self, name: str, steps: int, layers: int) -> list[str]:
        v = self._get(name)
        if not isinstance(v, list) or len(v) != steps:
            raise PlanError(f"{self._name(name)} must be a list of one string per step ({steps})")
        for i, row in enumerate(v):
            if not isinstance(row, str) or len(row) != layers:
                raise PlanError(
                    f"{self._name(name)}[{i}] must be a string of one letter per layer ({layers})"
                )
        return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
