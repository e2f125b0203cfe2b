"""The PLAN socket type shared by the pack's nodes."""

from comfy_api.latest import io

Plan = io.Custom("FASTATTN_PLAN")
