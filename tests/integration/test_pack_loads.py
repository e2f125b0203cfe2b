from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pack_loads_as_a_custom_node(pack, comfy_nodes):
    """ComfyUI imports the repo as a custom node package, registers its nodes and web folder."""
    assert set(pack) == {"DiTFastAttn_Calibrate", "DiTFastAttn_Apply", "DiTFastAttn_ApplyRay", "DiTFastAttn_LoadPlan",
                         "DiTFastAttn_SavePlan",
                         "DiTFastAttn_DemoClassConditioning", "DiTFastAttn_DemoLatentToImage"}
    web = Path(comfy_nodes.EXTENSION_WEB_DIRS["comfyui-ditfastattn"])
    assert web.resolve() == (ROOT / "web").resolve()
