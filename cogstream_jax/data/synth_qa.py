"""Template QA chains over a scripted scene, covering the 11 CogStream capabilities (protocol 3.4 and 8).

A chain walks the segments in time order. Each segment gets at least one Basic (L1) question, so the official
zip rule maps every segment (protocol 1.4). Streaming and Global questions link to earlier QAs of the SAME chain,
and those links are the ground-truth COI: Co-reference -> the question it refers to, Dialogue Recalling -> the
recalled QA (is_visual False), Dynamic Updating -> the earlier colour question, Object Tracking -> the first
question about the object, Reasoning/Summary -> the related earlier QAs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cogstream_jax.data.synth_scene import Scene, Shape, bounces, heading, position, region


@dataclass
class DraftQA:
    question: str
    answer: str
    label: str
    segment: int
    coi: list[int] = field(default_factory=list)
    is_visual: bool = True
    about: str | None = None  # shape kind the QA is about (for later links)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class ChainBuilder:
    """Builds one chain; `optional_p` is the chance to include each optional question."""

    def __init__(self, scene: Scene, rng: np.random.Generator, optional_p: float) -> None:
        self.scene, self.rng, self.p = scene, rng, optional_p
        self.qas: list[DraftQA] = []

    def _add(self, qa: DraftQA) -> None:
        self.qas.append(qa)

    def _want(self) -> bool:
        return bool(self.rng.random() < self.p)

    def _first_about(self, kind: str, labels: tuple[str, ...] | None = None) -> int | None:
        matches = (i for i, q in enumerate(self.qas) if q.about == kind and (labels is None or q.label in labels))
        return next(matches, None)

    def _basic(self, k: int, shape: Shape) -> None:
        s, end = self.scene, self.scene.segment_ends[k]
        name = shape.name_in(k)
        self._add(DraftQA(f"What color is the {shape.kind}?", f"The {shape.kind} is {shape.color_in(k)}.",
                          "Basic/Attributes", k, about=shape.kind))
        attr = len(self.qas) - 1
        if self._want() or k == 0:
            moves = heading(shape, s, s.segment_start(k) + 0.5)
            self._add(DraftQA("How is it moving?", f"The {name} moves {moves}, bouncing off the edges of the frame.",
                              "Basic/Co-reference", k, [attr], about=shape.kind))
        if self._want():
            x, y = position(shape, s, end - 0.5)
            self._add(DraftQA(f"What does the {name} do near the end of this part?",
                              f"It keeps gliding across the frame and is in the {region(x, y)} area.",
                              "Basic/Actions", k, about=shape.kind))

    def _items(self, k: int) -> None:
        names = [f"a {s.name_in(k)}" for s in self.scene.visible(k)]
        self._add(DraftQA("Which shapes can be seen in this part of the video?", _join(names).capitalize() + ".",
                          "Basic/Items", k))

    def _streaming(self, k: int) -> None:
        s = self.scene
        new = [x for x in s.shapes if x.appear_segment == k]
        old = [x for x in s.shapes if x.appear_segment < k]
        if new and old and self._want():
            first, later = old[0], new[0]
            links = [i for i in (self._first_about(first.kind), self._first_about(later.kind)) if i is not None]
            self._add(DraftQA(f"Which appeared first, the {first.kind} or the {later.kind}?",
                              f"The {first.kind} appeared first; the {later.kind} appeared later, at about "
                              f"{s.segment_start(k):.0f} seconds.", "Streaming/Sequence Perception", k, links))
        for shape in s.visible(k):
            if shape.recolor_segment == k and self._want():
                link = self._first_about(shape.kind, ("Basic/Attributes", "Streaming/Dynamic Updating"))
                self._add(DraftQA(f"What color is the {shape.kind} now?",
                                  f"It is {shape.colors[1]} now; earlier it was {shape.colors[0]}.",
                                  "Streaming/Dynamic Updating", k, [] if link is None else [link], about=shape.kind))
        tracked = [x for x in old if self._first_about(x.kind) is not None]
        if tracked and self._want():
            shape = tracked[int(self.rng.integers(len(tracked)))]
            x, y = position(shape, s, s.segment_ends[k])
            self._add(DraftQA(f"Where is the {shape.kind} we saw earlier at the end of this part?",
                              f"The {shape.name_in(k)} is in the {region(x, y)} of the frame.",
                              "Streaming/Object Tracking", k, [self._first_about(shape.kind)], about=shape.kind))
        if self._want():
            self._reasoning(k)
        recallable = [i for i, q in enumerate(self.qas) if q.label.startswith("Basic/") and q.segment < k]
        if recallable and self._want():
            i = recallable[int(self.rng.integers(len(recallable)))]
            about = self.qas[i].about or "shapes"
            self._add(DraftQA(f"Do you remember what I asked about the {about}?",
                              f"Yes. You asked '{self.qas[i].question}', and I answered '{self.qas[i].answer}'",
                              "Streaming/Dialogue Recalling", k, [i], is_visual=False, about=self.qas[i].about))

    def _reasoning(self, k: int) -> None:
        for shape in self.scene.visible(k):
            events = bounces(shape, self.scene, k)
            if events:
                t, edge = events[0]
                link = self._first_about(shape.kind)
                self._add(DraftQA(f"Why did the {shape.kind} change direction at about {t:.0f} seconds?",
                                  f"Because it reached the {edge} edge of the frame and bounced back.",
                                  "Streaming/Reasoning", k, [link] if link is not None else [], about=shape.kind))
                return
        self._add(DraftQA("Why do the shapes never leave the frame?",
                          "Because each shape bounces back whenever it reaches an edge.", "Streaming/Reasoning", k))

    def _global(self, k: int) -> None:
        s = self.scene
        shapes = s.visible(k)
        if self._want() or k == len(s.segment_ends) - 1:
            events = [f"a {x.colors[0]} {x.kind} appeared at {s.segment_start(x.appear_segment):.0f} s" for x in shapes]
            events += [f"the {x.kind} turned {x.colors[1]} at {s.segment_start(x.recolor_segment):.0f} s"
                       for x in shapes if x.recolor_segment is not None and x.recolor_segment <= k]
            links = [i for i, q in enumerate(self.qas) if q.label in ("Basic/Items", "Streaming/Dynamic Updating")][:3]
            self._add(DraftQA("Summarize what has happened in the video so far.",
                              _join(events).capitalize() + "; all shapes keep bouncing around the frame.",
                              "Global/Overall Summary", k, links))
            self._add(DraftQA("How many different shapes have appeared in the whole video so far?",
                              f"{len(shapes)}: {_join([f'a {x.kind}' for x in shapes])}.", "Global/Global Analysis", k,
                              [len(self.qas) - 1]))

    def build(self) -> list[DraftQA]:
        last = len(self.scene.segment_ends) - 1
        for k in range(last + 1):
            visible = self.scene.visible(k)
            focus = visible[int(self.rng.integers(len(visible)))]
            self._basic(k, focus)
            if self._want() or k == 0:
                self._items(k)
            if k > 0:
                self._streaming(k)
            if k == last:
                self._global(k)
        return self.qas


def build_chains(scene: Scene, rng: np.random.Generator, n_chains: int) -> list[list[DraftQA]]:
    """Chain 0 includes every applicable question (so all capabilities appear); later chains are random subsets."""
    return [ChainBuilder(scene, rng, 1.0 if c == 0 else 0.6).build() for c in range(n_chains)]
