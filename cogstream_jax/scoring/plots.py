"""PNG figures of a scoring report (matplotlib, Agg backend: no display needed).

Fixed figure sizes and DPI, no tight bounding box, so every PNG has a known pixel size.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cogstream_jax.io_utils import as_given, atomic_write_bytes  # noqa: E402
from cogstream_jax.scoring import METRICS  # noqa: E402
from cogstream_jax.scoring.labels import CAPABILITIES  # noqa: E402
from cogstream_jax.scoring.paper_results import PAPER_ROWS  # noqa: E402

DPI = 100
SIZES_INCH = {"capabilities.png": (12.0, 4.5), "metrics.png": (6.0, 4.0), "retrieval.png": (6.0, 4.0)}


def expected_pixel_size(name: str) -> tuple[int, int]:
    width, height = SIZES_INCH[name]
    return int(round(width * DPI)), int(round(height * DPI))


def _save(fig: Any, path: Path) -> Path:
    """Render to memory, then one atomic write: a local temp file renamed, or one upload to a URL."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _none_to_zero(values: list[float | None]) -> list[float]:
    return [0.0 if value is None else value for value in values]


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        ax.bar([g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.legend(fontsize=8, loc="upper center", ncol=len(series))


def capability_figure(path: Path, report: dict[str, Any]) -> Path:
    fig, ax = plt.subplots(figsize=SIZES_INCH[path.name])
    groups = [f"{short}\n{name.split('/')[1].replace(' ', chr(10))}" for name, short in CAPABILITIES] + ["Avg."]
    ours = [report["overall"]["capabilities"][name] for name, _ in CAPABILITIES] + [report["overall"]["Avg"]]
    series = {"this run": _none_to_zero(ours)} | {name: list(values) for name, values in PAPER_ROWS.items()}
    _grouped_bars(ax, groups, series)
    ax.set_ylim(0, 115)
    ax.set_ylabel("score (0-100)")
    ax.set_title("Per-capability judge score")
    fig.subplots_adjust(bottom=0.2)
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)


def metric_figure(path: Path, report: dict[str, Any]) -> Path:
    fig, ax = plt.subplots(figsize=SIZES_INCH[path.name])
    values = _none_to_zero([report["overall"]["metrics"][m] for m in METRICS] + [report["overall"]["Avg"]])
    ax.bar(list(METRICS) + ["Avg."], values, color="tab:blue")
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (0-100)")
    ax.set_title("Judge metrics")
    return _save(fig, path)


def retrieval_figure(path: Path, report: dict[str, Any]) -> Path:
    fig, ax = plt.subplots(figsize=SIZES_INCH[path.name])
    retrieval = report["overall"]["retrieval"]
    names = ["accuracy", "precision", "recall", "f1"]
    series = {"flattened": [retrieval["flattened"][n] for n in names],
              "per-QA macro": [retrieval["per_qa_macro"][n] for n in names]}
    _grouped_bars(ax, names, series)
    ax.set_ylim(0, 1.15)
    ax.set_title("Historic dialogue retrieval")
    return _save(fig, path)


def write_plots(output_dir: Path, report: dict[str, Any]) -> list[Path]:
    output_dir = as_given(output_dir)
    return [capability_figure(output_dir / "capabilities.png", report),
            metric_figure(output_dir / "metrics.png", report),
            retrieval_figure(output_dir / "retrieval.png", report)]
