"""privlora: LoRA fine-tuning of latent diffusion models that resists membership inference.

Importing the package changes no process state; offline mode is set by the entry points (see ``privlora.offline``).
"""

__version__ = "0.1.0"
