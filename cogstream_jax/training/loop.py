"""The update loop both stages share: resume, periodic/final/signal checkpoints, progress, max_steps."""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

import jax

from cogstream_jax.multihost import global_max
from cogstream_jax.training.checkpoint import TrainCheckpointer, check_resume, check_same_run, checkpoint_dir
from cogstream_jax.training.progress import Progress
from cogstream_jax.training.run_common import LoopResult
from cogstream_jax.training.setup import TrainSetup
from cogstream_jax.training.signals import EXIT_CODES, graceful_stop

#: one update: (state, data iterator) -> (state, metrics dict) ; raises StopIteration when data runs out
UpdateFn = Callable[[Any, Iterator], tuple[Any, dict]]


def run_loop(setup: TrainSetup, update: UpdateFn, data_iterator: Any, *, output_dir: str, total_steps: int,
             resume: bool, max_steps: int | None, save_steps: int, keep_last: int, meta: dict,
             show_progress: bool = True, desc: str = "train") -> LoopResult:
    """Run updates until `total_steps` (or `max_steps` updates in total), the data end, or a signal.

    `meta["run"]`, if given, fingerprints the settings that define the run; resuming under different ones fails.
    """
    check_resume(checkpoint_dir(output_dir), resume)
    ckpt = TrainCheckpointer(checkpoint_dir(output_dir), keep_last=keep_last)
    state = setup.state
    saved_at = None
    if resume:
        latest = ckpt.latest_step()
        check_same_run(ckpt.read_meta(latest).get("run"), meta.get("run"), ckpt.directory / str(latest))
        state = ckpt.restore(state, setup.state_sharding, step=latest, data_iterator=data_iterator)
        saved_at = latest  # a run resumed at (or past) its end exports without saving that step again
    step = int(jax.device_get(state.step))
    limit = min(total_steps, max_steps) if max_steps is not None else total_steps
    progress = Progress(output_dir, total_steps, step, show_bar=show_progress, desc=desc)
    tokens_total, last_loss, exit_code = progress.tokens_total, None, 0
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
                signum = global_max(stop.signum or 0)  # every process stops at the same update
                if signum:
                    print(f"\nsignal {signum}: saving a checkpoint at update {step} and stopping", file=sys.stderr)
                    exit_code = EXIT_CODES.get(signum, 1)
                    break
        if saved_at != step:
            ckpt.save(state, data_iterator=data_iterator, meta={**meta, "loss": last_loss})
        ckpt.wait()
    finally:
        progress.close()
        ckpt.close()
    setup.state = state
    return LoopResult(step, exit_code, last_loss)
