"""`StreamingSession`: answer questions about a growing video stream (protocol 2, 6) with the two adapters.

    s = StreamingSession.from_pretrained(model_path, retrieval_adapter=DIR, answer_adapter=DIR,
                                         resize="faithful" | "fixed", max_stream_frames=180)
    s.add_segment("clip_1.mp4"); r = s.ask("What is the man holding?")
    r.answer, r.selection, r.selected_indices, r.if_visual, r.timings

Per question, as the official evaluation: render the whole conversation, Historic Dialogue Retrieval under
the retrieval adapter (skipped for the first question), history rewrite, vision features of every frame under
the answer adapter, question-aware event compression (> 135 frames) + DiffFP, then the answer under the answer
adapter; the prediction becomes the assistant turn that later questions see.

- `resize="faithful"`: every question re-decodes and re-encodes every clip at the resolution the shared
  budget gives for the whole conversation (spec 4.2), exactly as official.
- `resize="fixed"`: the per-frame resolution is the budget's answer for `max_stream_frames` frames; each clip is
  decoded and encoded ONCE in `add_segment` and its features are reused. Identical to faithful while the budget
  does not bind.

Prefix reuse (`reuse_prefix`, on by default): the retrieval and the answer prompt each keep their KV cache for
the rest of the stream, so a question prefills only what differs from the previous question's prompt (its new
history pair, clip and question); visual rows are matched by provenance (encoding uid, row), so the faithful
mode's re-encoded clips are recomputed. Outputs equal full prefills up to float rounding.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cogstream_jax.data.difffp import drop_masked_placeholders
from cogstream_jax.data.processor import Processor
from cogstream_jax.data.rewrite import history_of, rewrite, turns_from_conversation, unfiltered
from cogstream_jax.data.selection import parse_selection
from cogstream_jax.data.template import find_reserved, reserved_strings, strip_reserved
from cogstream_jax.errors import ConfigError, InputError
from cogstream_jax.inference import events, retrieval
from cogstream_jax.inference.prefix_cache import PrefixCache, generate_with_prefix
from cogstream_jax.inference.segments import (EncodedSegment, SegmentEncoder, StreamTimeline, frame_rows, row_keys,
                                              video_item)
from cogstream_jax.lora import set_adapter
from cogstream_jax.model.generate import DEFAULT_EOS
from cogstream_jax.model.sampling import SamplingConfig

RESIZE_MODES = ("faithful", "fixed")
SYSTEM_PROMPT = "You are a helpful assistant."  # answer_generate's first turn
PAD_ID = 151643


@dataclass(frozen=True)
class Answer:
    answer: str
    selection: str  # the retrieval output ('' when no retrieval ran: first question, AC mode)
    selected_indices: tuple[int, ...]
    if_visual: bool
    predicted_coi: list[int]
    minor_frames: tuple[int, ...] = ()
    num_events: int = 0  # events clustered by question-aware compression (0: it did not run)
    prompt_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionOptions:
    resize: str = "faithful"
    max_stream_frames: int = 180
    mode: str = "FCC"
    max_new_tokens: int = 1024
    embed_with: str = "full_module"
    seed: int = 42
    retrieval_max_new_tokens: int = retrieval.RETRIEVAL_MAX_NEW_TOKENS
    eos_token_ids: tuple[int, ...] = DEFAULT_EOS  # answer stop ids (benchmarks pass an unreachable id)
    reuse_prefix: bool = True  # keep the stream's KV caches and prefill only what changed (prefix_cache)

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize: expected one of {RESIZE_MODES}, got {self.resize!r}")
        if self.mode not in retrieval.MODES:
            raise ConfigError(f"mode: expected one of {retrieval.MODES}, got {self.mode!r}")
        if self.max_stream_frames < 1 or self.max_new_tokens < 1:
            raise ConfigError("max_stream_frames and max_new_tokens must be >= 1")
        events.embedding_adapter(self.embed_with, None, None)  # validates the choice


class StreamingSession:
    """One stream at a time; `reset` starts the next (the loaded model and compiled shapes are kept)."""

    def __init__(self, model, processor: Processor, *, retrieval_adapter: str | None = None,
                 answer_adapter: str | None = None, sampling: SamplingConfig = SamplingConfig(),
                 options: SessionOptions = SessionOptions()):
        self.model, self.processor, self.sampling, self.options = model, processor, sampling, options
        self.retrieval_adapter, self.answer_adapter = retrieval_adapter, answer_adapter
        self.reserved = reserved_strings(processor.tokenizer)
        self.encoder = SegmentEncoder(model, processor, answer_adapter)
        # one KV cache per prompt stream ("retrieval", "answer"), each filled under its own adapter
        self.prefixes: dict[str, PrefixCache] = {}
        self.reset()

    @classmethod
    def from_pretrained(cls, model_path: str, retrieval_adapter: str | None = None, answer_adapter: str | None = None,
                        resize: str = "faithful", max_stream_frames: int = 180, *, dtype: str = "float32",
                        greedy: bool = False, decode_threads: int | None = None,
                        devices: Sequence[Any] | None = None, **options: Any) -> "StreamingSession":
        """`model_path` is a checkpoint folder or the literal `tiny` (random tiny model, bundled tokenizer);
        `decode_threads` host threads decode and resize video (None: the usable cores, at most 8); `devices`:
        load the weights straight onto these devices (fsdp-sharded when several, inference/parallel.py) instead
        of the default device."""
        from cogstream_jax.inference.adapters import check_role, load_role_adapters
        from cogstream_jax.inference.loading import load_model_and_processor
        from cogstream_jax.inference.parallel import group_mesh, place_on

        check_role(retrieval_adapter, "retrieval", "--retrieval_adapter")  # fail before loading any weights
        check_role(answer_adapter, "answer", "--answer_adapter")
        mesh = group_mesh(devices) if devices else None
        model, processor, sampling = load_model_and_processor(model_path, dtype=dtype, decode_threads=decode_threads,
                                                              mesh=mesh)
        names = load_role_adapters(model, retrieval_adapter, answer_adapter)
        if devices:
            place_on(model, devices)  # the adapters join the weights; fused attention learns the group's mesh
        return cls(model, processor, retrieval_adapter=names[0], answer_adapter=names[1],
                   sampling=sampling.greedy() if greedy else sampling,
                   options=SessionOptions(resize=resize, max_stream_frames=max_stream_frames, **options))

    # ------------------------------------------------------------------ stream state
    def reset(self, stream_id: str = "") -> None:
        self.stream_id = stream_id
        self.conversation: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}]
        self.pending: list[str] = []
        self.cached: list[EncodedSegment] = []
        self.timeline = StreamTimeline()
        self.frames = 0
        self.questions = 0
        self.prefixes.clear()  # a stream's caches start empty: the same stream always compiles the same shapes

    def add_segment(self, path) -> None:
        """Queue the next clip; it becomes part of the next question's user turn (the fixed mode encodes it now)."""
        path = str(path)
        if self.options.resize == "fixed":
            plan, probe = self.timeline.plan(path)
            if self.frames + len(plan.timestamps) > self.options.max_stream_frames:
                raise ConfigError(f"{path}: the stream would hold {self.frames + len(plan.timestamps)} frames, more "
                                  f"than --max_stream_frames {self.options.max_stream_frames} that resize='fixed' "
                                  f"sized the frames for; raise --max_stream_frames or use --resize faithful")
            item = self.encoder.decode(plan, probe)
            self.cached.append(self.encoder.encode(item, self.encoder.fixed_size(item, self.options.max_stream_frames),
                                                   path))
            self.timeline.commit(plan, probe)
            self.frames += len(plan.timestamps)
        else:
            from cogstream_jax.data.video import probe_video

            probe_video(path)  # fail now, naming the file, rather than at the next question
        self.pending.append(path)

    def clear_prefix_caches(self) -> None:
        """Drop the kept KV caches (frees their memory; the next question prefills its whole prompt once)."""
        self.prefixes.clear()

    def _prefix(self, role: str) -> PrefixCache | None:
        return self.prefixes.setdefault(role, PrefixCache()) if self.options.reuse_prefix else None

    def question_key(self, index: int | None = None) -> jax.Array:
        """PRNG key of (seed, stream id, question index): independent of how streams are split across workers."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.options.seed), zlib.crc32(self.stream_id.encode()))
        return jax.random.fold_in(key, self.questions if index is None else index)

    def ask(self, question: str, *, gt_coi: Sequence[int] = (), gt_visual: bool = True) -> Answer:
        """Answer the next question; on failure the conversation is left as it was before the call."""
        saved = (list(self.conversation), list(self.pending))
        try:
            return self._ask(question, gt_coi, gt_visual)
        except BaseException:
            self.conversation, self.pending = saved
            raise

    # ------------------------------------------------------------------ one question
    def record_failure(self, question: str) -> None:
        """Keep a failed question in the conversation with an empty prediction (history indices stay aligned);
        reserved token strings are removed so that one bad question cannot break the later ones."""
        self._append_user_turn(strip_reserved(str(question), self.reserved))
        self.conversation.append({"role": "assistant", "content": ""})
        self.questions += 1

    def _ask(self, question: str, gt_coi: Sequence[int], gt_visual: bool) -> Answer:
        if not isinstance(question, str) or not question.strip():
            raise InputError("question: must be a non-empty string")
        token = find_reserved(question, self.reserved)
        if token is not None:
            raise InputError(f"question {self.questions}: contains the reserved token text {token!r}, which the "
                             "tokenizer would read as a special token (a frame placeholder or a turn boundary)")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        self._append_user_turn(question)
        segments = self._segments()
        timings["visual_s"] = time.perf_counter() - start
        turns = turns_from_conversation(self.conversation, video_timestamps=[s.timestamps for s in segments],
                                        tokens_per_frame=[s.tokens_per_frame for s in segments
                                                          for _ in range(s.num_frames)])
        hist_qs, hist_as, current = history_of(turns)
        tick = time.perf_counter()
        chosen = retrieval.select_for_mode(self.options.mode, len(hist_qs), predict=lambda: self._retrieve(
            current, hist_qs, hist_as), gt_coi=gt_coi, gt_visual=gt_visual)
        timings["retrieval_s"] = time.perf_counter() - tick
        rewritten = unfiltered(turns) if chosen.selection == "" else rewrite(turns, parse_selection(chosen.selection))
        key = self.question_key()
        tick = time.perf_counter()
        ids = self.processor.tokenize(rewritten.text)
        features, keys, compression = None, [], events.NO_COMPRESSION
        if rewritten.if_visual and rewritten.kept_frames:
            features, keys, mask, compression = self._visual_input(segments, rewritten.kept_frames, current,
                                                                   jax.random.fold_in(key, 1))
            ids = drop_masked_placeholders(ids, mask)
        timings["events_s"] = time.perf_counter() - tick
        limit = self.model.config.text.max_position_embeddings
        if ids.shape[1] + self.options.max_new_tokens > limit:
            raise InputError(f"question {self.questions}: prompt of {ids.shape[1]} tokens + max_new_tokens "
                             f"{self.options.max_new_tokens} exceeds the context limit {limit}")
        tick = time.perf_counter()
        set_adapter(self.model, self.answer_adapter)
        out = generate_with_prefix(self.model, self._prefix("answer"), ids, max_new_tokens=self.options.max_new_tokens,
                                   visual_features=features, visual_keys=keys, sampling=self.sampling,
                                   key=jax.random.fold_in(key, 2), penalize_prompt=False,
                                   eos_token_ids=self.options.eos_token_ids, pad_token_id=PAD_ID)
        text = self.processor.tokenizer.decode(list(out[0]), skip_special_tokens=True).strip()
        timings["answer_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - start
        # the answer is reported as generated, but re-enters later prompts without reserved token strings that
        # ordinary tokens can spell (e.g. "<image>"): they would re-tokenize as placeholders or turn markers
        self.conversation.append({"role": "assistant", "content": strip_reserved(text, self.reserved)})
        self.questions += 1
        return Answer(text, chosen.selection, chosen.indices, chosen.if_visual,
                      chosen.predicted_coi(len(hist_qs)), compression.minor_frames,
                      0 if compression.clusters is None else len(compression.clusters.center_times),
                      int(ids.shape[1]), timings)

    def _append_user_turn(self, question: str) -> None:
        for path in self.pending[:-1]:  # clips added without a question of their own
            self.conversation.append({"role": "user", "content": [video_item(path)]})
        if self.pending:
            self.conversation.append({"role": "user", "content": [video_item(self.pending[-1]),
                                                                  {"type": "text", "text": question}]})
        else:
            self.conversation.append({"role": "user", "content": question})
        self.pending = []

    def _segments(self) -> list[EncodedSegment]:
        if self.options.resize == "fixed":
            return list(self.cached)
        return self.encoder.encode_conversation(self.conversation)

    def _retrieve(self, current: str, hist_qs: list[str], hist_as: list[str]) -> retrieval.RetrievalOutput:
        set_adapter(self.model, self.retrieval_adapter)
        return retrieval.predict_selection(self.model, self.processor.tokenizer, current, hist_qs, hist_as,
                                           penalty=self.sampling.repetition_penalty,
                                           max_new_tokens=self.options.retrieval_max_new_tokens,
                                           prefix=self._prefix("retrieval"))

    def _visual_input(self, segments: list[EncodedSegment], kept_frames: Sequence[int], question: str,
                      key: jax.Array) -> tuple[jax.Array, list, np.ndarray, events.EventCompression]:
        """Features of the kept frames after event compression and DiffFP, each row's provenance key (for
        prefix reuse), and the matching placeholder mask."""
        features = jnp.concatenate([s.features for s in segments]) if len(segments) > 1 else segments[0].features
        keys = row_keys(segments)
        timestamps = [t for s in segments for t in s.timestamps]
        per_frame = {s.tokens_per_frame for s in segments}
        compression = events.NO_COMPRESSION
        if events.should_compress(len(timestamps)):
            if len(per_frame) != 1:
                raise InputError("event compression needs the same number of tokens in every frame "
                                 f"(got {sorted(per_frame)}); the segments have different frame sizes")
            set_adapter(self.model, events.embedding_adapter(self.options.embed_with, self.retrieval_adapter,
                                                             self.answer_adapter))
            compression = events.compress_events(self.model, self.processor.tokenizer, features, timestamps,
                                                 question, key)
            features = events.pool_minor_frames(features, compression.minor_frames, per_frame.pop())
        mask = events.override_minor_frames([s.clip_mask for s in segments], compression.minor_frames)
        rows = frame_rows(segments)
        for frame in compression.minor_frames:  # token 0 of a minor frame now holds the frame's mean
            keys[rows[frame]] = ("frame mean", keys[rows[frame]])
        kept = np.zeros(len(mask), bool)
        for f in kept_frames:
            kept[rows[f]:rows[f + 1]] = True
        if not kept.all():
            mask = mask[kept]
            features = features[jnp.asarray(np.nonzero(kept)[0])]
            keys = [k for k, keep in zip(keys, kept) if keep]
        chosen = np.nonzero(mask)[0]
        return features[jnp.asarray(chosen)], [keys[i] for i in chosen], mask, compression
