"""Checkpoint key tables, safetensors import/export, and the `load_pretrained` entry point."""
