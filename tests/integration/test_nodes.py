"""The pack's nodes as ComfyUI loads them: calibrate -> save -> load -> apply -> sample."""

from __future__ import annotations

import inspect
import json
import stat
from pathlib import Path

import pytest
import torch

from tests.hostile_names import GOOD_NAMES, HOSTILE_NAMES

from .tiny import flux

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def plans_dir(tmp_path, monkeypatch):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["fastattn_plans"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "fastattn_plans", ([str(tmp_path), *paths[1:]], exts))
    folder_paths.filename_list_cache.pop("fastattn_plans", None)
    return tmp_path


def test_calibrate_save_load_apply_sample(pack, plans_dir):
    import comfy.sample

    tiny = flux()
    latent = {"samples": tiny.latent}
    plan, out_latent, summary = pack["DiTFastAttn_Calibrate"].execute(
        tiny.patcher, tiny.positive, tiny.negative, latent, 0, 4, 3.0, "euler", "normal", 1.0,
        0.2, "fast", window="band 1/8 (paper)", samples=1, window_kernel="auto",
        use_ast=True, use_wa_rs_asc=True, use_wa_rs=True, use_asc=True,
    ).result
    assert "attention FLOPs" in summary and out_latent["samples"].shape == tiny.latent.shape
    saved = pack["DiTFastAttn_SavePlan"].execute(plan, "tiny flux", False)
    assert Path(saved.result[0]) == plans_dir / "tiny flux.json"
    assert stat.S_IMODE((plans_dir / "tiny flux.json").stat().st_mode) == 0o644
    assert "ditfastattn_plan" in saved.ui
    with pytest.raises(FileExistsError):
        pack["DiTFastAttn_SavePlan"].execute(plan, "tiny flux", False)
    loaded, text = pack["DiTFastAttn_LoadPlan"].execute("tiny flux.json").result
    assert loaded == plan and "flux" in text
    embedded, _ = pack["DiTFastAttn_LoadPlan"].execute("(none)", plan.dumps(indent=None)).result
    assert embedded == plan
    applied = pack["DiTFastAttn_Apply"].execute(tiny.patcher, loaded, "auto", "strict")
    assert applied.ui["ditfastattn_plan"][0]["strategies"] == plan.schedule.to_letters()
    model = applied.result[0]
    noise = comfy.sample.prepare_noise(tiny.latent, 0)
    again = comfy.sample.sample(model, noise, 4, 3.0, "euler", "normal", tiny.positive, tiny.negative,
                                tiny.latent, seed=0, disable_pbar=True)
    torch.testing.assert_close(again, out_latent["samples"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_save_refuses_hostile_names_before_the_run(pack, name):
    message = pack["DiTFastAttn_SavePlan"].validate_inputs(name=name)
    assert isinstance(message, str) and "plan name" in message


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_save_accepts_plain_names(pack, name):
    assert pack["DiTFastAttn_SavePlan"].validate_inputs(name=name) is True


def test_save_validates_only_its_name(pack):
    """ComfyUI reports a refused validation once per argument validate_inputs takes."""
    assert list(inspect.signature(pack["DiTFastAttn_SavePlan"].validate_inputs).parameters) == ["name"]


def test_load_refuses_unknown_names_without_server_paths(pack, plans_dir):
    import folder_paths

    message = pack["DiTFastAttn_LoadPlan"].validate_inputs(plan_name="someone else's.json")
    assert isinstance(message, str) and "no plan named" in message
    for folder in folder_paths.get_folder_paths("fastattn_plans"):
        assert folder not in message
    assert str(plans_dir) not in message
    embedded = pack["DiTFastAttn_LoadPlan"].validate_inputs(plan_name="someone else's.json", embedded_plan="{}")
    assert embedded is True, "an embedded plan does not need the file"


def test_display_names_and_search_aliases(pack):
    names = {k: cls.GET_SCHEMA().display_name for k, cls in pack.items()}
    assert names == {"DiTFastAttn_Calibrate": "Calibrate FastAttn Plan", "DiTFastAttn_Apply": "Apply FastAttn",
                     "DiTFastAttn_ApplyRay": "Apply FastAttn (Ray)",
                     "DiTFastAttn_LoadPlan": "Load Plan", "DiTFastAttn_SavePlan": "Save Plan",
                     "DiTFastAttn_DemoClassConditioning": "FastAttn Demo Class",
                     "DiTFastAttn_DemoLatentToImage": "FastAttn Demo Latent to Image"}
    schema = pack["DiTFastAttn_LoadPlan"].GET_SCHEMA()
    if hasattr(schema, "search_aliases"):
        assert "Load FastAttn Plan" in schema.search_aliases


def test_plan_ui_carries_the_strategy_legend(pack):
    from ditfastattn_core.strategies import Strategy

    ui = pack["DiTFastAttn_LoadPlan"].execute("(none)", _tiny_plan_text()).ui["ditfastattn_plan"][0]
    assert [(e["letter"], e["label"], e["colour"]) for e in ui["legend"]] == [
        (s.letter, s.label, s.colour) for s in Strategy]
    assert ui["strategies"] == ["FF", "TW"]


def _tiny_plan_text() -> str:
    from ditfastattn_core import Plan, Schedule

    return Plan(schedule=Schedule.from_letters(["FF", "TW"]), family="flux", sigmas=(1.0, 0.5, 0.0),
                grid=(8, 8)).dumps()


def test_load_refuses_a_bad_embedded_plan(pack):
    # PlanError is a ValueError (the pack's own copy of the class, as ComfyUI loaded it)
    with pytest.raises(ValueError, match="not a FastAttn plan"):
        pack["DiTFastAttn_LoadPlan"].execute("(none)", json.dumps({"format": "pickle"}))


def test_load_lists_the_packs_shipped_plans(pack):
    import folder_paths

    assert str(ROOT / "plans") in folder_paths.get_folder_paths("fastattn_plans")


SAVED_CALIBRATE_INPUTS = [
    "model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise",
    "delta", "mode", "use_ast", "use_wa_rs_asc", "use_wa_rs", "use_asc", "window", "samples", "window_kernel",
    "start_at_step", "end_at_step", "add_noise", "return_with_leftover_noise",
]
"""The Calibrate node's inputs in the order workflows saved since 2026-11 hold their widget values."""


def test_a_saved_calibrate_workflow_keeps_its_widget_values(pack):
    """The frontend maps a saved node's widget values to its inputs by position: today's inputs
    come first in today's order, and anything added later comes after them, optional."""
    schema = pack["DiTFastAttn_Calibrate"].GET_SCHEMA()
    ids = [i.id for i in schema.inputs]
    assert ids[:len(SAVED_CALIBRATE_INPUTS)] == SAVED_CALIBRATE_INPUTS
    assert all(i.optional for i in schema.inputs[len(SAVED_CALIBRATE_INPUTS):])


def test_a_new_strategy_appends_its_switch(pack):
    """A strategy added with the next switch number: the switches in place stay as they are, the
    new one is an optional input after all others (simulated with a stand-in row)."""
    import sys
    import types

    from ditfastattn_core.strategies import SWITCHES

    calibrate = sys.modules[pack["DiTFastAttn_Calibrate"].__module__]
    new = types.SimpleNamespace(name="NEXT", description="a new strategy", switch=len(SWITCHES))
    in_place = [i.id for i in calibrate.switch_inputs((*SWITCHES, new), in_place=True)]
    appended = calibrate.switch_inputs((*SWITCHES, new), in_place=False)
    assert in_place == ["use_ast", "use_wa_rs_asc", "use_wa_rs", "use_asc"]
    assert [i.id for i in appended] == ["use_sparse", "use_next"] and all(i.optional for i in appended)


@pytest.mark.parametrize("node", ["DiTFastAttn_Apply", "DiTFastAttn_ApplyRay", "DiTFastAttn_Calibrate"])
def test_an_unknown_window_kernel_is_refused_before_the_run(pack, node):
    """On every ComfyUI (0.3.64 does not check a V3 combo's value itself), once: on window_kernel."""
    validate = pack[node].validate_inputs
    assert list(inspect.signature(validate).parameters) == ["window_kernel"]
    assert validate(window_kernel="auto") is True
    message = validate(window_kernel="triton-magic")
    assert isinstance(message, str) and "unknown window kernel 'triton-magic'" in message and "blocked" in message
