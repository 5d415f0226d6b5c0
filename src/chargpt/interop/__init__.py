"""Models from and to other tools: Hugging Face export and import, nanoGPT checkpoints."""
