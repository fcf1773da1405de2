"""Scripted scenes of moving coloured shapes for the synthetic CogStream data (protocol section 8).

A scene is a few shapes (one circle, square, triangle at most, so "the circle" is unambiguous) that bounce off
the frame edges. Scripted events happen at segment boundaries: a new shape appears, or a shape changes colour.
Everything the QA templates say (colours, positions, bounces, appearance order) is computed from this state,
so answers and the chain-of-reasoning links are correct by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
BACKGROUND = (24, 24, 24)


@dataclass(frozen=True)
class Shape:
    """A shape that appears at the start of segment `appear_segment` and may recolour at `recolor_segment`."""

    kind: str
    colors: tuple[str, str]  # (initial colour, colour after the recolour event)
    appear_segment: int
    recolor_segment: int | None
    start: tuple[float, float]  # normalised (x, y) centre when it appears
    velocity: tuple[float, float]  # normalised units per second

    def color_in(self, segment: int) -> str:
        changed = self.recolor_segment is not None and segment >= self.recolor_segment
        return self.colors[1] if changed else self.colors[0]

    def name_in(self, segment: int) -> str:
        return f"{self.color_in(segment)} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    segment_ends: tuple[float, ...]  # seconds, cumulative
    fps: float
    size: tuple[int, int]  # (height, width), even

    def segment_start(self, k: int) -> float:
        return 0.0 if k == 0 else self.segment_ends[k - 1]

    def visible(self, k: int) -> list[Shape]:
        return [s for s in self.shapes if s.appear_segment <= k]


def _reflect(u: np.ndarray | float) -> np.ndarray | float:
    """Triangle wave folding an unbounded coordinate into [0, 1] (bouncing off the edges)."""
    u = np.mod(u, 2.0)
    return np.where(u > 1.0, 2.0 - u, u)


def position(shape: Shape, scene: Scene, t: float, margin: float = 0.15) -> tuple[float, float]:
    """Normalised centre of a shape at time t (it moves inside [margin, 1 - margin])."""
    t0 = scene.segment_start(shape.appear_segment)
    span = 1.0 - 2 * margin
    out = []
    for p0, v in zip(shape.start, shape.velocity):
        u = (p0 - margin) / span + v * (t - t0) / span
        out.append(margin + span * float(_reflect(u)))
    return out[0], out[1]


def bounces(shape: Shape, scene: Scene, k: int) -> list[tuple[float, str]]:
    """(time, edge) of every bounce of the shape during segment k, edges 'left'/'right'/'top'/'bottom'."""
    t_start = max(scene.segment_start(k), scene.segment_start(shape.appear_segment))
    times = np.arange(t_start, scene.segment_ends[k], 0.05)
    if len(times) < 3:
        return []
    xs, ys = np.array([position(shape, scene, float(t)) for t in times]).T
    events = []
    for axis, values, edges in ((0, xs, ("left", "right")), (1, ys, ("top", "bottom"))):
        step = np.diff(values)
        turns = np.nonzero(np.sign(step[1:]) * np.sign(step[:-1]) < 0)[0]
        for i in turns:
            edge = edges[1] if step[i] > 0 else edges[0]
            events.append((float(times[i + 1]), edge))
    return sorted(events)


def region(x: float, y: float) -> str:
    """Coarse position words, e.g. 'top-left' or 'centre'."""
    col = "left" if x < 0.4 else "right" if x > 0.6 else ""
    row = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
    return "-".join(p for p in (row, col) if p) or "centre"


def heading(shape: Shape, scene: Scene, t: float) -> str:
    """'left'/'right' and 'up'/'down' direction at time t, from a small finite difference."""
    x0, y0 = position(shape, scene, t)
    x1, y1 = position(shape, scene, t + 0.05)
    return f"{'right' if x1 >= x0 else 'left'} and {'down' if y1 >= y0 else 'up'}"


def _mask(kind: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)  # triangle, apex up


def render_frame(scene: Scene, t: float, segment: int) -> np.ndarray:
    """uint8 [H, W, 3] frame at time t: the background plus every visible shape in its current colour."""
    h, w = scene.size
    frame = np.empty((h, w, 3), np.uint8)
    frame[:] = BACKGROUND
    r = max(3.0, min(h, w) * 0.12)
    for shape in scene.visible(segment):
        x, y = position(shape, scene, t)
        frame[_mask(shape.kind, h, w, x * w, y * h, r)] = PALETTE[shape.color_in(segment)]
    return frame


def make_scene(rng: np.random.Generator, segment_lengths: list[float], fps: float, size: tuple[int, int]) -> Scene:
    """Random scene: shape 0 from the start, one more shape per later segment (up to 3), one recolour event."""
    n_seg = len(segment_lengths)
    kinds = list(rng.permutation(SHAPES))
    colors = list(rng.permutation(list(PALETTE)))
    shapes = []
    for i in range(min(3, n_seg)):
        recolor = int(rng.integers(i + 1, n_seg)) if i == 0 and n_seg > 1 else None
        speed = rng.uniform(0.08, 0.2, size=2) * rng.choice([-1.0, 1.0], size=2)
        shapes.append(
            Shape(
                kind=str(kinds[i]),
                colors=(str(colors[i]), str(colors[3 + i])),
                appear_segment=i,
                recolor_segment=recolor,
                start=tuple(float(v) for v in rng.uniform(0.25, 0.75, size=2)),
                velocity=(float(speed[0]), float(speed[1])),
            )
        )
    ends = tuple(float(v) for v in np.cumsum(segment_lengths))
    return Scene(shapes=tuple(shapes), segment_ends=ends, fps=fps, size=size)
