"""Optimiser recipes of the two official stages (protocol 4 and 5) as optax transformations.

Stage 1 = HF Trainer defaults: torch AdamW (betas 0.9/0.999, eps 1e-8, wd 0), lr 2e-4, linear warmup over
ceil(8% of the updates) from 0, then cosine to 0, global-norm clipping at 0.5. optax's
`warmup_cosine_decay_schedule` counts `decay_steps` including the warmup, exactly like HF's
`get_cosine_schedule_with_warmup`.
Stage 2 = AdamW lr 1e-4, wd 1e-2, no clipping, no warmup, torch CosineAnnealingLR(T_max, eta_min=0) with the
official T_max = epochs x ceil(videos / 4) x 20 (20 = the assumed mean QAs per chain). Past T_max optax holds 0
where torch's closed form would rise again. The official 8-bit AdamW (bitsandbytes) is replaced by fp32 AdamW.
"""
from __future__ import annotations

import dataclasses
import math

import optax

from cogstream_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    total_steps: int
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1 (the schedule length), got {self.total_steps}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.total_steps * self.warmup_ratio)


def stage1_optim(total_steps: int, learning_rate: float = 2e-4) -> OptimConfig:
    return OptimConfig(learning_rate, total_steps, warmup_ratio=0.08, weight_decay=0.0, max_grad_norm=0.5)


def stage2_t_max(num_epochs: int, num_videos: int, qas_per_chain: int = 20, global_batch_qas: int = 4) -> int:
    """The official CosineAnnealingLR period in our updates.

    Official: T_max = epochs x ceil(videos / 4) x 20 scheduler steps, and under plain DDP accelerate advances the
    scheduler once per process at every update (each process accumulates 4 QAs, so processes = global QAs / 4).
    In updates of `global_batch_qas` QAs that is ceil(T_max x 4 / global_batch_qas): the official formula itself
    for 4 QAs per update (one process), T_max / 8 for the official 8 x 4 = 32."""
    official = num_epochs * math.ceil(num_videos / 4) * qas_per_chain
    return max(1, math.ceil(official * 4 / global_batch_qas))


def stage2_optim(num_epochs: int, num_videos: int, learning_rate: float = 1e-4, *,
                 global_batch_qas: int = 4) -> OptimConfig:
    return OptimConfig(learning_rate, stage2_t_max(num_epochs, num_videos, global_batch_qas=global_batch_qas),
                       weight_decay=1e-2)


def schedule(config: OptimConfig) -> optax.Schedule:
    if config.warmup_steps >= config.total_steps:  # e.g. 1 update with 8% warmup: HF's warmup alone (LR 0 first)
        return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    if config.warmup_steps:
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                                  config.total_steps, end_value=0.0)
    return optax.cosine_decay_schedule(config.learning_rate, config.total_steps, alpha=0.0)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clipping (if any) then AdamW with decoupled weight decay, as torch.optim.AdamW."""
    adamw = optax.adamw(schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
