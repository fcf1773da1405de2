"""Checkpoint conversion command-line tools (`python -m convert.<tool>`).

- `hf_to_orbax`: VideoLLaMA3 safetensors (original or transformers-native layout) -> our orbax folder.
- `orbax_to_hf`: our orbax folder (or any loadable checkpoint) -> safetensors in either layout.
"""
