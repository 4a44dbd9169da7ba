"""Saving and loading converted models: `save_pretrained` / `from_pretrained` (PEFT style).

The io layer sits above nn, training and analysis (the import-linter contract in
pyproject.toml); nothing below imports it.
"""

from .pretrained import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, from_pretrained, save_pretrained

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "from_pretrained", "save_pretrained"]
