import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditfastattn_core import Calibration, Plan, PlanError, Schedule, WindowSpec


def make_plan(**kw):
    base = dict(
        schedule=Schedule.from_letters(["FFFF", "TWCX", "TWWF", "FXTC"]),
        family="pixart_sigma",
        sigmas=(14.6, 3.0, 1.0, 0.3, 0.0),
        sampler="euler",
        scheduler="normal",
        cfg=4.5,
        denoise=1.0,
        grid=(32, 32),
        window=WindowSpec(dims=2, extent=(0.125, 0.125), tile=(4, 8)),
        calibration=Calibration(mode="paper", delta=0.1, samples=2),
    )
    base.update(kw)
    return Plan(**base)


def test_round_trip_is_lossless():
    plan = make_plan()
    again = Plan.loads(plan.dumps())
    assert again == plan
    assert Plan.loads(again.dumps()).dumps() == plan.dumps()
    data = json.loads(plan.dumps())
    assert data["strategies"] == ["FFFF", "TWCX", "TWWF", "FXTC"]
    assert data["summary"]["attention_flops"] == pytest.approx(plan.cost().attention_flops, abs=1e-6)


def _mutated(path, value):
    data = json.loads(make_plan().dumps())
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("format",), "other", "not a FastAttn plan"),
        (("version",), 2, "update comfyui-ditfastattn"),
        (("version",), 0, "version"),
        (("model", "layers"), "28", "model.layers"),
        (("model", "layers"), True, "model.layers"),
        (("model", "layers"), 10**9, "model.layers"),
        (("model", "family"), KeyError, "model.family is missing"),
        (("sampling", "steps"), 5, "sampling.sigmas must be a list of 6 numbers"),
        (("sampling", "sigmas"), [1, 2, 3, 4, 5], "must not increase"),
        (("sampling", "sigmas"), [1, 0.5, 0.2], "sampling.sigmas"),
        (("sampling", "cfg"), -1, "sampling.cfg"),
        (("sampling", "denoise"), 0, "sampling.denoise"),
        (("sampling", "sampler"), "x" * 500, "sampling.sampler"),
        (("tokens", "grid"), [0, 4], "tokens.grid"),
        (("tokens", "grid"), [65536, 65536], "tokens.grid"),
        (("window", "dims"), 7, "window"),
        (("window", "extent"), [2.0, 0.1], "window"),
        (("calibration", "mode"), "magic", "calibration.mode"),
        (("calibration", "delta"), -0.1, "calibration.delta"),
        (("strategies",), ["FFFF", "TWCX", "TWWF"], "one string per step"),
        (("strategies",), ["FFFF", "TWCX", "TWWF", "FXT"], r"strategies\[3\]"),
        (("strategies",), ["FFFF", "TWCX", "TWWF", "FXTZ"], "unknown strategy letter 'Z'"),
        (("strategies",), ["TFFF", "FWCX", "TWWF", "FXTC"], "AST at step 0"),
        (("strategies",), ["WFFF", "FWCX", "TWWF", "FXTC"], "before any FULL"),
        (("extra",), 1, "unknown field"),
        (("model", "weights"), "x", "model has unknown field"),
    ],
)
def test_bad_fields_are_named(path, value, message):
    with pytest.raises(PlanError, match=message):
        Plan.loads(_mutated(path, value))


@pytest.mark.parametrize(
    "text,message",
    [
        ("not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"format": NaN}', "NaN"),
        ("1" * 5000, "not valid JSON"),
        ("[" * 100000 + "]" * 100000, "not valid JSON"),
        (b"\xff\xfe", "UTF-8"),
        ("x" * (5 * 2**20), "at most"),
    ],
)
def test_hostile_text_is_refused(text, message):
    with pytest.raises(PlanError, match=message):
        Plan.loads(text)


def test_plan_errors_are_value_errors():
    assert issubclass(PlanError, ValueError)


def test_pickle_is_never_read():
    import pickle

    with pytest.raises(PlanError):
        Plan.loads(pickle.dumps({"format": "ditfastattn-plan"}))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values)
def test_fuzz_any_json_loads_or_raises_plan_error(value):
    try:
        Plan.from_json(value)
    except PlanError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_plans(data):
    doc = json.loads(make_plan().dumps())
    section = data.draw(st.sampled_from(sorted(doc)))
    if isinstance(doc[section], dict) and doc[section]:
        key = data.draw(st.sampled_from(sorted(doc[section])))
        doc[section][key] = data.draw(json_values)
    else:
        doc[section] = data.draw(json_values)
    try:
        plan = Plan.from_json(doc)
    except PlanError:
        return
    assert Plan.loads(plan.dumps()) == plan


letters = st.sampled_from("FWCXTS")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.data())
def test_fuzz_valid_schedules_round_trip(steps, layers, data):
    rows = ["F" * layers] + [
        "".join(data.draw(st.lists(letters, min_size=layers, max_size=layers))) for _ in range(steps - 1)
    ]
    plan = make_plan(schedule=Schedule.from_letters(rows), sigmas=tuple(float(steps - i) for i in range(steps + 1)))
    assert Plan.loads(plan.dumps()) == plan
