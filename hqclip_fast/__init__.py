"""hqclip-fast: the training system for HQ-CLIP."""

__version__ = "0.1.0"
