"""chargpt: train character-level GPT language models from scratch and generate text with them."""

__version__ = "0.1.0"
