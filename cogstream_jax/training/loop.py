"""The update loop both stages share: resume, periodic/final/signal checkpoints, progress, max_steps."""
from __future__ import annotations

import pathlib
import sys
from typing import Any, Callable, Iterator

import jax

from cogstream_jax.errors import ConfigError
from cogstream_jax.training.checkpoint import TrainCheckpointer
from cogstream_jax.training.progress import Progress
from cogstream_jax.training.run_common import LoopResult
from cogstream_jax.training.setup import TrainSetup
from cogstream_jax.training.signals import graceful_stop

CHECKPOINT_SUBDIR = "checkpoints"

#: one update: (state, data iterator) -> (state, metrics dict) ; raises StopIteration when data runs out
UpdateFn = Callable[[Any, Iterator], tuple[Any, dict]]


def run_loop(setup: TrainSetup, update: UpdateFn, data_iterator: Any, *, output_dir: str, total_steps: int,
             resume: bool, max_steps: int | None, save_steps: int, keep_last: int, meta: dict,
             show_progress: bool = True, desc: str = "train") -> LoopResult:
    """Run updates until `total_steps` (or `max_steps` updates in total), the data end, or a signal."""
    ckpt = TrainCheckpointer(pathlib.Path(output_dir) / CHECKPOINT_SUBDIR, keep_last=keep_last)
    state = setup.state
    if resume:
        if ckpt.latest_step() is None:
            raise ConfigError(f"--resume: no checkpoint found in {ckpt.directory}")
        state = ckpt.restore(state, setup.state_sharding, data_iterator=data_iterator)
    elif ckpt.latest_step() is not None:
        raise ConfigError(f"{ckpt.directory}: holds checkpoints of an earlier run; pass --resume to continue it "
                          "or choose another --output_dir")
    step = int(jax.device_get(state.step))
    limit = min(total_steps, max_steps) if max_steps is not None else total_steps
    progress = Progress(output_dir, total_steps, step, show_bar=show_progress, desc=desc)
    tokens_total, last_loss, exit_code, saved_at = 0.0, None, 0, None
    try:
        with graceful_stop() as stop:
            while step < limit:
                try:
                    state, metrics = update(state, data_iterator)
                except StopIteration:
                    break
                step += 1
                tokens_total += float(metrics.get("tokens", 0.0))
                values = progress.update(step, {**metrics, "tokens_total": tokens_total})
                last_loss = values.get("loss")
                if step % save_steps == 0:
                    saved_at = ckpt.save(state, data_iterator=data_iterator, meta={**meta, "loss": last_loss})
                if stop:
                    print(f"\nsignal {stop.signum}: saving a checkpoint at update {step} and stopping", file=sys.stderr)
                    exit_code = stop.exit_code
                    break
        if saved_at != step:
            ckpt.save(state, data_iterator=data_iterator, meta={**meta, "loss": last_loss})
        ckpt.wait()
    finally:
        progress.close()
        ckpt.close()
    setup.state = state
    return LoopResult(step, exit_code, last_loss)
