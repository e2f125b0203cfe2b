"""The keys the pack uses in a ModelPatcher's ``model_options`` / ``transformer_options``."""

KEY = "ditfastattn"
"""The key of the pack's wrappers (so a second install replaces, not stacks, them)."""
CONFIG_KEY = "ditfastattn_config"
"""transformer_options: the installed ``ApplyConfig`` or ``CalibrationConfig`` (immutable)."""
RUN_KEY = "ditfastattn_run"
"""transformer_options of one sampling run's options clone: that run's ``Run``."""
OVERRIDE_KEY = "optimized_attention_override"
"""ComfyUI's attention override in transformer_options (where the pack chains in)."""
COMPILE_WRAPPER_KEY = "torch.compile"
"""The key of the APPLY_MODEL wrapper ComfyUI's TorchCompileModel node installs
(``comfy_api.torch_helpers.set_torch_compile_wrapper``)."""
