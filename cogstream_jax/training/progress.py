"""Operability: a progress bar (loss, lr, tokens/s, ETA), JSONL metrics, TensorBoard when installed.

Only process 0 writes; metrics files are appended line by line (one JSON object per update), so a resumed
run continues the same file (after dropping the lines of updates past the checkpoint it resumed from, which the
resumed run does again).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any

import jax

from cogstream_jax.io_utils import as_path, atomic_write_text, is_url


def _tensorboard_writer(directory: pathlib.Path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:  # checked first: importing torch alone takes seconds
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
    except Exception:
        return None
    return SummaryWriter(str(directory / "tensorboard"))


class Progress:
    """Update-level reporting; `update(step, metrics)` once per optimiser update."""

    def __init__(self, output_dir: str | os.PathLike, total_steps: int, start_step: int = 0, *, show_bar: bool = True,
                 desc: str = "train"):
        self.enabled = jax.process_index() == 0  # metrics.jsonl always; the bar only when `show_bar`
        self.total = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.metrics_path = as_path(output_dir) / "metrics.jsonl"
        self.remote = is_url(self.metrics_path)  # object stores cannot append: the file is rewritten whole
        self.lines: list[str] = []
        self.bar = None
        self.tb = None
        self.tokens_total = 0.0  # carried over from the kept metrics of a resumed run
        if self.enabled:
            from tqdm import tqdm

            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self._keep_metrics_up_to(start_step)
            if show_bar:
                self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.5)
            self.tb = None if self.remote else _tensorboard_writer(self.metrics_path.parent)

    def _keep_metrics_up_to(self, step: int) -> None:
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
                self.tokens_total = float(record.get("tokens_total", self.tokens_total))
        self.lines = kept
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def update(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Record metrics of update `step` (1-based count of updates done); returns the host floats."""
        values = {k: float(v) for k, v in metrics.items()}
        elapsed = time.perf_counter() - self.started
        done = max(step - self.start_step, 1)
        values["tokens_per_s"] = values.get("tokens_total", 0.0) / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * max(self.total - step, 0)
        if not self.enabled:
            return values
        record = {"step": step, **{k: round(v, 8) for k, v in values.items()}, "time": round(time.time(), 3)}
        if self.remote:
            self.lines.append(json.dumps(record))
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in self.lines))
        else:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.bar is None:
            return values
        self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{values.get('lr', 0.0):.2e}",
                             tok_s=f"{values['tokens_per_s']:.0f}", eta=f"{eta:.0f}s", refresh=False)
        self.bar.update(step - self.bar.n)
        return values

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
