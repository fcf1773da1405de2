"""Flax NNX VideoLLaMA3: vision tower, projector, Qwen2 decoder, generation."""
