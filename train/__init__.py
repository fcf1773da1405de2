"""Training entry points: `python -m train.stage1` and `python -m train.stage2` (official flag names)."""
