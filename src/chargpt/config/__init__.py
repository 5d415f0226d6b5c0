"""Configuration: the typed config dataclasses, the shipped presets, the flags made from them."""
