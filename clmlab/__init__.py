"""clmlab: reproducible GPT-2 experiments on Hugging Face Trainer."""

__version__ = "0.1.0"
