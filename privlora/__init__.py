"""privlora: LoRA fine-tuning of latent diffusion models that resists membership inference."""
import os

# No network at run time unless the user explicitly opts in (``--allow_network``).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
