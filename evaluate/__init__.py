"""cogstream-jax evaluation entry points (this package shadows the PyPI `evaluate`; never import that one)."""
