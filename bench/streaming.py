"""Streaming latency per question: `StreamingSession(resize="fixed")` (each segment decoded and encoded once)
and reusing each adapter's prompt-prefix KV cache, vs the official protocol (`resize="faithful"`: every question
re-decodes and re-encodes every clip and prefills its whole prompt), bench-config
random model (vision 768 x 6 layers, LLM 896 x 8 layers), a 4-segment synthetic stream (160x120 MP4s, 8 s each),
12 questions (3 per segment; retrieval runs from question 2 on), answers forced to 16 tokens (no reachable EOS),
greedy, after a warm-up pass over an identical stream (all shapes compiled). On random weights the retrieval
output is random (its length, and a `no` head that drops all video), so by default the retrieval decode runs its
full 50 tokens and its result is pinned to "keep every history QA and the video" (`[yes,0,...,n-1]`): every turn
does the full work, deterministically (`--free_retrieval` uses the model's own output instead). Every turn's
latency is printed for both. Headline value = fixed-session latency at turn 12 / at turn 2 (target <= 1.5).
Run: `.venv/bin/python bench/streaming.py [--repeats 1]`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.common import emit, machine, median  # noqa: E402

SEGMENTS, SECONDS, FPS, SIZE = 4, 8, 4, (120, 160)
QUESTIONS_PER_SEGMENT = 3
QUESTIONS = [
    "What colour is the square?", "Where is it moving?", "Is anything else visible?",
    "Did the square change colour?", "How fast is it moving now?", "What happened to the background?",
    "Which direction did it turn?", "Is it the same square as before?", "What is at the top left?",
    "Summarise what happened so far.", "When did the square first appear?", "What changed in the last part?",
]


def write_stream(folder: str, seconds: int = SECONDS) -> list[str]:
    from cogstream_jax.data.mp4_writer import write_mp4

    rng = np.random.default_rng(0)
    h, w = SIZE
    paths = []
    for seg in range(SEGMENTS):
        background = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        frames = []
        for i in range(seconds * FPS):
            frame = background.copy()
            y, x = (i * 3 + seg * 20) % (h - 24), (i * 5 + seg * 30) % (w - 24)
            frame[y:y + 24, x:x + 24] = (60 * seg, 200, 255 - 60 * seg)
            frames.append(frame)
        paths.append(os.path.join(folder, f"bench_segment_{seg + 1}.mp4"))
        write_mp4(paths[-1], frames, FPS)
    return paths


def run_stream(session, paths: list[str]) -> tuple[list[float], list[dict]]:
    """Seconds per question (a turn that brings a new segment includes `add_segment`, where fixed encodes it) and
    each answer's own breakdown (visual, retrieval, events, answer seconds; prompt tokens; selection)."""
    session.reset("bench-stream")
    latencies, details = [], []
    for k, question in enumerate(QUESTIONS):
        start = time.perf_counter()
        if k % QUESTIONS_PER_SEGMENT == 0:
            session.add_segment(paths[k // QUESTIONS_PER_SEGMENT])
        answer = session.ask(question)
        latencies.append(time.perf_counter() - start)
        details.append({**{name: round(value, 3) for name, value in answer.timings.items()},
                        "prompt_tokens": answer.prompt_tokens, "selection": answer.selection})
    return latencies, details


def pinned_session_class():
    """A session whose retrieval decodes 50 tokens (unreachable EOS) and then keeps everything."""
    from cogstream_jax.data.prompts import format_selection
    from cogstream_jax.inference import retrieval
    from cogstream_jax.inference.session import StreamingSession
    from cogstream_jax.lora import set_adapter

    class PinnedRetrievalSession(StreamingSession):
        def _retrieve(self, current, hist_qs, hist_as):
            set_adapter(self.model, self.retrieval_adapter)
            retrieval.predict_selection(self.model, self.processor.tokenizer, current, hist_qs, hist_as,
                                        penalty=self.sampling.repetition_penalty,
                                        eos_token_id=self.model.config.text.vocab_size + 7,
                                        prefix=self._prefix("retrieval"))
            return retrieval.from_selection(format_selection(True, range(len(hist_qs))))

    return PinnedRetrievalSession


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=1, help="timed passes after the warm-up (median per turn)")
    p.add_argument("--seconds", type=int, default=SECONDS, help="length of each synthetic segment (1 frame/s)")
    p.add_argument("--free_retrieval", action="store_true", help="use the random model's own retrieval output")
    args = p.parse_args(argv)
    from flax import nnx

    from cogstream_jax import config as configs
    from cogstream_jax.data.processor import Processor
    from cogstream_jax.model.sampling import SamplingConfig
    from cogstream_jax.inference.session import SessionOptions, StreamingSession
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.reference_files import bundled_model_dir

    cfg = configs.bench()
    model = VideoLlama3(cfg, rngs=nnx.Rngs(0))
    processor = Processor.from_pretrained(bundled_model_dir())
    sampling = SamplingConfig.from_generation_config(bundled_model_dir()).greedy()
    never = (cfg.text.vocab_size + 7,)
    results, breakdown = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_stream(folder, args.seconds)
        for resize in ("fixed", "faithful"):
            session_class = StreamingSession if args.free_retrieval else pinned_session_class()
            # the official protocol prefills every prompt whole; the session keeps each adapter's KV prefix
            session = session_class(model, processor, sampling=sampling, options=SessionOptions(
                resize=resize, max_new_tokens=16, eos_token_ids=never, reuse_prefix=resize == "fixed"))
            run_stream(session, paths)  # warm-up: compiles every shape of this stream
            passes = [run_stream(session, paths) for _ in range(args.repeats)]
            results[resize] = [median(list(turn)) for turn in zip(*[p[0] for p in passes])]
            breakdown[resize] = passes[-1][1]
            calls = session.encoder.calls
            print(f"{resize:9s} vision-encoder runs over warm-up + timed passes: {calls}")
    print("turn   fixed_s  official_s   fixed: visual retrieval events answer  prompt  selection")
    for k, (a, b, d) in enumerate(zip(results["fixed"], results["faithful"], breakdown["fixed"]), start=1):
        print(f"{k:4d}  {a:8.3f}  {b:10.3f}   {d['visual_s']:13.3f} {d['retrieval_s']:9.3f} {d['events_s']:6.3f} "
              f"{d['answer_s']:6.3f}  {d['prompt_tokens']:6d}  {d['selection'][:40]}")
    fixed, official = results["fixed"], results["faithful"]
    emit("streaming", fixed[11] / fixed[1], fixed_turn_s=[round(x, 3) for x in fixed],
         official_turn_s=[round(x, 3) for x in official], official_ratio_12_2=round(official[11] / official[1], 3),
         speedup_turn_12=round(official[11] / fixed[11], 3), pinned_retrieval=not args.free_retrieval,
         machine=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
