"""acc_clip: a CLIP trainer on HuggingFace Accelerate, compatible with open_clip's trainer."""

__version__ = "0.1.0"
