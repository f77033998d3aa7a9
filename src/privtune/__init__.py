"""privtune: differentially private LoRA fine-tuning with a learned privacy controller."""

__version__ = "0.1.0"
