"""`Processor`: the official `Videollama3Qwen2Processor` call (conversation -> input_ids, pixel_values, grids)
built from our decoder, image pipeline, chat template and the real Qwen2 tokenizer.

Every call re-processes the whole conversation, as the official evaluation does (the resize budget is shared
by all frames of the call). The pieces (`plan_videos`, `decode`, `target_sizes`, `encode_item`, `tokenize`)
are public so that a streaming session can cache per-segment work; `cache_frames=True` keeps decoded clips.
"""
from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from cogstream_jax import remote
from cogstream_jax.io_utils import as_path
from cogstream_jax.data.image import (
    IMAGE_MERGE_SIZE,
    VIDEO_MERGE_SIZE,
    compute_mixed_resize,
    compute_resize,
    frames_to_patches,
)
from cogstream_jax.data.processor_config import ProcessorSettings, load_settings, load_tokenizer
from cogstream_jax.data.template import expand_image_tokens, item_kind, render_conversation, tokens_per_frame
from cogstream_jax.data.threads import resolve_threads
from cogstream_jax.data.video import DECODERS, ClipPlan, VideoClip, VideoProbe, decode_plan, plan_stream
from cogstream_jax.errors import ConfigError, DataError, InputError, VideoError

VIDEO_ARGS = {"video_path", "fps", "max_frames"}
#: decoded clips a `cache_frames=True` processor keeps (a 180-frame clip at 1 fps is a few hundred MB of pixels)
FRAME_CACHE_CLIPS = 32


@dataclass
class VisualItem:
    """One image or video of the conversation, decoded: uint8 frames [T, H, W, 3]."""

    modal: str  # "image" | "video"
    frames: np.ndarray
    merge_size: int
    timestamps: list[float] = field(default_factory=list)  # videos only, global timeline
    size_hw: tuple[int, int] = (0, 0)  # (H, W) the resize rule sees (swapped for PIL images if faithful)


@dataclass
class ProcessorOutput:
    """What the official processor returns (as numpy); also readable like a dict."""

    input_ids: np.ndarray  # int32 [1, L]
    pixel_values: np.ndarray | None  # float32 [N, 588]
    grid_sizes: np.ndarray  # int64 [n_items, 3]
    merge_sizes: np.ndarray  # int64 [n_items]
    modals: list[str]
    timestamps: list[float]  # every video frame, in order, on the global timeline
    num_frames: int  # official `total_image_num`: video frames plus 1 per image
    text: str | None = None  # expanded prompt text (return_text=True)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)


