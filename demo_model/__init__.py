"""The pack's demo model: a small class-conditional SD3/MMDiT trained on structured digit images.

It exists so that compression quality can be measured on a model that learned something (random
weights have no spatial, temporal or conditional structure). ComfyUI loads the weights with its own
loader ("Load Diffusion Model"); the class conditioning and the latent-to-image mapping live here
and in the pack's demo nodes. ``train.py`` reproduces every file in ``weights/`` and
``diffusion_models/``; README.md ("Demo model") gives the recipe and the measured figures.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Folder registered with ComfyUI under "diffusion_models", so "Load Diffusion Model" lists the DiT.
DIFFUSION_MODELS_DIR = HERE / "diffusion_models"
DIT_FILE = DIFFUSION_MODELS_DIR / "ditfastattn_demo_mmdit.safetensors"
WEIGHTS_DIR = HERE / "weights"
CLASS_EMBEDDINGS_FILE = WEIGHTS_DIR / "class_embeddings.safetensors"
CLASSIFIER_FILE = WEIGHTS_DIR / "classifier.safetensors"
RECORD_FILE = WEIGHTS_DIR / "training_record.json"
