import pytest

from ditfastattn_core import Plan, PlanError, Schedule
from ditfastattn_core.plan_files import PlanNameError, clean_name, read_plan, save_plan


def plan():
    return Plan(schedule=Schedule.from_letters(["FF", "TW"]), family="flux", sigmas=(1.0, 0.5, 0.0), grid=(8, 8))


@pytest.mark.parametrize("name", ["my plan", "flux-dev_20.steps", "a", "x.json", "A1"])
def test_good_names(name):
    assert clean_name(name) == name.removesuffix(".json")


@pytest.mark.parametrize(
    "name",
    ["", "../evil", "a/b", "a\\b", "/abs", "..", "x..y", ".hidden", "-x", "a" * 65, "tab\there", "nul\x00", "é",
     "trailing.", "con:", 3],
)
def test_bad_names_are_refused(name):
    with pytest.raises(PlanNameError):
        clean_name(name)


def test_save_and_read_round_trip(tmp_path):
    path = save_plan(plan(), tmp_path, "first")
    assert path == tmp_path / "first.json"
    assert read_plan(path) == plan()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_plan(plan(), tmp_path, "first")
    save_plan(plan(), tmp_path, "first.json", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["first.json"], "no temporary files are left"


def test_read_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "ditfastattn-plan", "version": 1}')
    with pytest.raises(PlanError, match="bad.json.*missing"):
        read_plan(bad)
    with pytest.raises(PlanError, match="cannot read"):
        read_plan(tmp_path / "absent.json")
    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (5 * 2**20))
    with pytest.raises(PlanError, match="at most"):
        read_plan(huge)
