"""Test-only ComfyUI nodes, copied into the test server's own custom_nodes folder (never part
of the pack): conditioning for the tiny models without a text encoder."""

import torch


class TinyConditioning:
    """Random text embeddings (and a pooled vector) of the shape a tiny model takes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 1, "min": 0, "max": 2**31}),
            "length": ("INT", {"default": 8, "min": 1, "max": 512}),
            "dim": ("INT", {"default": 32, "min": 1, "max": 4096}),
            "pooled_dim": ("INT", {"default": 32, "min": 0, "max": 4096}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/fastattn"

    def make(self, seed, length, dim, pooled_dim):
        g = torch.Generator().manual_seed(seed)
        extra = {}
        if pooled_dim:
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=g)
        return ([[torch.randn(1, length, dim, generator=g), extra]],)


NODE_CLASS_MAPPINGS = {"FastAttnTest_TinyConditioning": TinyConditioning}
