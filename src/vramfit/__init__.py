"""vramfit: fine-tune language models on whatever GPU you have."""

__version__ = "0.1.0"