class Processor:
    """CogReasoner input processing: `Processor.from_pretrained(dir)(conversation=...)`."""

    def __init__(self, tokenizer, settings: ProcessorSettings = ProcessorSettings(), *,
                 faithful_image_swap: bool = False, decoder: str = "pyav", cache_frames: bool | int = False,
                 threads: int | None = None):
        """`threads`: host threads for decoding and resizing one clip (None: the usable cores, at most 8);
        outputs are identical for any count. `cache_frames`: keep decoded clips, at most that many (True:
        `FRAME_CACHE_CLIPS`), least recently used dropped first."""
        if decoder not in DECODERS:
            raise ConfigError(f"decoder: expected one of {', '.join(DECODERS)}, got {decoder!r}")
        self.tokenizer = tokenizer
        self.settings = settings
        self.faithful_image_swap = faithful_image_swap
        self.decoder = decoder
        try:
            self.threads = resolve_threads(threads)
        except ValueError:  # the flag that sets it (train-stage2, answer-generate)
            raise ConfigError(f"--decode_threads: expected a positive integer, got {threads!r}") from None
        limit = FRAME_CACHE_CLIPS if cache_frames is True else int(cache_frames)
        if limit < 0:
            raise ConfigError(f"cache_frames: expected a clip count >= 0, got {cache_frames!r}")
        self._frame_cache: collections.OrderedDict[tuple, VideoClip] | None = (
            collections.OrderedDict() if limit else None)
        self._frame_cache_limit = limit
        self._frame_cache_lock = threading.Lock()
        self._decoding: dict[tuple, Future] = {}  # clips being decoded now, by cache key

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> "Processor":
        """Tokenizer files plus `preprocessor_config.json` / `processor_config.json` from a folder (local or URL)."""
        directory = as_path(directory)
        return cls(load_tokenizer(directory), load_settings(directory), **kwargs)

    # ---------------------------------------------------------------- pieces
    def video_args(self, item: Mapping[str, Any], where: str) -> tuple[str, float, int | None]:
        """(path, fps, max_frames) of an official video item `{"type": "video", "video": {...}}`."""
        args = item.get("video")
        if not isinstance(args, Mapping):
            raise DataError(f"{where}.video: expected a dict with 'video_path', 'fps', 'max_frames'")
        unknown = sorted(set(args) - VIDEO_ARGS)
        if unknown:
            raise DataError(f"{where}.video: unsupported field(s) {unknown} (supported: {sorted(VIDEO_ARGS)})")
        if not isinstance(args.get("video_path"), (str, os.PathLike)):
            raise DataError(f"{where}.video.video_path: expected a file path, got {args.get('video_path')!r}")
        fps = args.get("fps", self.settings.fps)
        max_frames = args.get("max_frames", self.settings.max_frames)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
            raise DataError(f"{where}.video.fps: expected a positive number, got {fps!r}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames <= 0):
            raise DataError(f"{where}.video.max_frames: expected a positive integer or null, got {max_frames!r}")
        return os.fspath(args["video_path"]), fps, max_frames

    def plan_videos(self, conversation: Sequence[Mapping[str, Any]], fix_trim: bool = False
                    ) -> tuple[list[ClipPlan], list[VideoProbe]]:
        """Frame choice and global timestamps of every video item, in conversation order."""
        specs = [self.video_args(item, where) for item, where in _visual_items(conversation)
                 if item_kind(item) == "video"]
        return plan_stream([s[0] for s in specs], [s[1] for s in specs], [s[2] for s in specs], fix_trim=fix_trim)

    def decode(self, plan: ClipPlan, probe: VideoProbe | None = None) -> VideoClip:
        """Decode one planned clip (memoised when the processor was built with `cache_frames=True`; threads that
        ask for a clip another one is decoding wait for it rather than decode it again)."""
        if self._frame_cache is None:
            return decode_plan(plan, probe, decoder=self.decoder, threads=self.threads)
        size, mtime = remote.size_and_mtime(plan.path)
        key = (plan.path, mtime, size, plan.trim_time, plan.frame_indices)
        with self._frame_cache_lock:
            clip = self._frame_cache.get(key)
            if clip is not None:
                self._frame_cache.move_to_end(key)
                return clip
            pending = self._decoding.get(key)
            ours = pending is None
            if ours:
                pending = self._decoding[key] = Future()
        if not ours:
            return pending.result()
        try:
            clip = decode_plan(plan, probe, decoder=self.decoder, threads=self.threads)
            with self._frame_cache_lock:
                self._frame_cache[key] = clip
                while len(self._frame_cache) > self._frame_cache_limit:
                    self._frame_cache.popitem(last=False)
        except BaseException as e:
            pending.set_exception(e)  # every waiter gets it; the next request decodes again
            raise
        else:
            pending.set_result(clip)
        finally:
            with self._frame_cache_lock:
                del self._decoding[key]
        return clip

    def load_image(self, item: Mapping[str, Any], where: str) -> VisualItem:
        """An image item: a path (or `{"image_path": p}`), a PIL image or a uint8 HWC array."""
        source = item.get("image")
        if isinstance(source, Mapping):
            source = source.get("image_path")
        from_pil = isinstance(source, (str, os.PathLike, Image.Image))
        if isinstance(source, (str, os.PathLike)):
            image_path = os.fspath(source)
            if not remote.isfile(image_path):
                raise VideoError(f"{image_path}: image file does not exist ({where}.image)")
            try:
                with Image.open(remote.local_file(image_path)) as opened:
                    source = opened.convert("RGB")
            except (OSError, ValueError) as exc:
                raise VideoError(f"{image_path}: cannot be read as an image ({exc})") from None
        array = np.asarray(source.convert("RGB") if isinstance(source, Image.Image) else source)
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise DataError(f"{where}.image: expected a path, a PIL image or uint8 [H, W, 3], got "
                            f"{type(item.get('image')).__name__} {getattr(array, 'shape', '')}")
        height, width = array.shape[:2]
        size = (width, height) if (from_pil and self.faithful_image_swap) else (height, width)
        return VisualItem("image", array[None], self.settings.image_merge_size, size_hw=size)

    def load_visuals(self, conversation: Sequence[Mapping[str, Any]], fix_trim: bool = False) -> list[VisualItem]:
        """Decode every image and video item in conversation order."""
        plans, probes = self.plan_videos(conversation, fix_trim=fix_trim)
        clips = iter(zip(plans, probes))
        items: list[VisualItem] = []
        for item, where in _visual_items(conversation):
            if item_kind(item) == "video":
                clip = self.decode(*next(clips))
                items.append(VisualItem("video", clip.frames, self.settings.video_merge_size,
                                        list(clip.timestamps), clip.frames.shape[1:3]))
            else:
                items.append(self.load_image(item, where))
        return items

    def target_sizes(self, items: Sequence[VisualItem], resize_to: tuple[int, int] | None = None
                     ) -> list[tuple[int, int]]:
        """Resize targets of the official rule (one budget for all frames of the call) or a fixed override."""
        if resize_to is not None:
            height, width = (int(v) for v in resize_to)
            for item in items:
                factor = self.settings.image.patch_size * item.merge_size
                if height <= 0 or width <= 0 or height % factor or width % factor:
                    raise InputError(f"resize_to: {height}x{width} must be positive multiples of {factor}")
            return [(height, width)] * len(items)
        cfg = self.settings.image
        merges = {item.merge_size for item in items}
        if len(merges) > 1:
            return compute_mixed_resize([(len(i.frames), *i.size_hw, i.merge_size) for i in items],
                                        patch_size=cfg.patch_size, max_tokens=cfg.max_tokens)
        total = sum(len(item.frames) for item in items)
        return [compute_resize(*item.size_hw, total, item.merge_size, patch_size=cfg.patch_size,
                               min_tokens=cfg.min_tokens, max_tokens=cfg.max_tokens) for item in items]

    def encode_item(self, item: VisualItem, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Resize + rescale/normalise + patchify one item: ([t*gh*gw, 588], (t, gh, gw))."""
        return frames_to_patches(item.frames, size, item.merge_size, self.settings.image, threads=self.threads)

    def tokenize(self, text: str) -> np.ndarray:
        """Qwen2 tokenization without BOS or padding, as int32 [1, L]."""
        return np.asarray(self.tokenizer(text)["input_ids"], dtype=np.int32)[None, :]

    # ---------------------------------------------------------------- call
    def __call__(self, conversation: Sequence[Mapping[str, Any]] | None = None, *, add_system_prompt: bool = True,
                 add_generation_prompt: bool = True, fix_trim: bool = False, return_text: bool = False,
                 resize_to: tuple[int, int] | None = None) -> ProcessorOutput:
        if not isinstance(conversation, (list, tuple)):
            raise DataError("conversation: expected a list of {'role', 'content'} messages")
        items = self.load_visuals(conversation, fix_trim=fix_trim)
        sizes = self.target_sizes(items, resize_to)
        rows, grids = [], []
        for item, size in zip(items, sizes):
            item_rows, grid = self.encode_item(item, size)
            rows.append(item_rows)
            grids.append(grid)
        merge_sizes = [item.merge_size for item in items]
        text = render_conversation(conversation, video_timestamps=[i.timestamps for i in items if i.modal == "video"],
                                   add_system_prompt=add_system_prompt, add_generation_prompt=add_generation_prompt)
        text = expand_image_tokens(text, tokens_per_frame(grids, merge_sizes))
        return ProcessorOutput(
            input_ids=self.tokenize(text),
            pixel_values=np.concatenate(rows) if rows else None,
            grid_sizes=np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            merge_sizes=np.asarray(merge_sizes, dtype=np.int64),
            modals=[item.modal for item in items],
            timestamps=[t for item in items for t in item.timestamps],
            num_frames=sum(len(item.frames) for item in items),
            text=text if return_text else None,
        )


def _visual_items(conversation: Sequence[Mapping[str, Any]]):
    """(item, where) for every image/video content item, in order."""
    for index, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for position, item in enumerate(content):
            if isinstance(item, Mapping) and item_kind(item) in ("image", "video"):
                yield item, f"conversation[{index}].content[{position}]"


__all__ = ["Processor", "ProcessorOutput", "VisualItem", "IMAGE_MERGE_SIZE", "VIDEO_MERGE_SIZE"]
