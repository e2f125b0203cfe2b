import stat

import pytest

from ditfastattn_core import Plan, PlanError, Schedule
from ditfastattn_core.plan_files import PlanNameError, clean_name, read_plan, save_plan
from tests.hostile_names import GOOD_NAMES, HOSTILE_NAMES


def plan():
    return Plan(schedule=Schedule.from_letters(["FF", "TW"]), family="flux", sigmas=(1.0, 0.5, 0.0), grid=(8, 8))


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name):
    assert clean_name(name) == name.removesuffix(".json")


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_bad_names_are_refused(name, tmp_path):
    with pytest.raises(PlanNameError):
        clean_name(name)
    with pytest.raises(PlanNameError):
        save_plan(plan(), tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_plans_are_written_readable_by_all(tmp_path):
    path = save_plan(plan(), tmp_path, "shared")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


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
