"""comfyui-ditfastattn: DiTFastAttn attention compression as a ComfyUI node pack.

ComfyUI imports this file; everything that touches ComfyUI is imported inside
``comfy_entrypoint`` so that the torch-only core (``ditfastattn_core``) and its tests never
need ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import FastAttnExtension

    return FastAttnExtension()
