"""Stage-2 training records: one `Stage2Sample` per QA of a chain, over the growing conversation.

Kept apart from the grain pipelines (`data/pipelines.py`) so that code turning samples into model inputs, the
bucketing and the GPU benches import without grain (the lent GPU machines' image has none).
"""
from __future__ import annotations

from dataclasses import dataclass

from cogstream_jax.data.dataset import VideoRecord
from cogstream_jax.data.prompts import format_selection

SYSTEM_PROMPT = "You are a helpful assistant."  # the official evaluation/stage-2 system turn
ANSWER_SUFFIX = "<|im_end|>"


@dataclass(frozen=True)
class Stage2Config:
    seed: int = 42
    num_epochs: int | None = 1
    fps: float = 1
    max_frames: int = 180


@dataclass(frozen=True)
class Stage2Sample:
    """One stage-2 step: the official-style conversation up to the current question (GT answers as assistant
    turns), the segment files of its video items, and the GT answer / COI / is_visual for the rewrite."""

    video: str
    chain_index: int
    qa_index: int
    conversation: tuple[dict, ...]
    segment_paths: tuple[str, ...]
    question: str
    answer: str
    coi: tuple[int, ...]
    is_visual: bool

    @property
    def target(self) -> str:
        """What the loss supervises: the GT answer plus `<|im_end|>` (official second_stage_training)."""
        return self.answer + ANSWER_SUFFIX

    @property
    def selection(self) -> str:
        """The ground-truth selection string fed to the rewrite, `[yes|no,*COI]`."""
        return format_selection(self.is_visual, self.coi)


def stage2_episode(video: VideoRecord, chain_index: int, config: Stage2Config = Stage2Config()) -> list[Stage2Sample]:
    """All samples of one chain: the first QA of each segment carries the segment's video item (protocol 2)."""
    chain = video.chains[chain_index]
    segments = video.segment_of_qa[chain_index]
    conversation: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}]
    paths: list[str] = []
    shown: set[int] = set()
    samples = []
    for k, (qa, seg) in enumerate(zip(chain.qas, segments)):
        if seg not in shown:
            shown.add(seg)
            path = str(video.segments[seg])
            paths.append(path)
            item = {"type": "video", "video": {"video_path": path, "fps": config.fps, "max_frames": config.max_frames}}
            conversation.append({"role": "user", "content": [item, {"type": "text", "text": qa.question}]})
        else:
            conversation.append({"role": "user", "content": qa.question})
        samples.append(Stage2Sample(video.name, chain.index, k, tuple(conversation), tuple(paths), qa.question,
                                    qa.answer, qa.coi, qa.is_visual))
        conversation.append({"role": "assistant", "content": qa.answer})
    return samples
