"""Training for both CogReasoner LoRA stages: losses, optimiser recipes, the jitted step, checkpoints, multi-host."""
