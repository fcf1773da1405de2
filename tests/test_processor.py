"""`Processor` end to end on real MP4s and the real tokenizer, against an oracle built from FFmpeg's filter
graph (PyAV) and the plain numpy + PIL spec pipeline."""
from __future__ import annotations

import math
import pathlib
import shutil

import av
import numpy as np
import pytest
from PIL import Image

from cogstream_jax import Processor
from cogstream_jax.data.image import compute_mixed_resize
from cogstream_jax.data.template import DEFAULT_SYSTEM_PROMPT
from cogstream_jax.data.tokens import IMAGE_TOKEN_ID
from cogstream_jax.errors import ConfigError, DataError, InputError, VideoError
from tests.mp4s import ffmpeg_graph_frames, write_test_video
from tests.spec_oracle import naive_patchify, naive_pixels, naive_resize

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "videollama3-7b"

CLIPS = {  # name: (fps, frame count, height, width) -- sizes deliberately not multiples of 14/28
    "landscape": (25, 183, 90, 158),
    "portrait": (30, 120, 158, 90),
    "small": (10, 51, 48, 40),
    "one_frame": (24, 1, 64, 96),
    "long": (2, 402, 32, 48),  # 201 sampled frames > 180
}
SCENARIOS = {
    "odd_landscape": ["landscape"],
    "portrait": ["portrait"],
    "one_frame_segment": ["one_frame", "small"],
    "more_than_180": ["long"],
    "two_segments": ["landscape", "portrait"],
    "three_segments": ["small", "landscape", "portrait"],
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("processor_clips")
    return {name: write_test_video(root, f"{name}.mp4", fps=fps, count=n, height=h, width=w, seed=i)
            for i, (name, (fps, n, h, w)) in enumerate(CLIPS.items())}


@pytest.fixture(scope="module")
def processor() -> Processor:
    return Processor.from_pretrained(REFERENCE)


def video_item(path) -> dict:
    return {"type": "video", "video": {"video_path": str(path), "fps": 1, "max_frames": 180}}


def conversation_for(paths) -> list[dict]:
    conversation = [{"role": "system", "content": "You are a helpful assistant."}]
    for k, path in enumerate(paths):
        conversation.append({"role": "user", "content": [video_item(path), {"type": "text", "text": f"Q{k}?"}]})
        conversation.append({"role": "assistant", "content": f"A{k}."})
        conversation.append({"role": "user", "content": f"Follow-up {k}?"})
        conversation.append({"role": "assistant", "content": f"B{k}."})
    return conversation[:-1]


def oracle(paths) -> dict:
    """Official behaviour re-derived independently: FFmpeg graph frames with the trim rule, arange timestamps,
    linspace to 180, shared resize budget, plain PIL/numpy pixels, hand-built prompt text."""
    total, seg_end, clips = 0.0, 0.0, []
    for path in paths:
        with av.open(str(path)) as container:
            duration = container.duration / 1e6
        frac = 1.0 if total == 0 else math.modf(total)[0]
        trim = 1 - frac
        window = (repr(trim), repr(math.floor(duration - trim) + trim)) if trim > 0 else None
        _, frames = ffmpeg_graph_frames(path, trim=window)
        stamps = np.arange(0.0, duration + 1.0, 1.0)[:len(frames)]
        if len(frames) > 180:
            keep = np.linspace(0, len(frames) - 1, 180, dtype=int)
            frames, stamps = frames[keep], stamps[keep]
        stamps = [float(t) + seg_end for t in stamps]
        seg_end = stamps[-1] + 1
        total += duration
        clips.append((frames, stamps))
    n_frames = sum(len(f) for f, _ in clips)
    rows, grids, text_parts = [], [], []
    for frames, stamps in clips:
        size = naive_resize(frames.shape[1], frames.shape[2], n_frames, 2)
        rows.append(naive_patchify(naive_pixels(frames, size), 2))
        grids.append((len(frames), size[0] // 14, size[1] // 14))
        per_frame = (size[0] // 28) * (size[1] // 28)
        text_parts.append(",".join(f"Time {round(t, 1)}s:" + "<image>" * per_frame for t in stamps) + "\n")
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for k, visual in enumerate(text_parts):
        text += f"<|im_start|>user\n{visual}Q{k}?<|im_end|>\n<|im_start|>assistant\nA{k}.<|im_end|>\n"
        text += f"<|im_start|>user\nFollow-up {k}?<|im_end|>\n"
        if k < len(text_parts) - 1:
            text += f"<|im_start|>assistant\nB{k}.<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    return {"pixel_values": np.concatenate(rows), "grid_sizes": grids, "text": text, "num_frames": n_frames,
            "timestamps": [t for _, stamps in clips for t in stamps]}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pixel_parity_and_prompt_on_real_streams(clips, processor, scenario):
    paths = [clips[name] for name in SCENARIOS[scenario]]
    expected = oracle(paths)
    out = processor(conversation=conversation_for(paths), return_text=True)
    assert out.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(out.pixel_values, expected["pixel_values"])
    assert out.grid_sizes.tolist() == [list(g) for g in expected["grid_sizes"]]
    assert out.merge_sizes.tolist() == [2] * len(paths) and out.modals == ["video"] * len(paths)
    assert out.timestamps == expected["timestamps"] and out.num_frames == expected["num_frames"]
    assert out.text == expected["text"]
    ids = processor.tokenizer(expected["text"])["input_ids"]
    assert out.input_ids.dtype == np.int32 and out.input_ids.tolist() == [ids]
    tokens = sum(t * (h // 2) * (w // 2) for t, h, w in expected["grid_sizes"])
    assert int((out.input_ids == IMAGE_TOKEN_ID).sum()) == tokens


def test_spec_worked_numbers_360x640(tmp_path, processor):
    path = write_test_video(tmp_path, "hd.mp4", fps=1, count=2, height=360, width=640)
    out = processor(conversation=[{"role": "user", "content": [video_item(path), {"type": "text", "text": "Hi"}]}])
    assert out.grid_sizes.tolist() == [[2, 26, 46]]  # 364x644 -> 13x23 = 299 tokens per frame
    assert int((out.input_ids == IMAGE_TOKEN_ID).sum()) == 2 * 299
    assert out.pixel_values.shape == (2 * 26 * 46, 588)
    assert out.input_ids[0, :3].tolist() == [151644, 8948, 198]  # default system turn added


def test_image_items_and_faithful_pil_swap(tmp_path):
    path = tmp_path / "w500_h300.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(path)
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(path)}, "What is this?"]}]
    plain = Processor.from_pretrained(REFERENCE)(conversation=conversation, return_text=True)
    swapped = Processor.from_pretrained(REFERENCE, faithful_image_swap=True)(conversation=conversation)
    assert plain.grid_sizes.tolist() == [[1, 21, 36]] and plain.merge_sizes.tolist() == [1]
    assert swapped.grid_sizes.tolist() == [[1, 36, 21]]  # the official PIL (W, H) mix-up
    assert plain.modals == ["image"] and plain.timestamps == [] and plain.num_frames == 1
    assert int((plain.input_ids == IMAGE_TOKEN_ID).sum()) == 21 * 36
    assert "<|im_start|>user\n<image>" in plain.text
    array_item = [{"role": "user", "content": [{"type": "image", "image": np.asarray(Image.open(path))}]}]
    by_array = Processor.from_pretrained(REFERENCE, faithful_image_swap=True)(conversation=array_item)
    assert by_array.grid_sizes.tolist() == [[1, 21, 36]]  # arrays are never swapped
    np.testing.assert_array_equal(by_array.pixel_values, plain.pixel_values)


def test_resize_override_and_frame_cache(clips):
    proc = Processor.from_pretrained(REFERENCE, cache_frames=True)
    conversation = conversation_for([clips["small"], clips["landscape"]])
    first = proc(conversation=conversation, resize_to=(56, 84))
    assert first.grid_sizes[:, 1:].tolist() == [[4, 6], [4, 6]]
    assert len(proc._frame_cache) == 2
    again = proc(conversation=conversation, resize_to=(56, 84))
    assert len(proc._frame_cache) == 2
    np.testing.assert_array_equal(first.pixel_values, again.pixel_values)
    with pytest.raises(InputError, match="resize_to"):
        proc(conversation=conversation, resize_to=(50, 84))


def test_frame_cache_decodes_a_clip_once_for_threads_asking_together(clips, monkeypatch):
    """Stage 2 prepares several QAs at once (`--prep_workers`), and consecutive QAs of a chain share clips: a clip
    another thread is decoding is waited for, not decoded again; a failed decode reaches every waiter and is not
    cached."""
    import threading
    from concurrent.futures import Future, ThreadPoolExecutor

    from cogstream_jax.data import processor as processor_module

    real, decoded, fail = processor_module.decode_plan, [], threading.Event()
    waiting = threading.Semaphore(0)

    class CountedFuture(Future):
        def result(self, timeout=None):
            waiting.release()  # a caller waits for a clip another thread decodes
            return super().result(timeout)

    def slow_decode(plan, *args, **kwargs):
        decoded.append(plan.path)
        for _ in range(callers - 1):  # the decode ends only once every other caller waits for it
            assert waiting.acquire(timeout=60)
        if fail.is_set():
            raise VideoError(f"{plan.path}: cannot be read")
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(processor_module, "Future", CountedFuture)
    monkeypatch.setattr(processor_module, "decode_plan", slow_decode)
    proc = Processor.from_pretrained(REFERENCE, cache_frames=True)
    conversation = conversation_for([clips["small"]])
    callers = 4
    with ThreadPoolExecutor(callers) as pool:
        outs = list(pool.map(lambda _: proc(conversation=conversation), range(callers)))
    assert len(decoded) == 1
    for out in outs[1:]:
        np.testing.assert_array_equal(out.pixel_values, outs[0].pixel_values)
    fail.set()
    other, callers = conversation_for([clips["landscape"]]), 3
    with ThreadPoolExecutor(callers) as pool:
        jobs = [pool.submit(proc, conversation=other) for _ in range(callers)]
    for job in jobs:
        with pytest.raises(VideoError, match="cannot be read"):
            job.result()
    assert len(decoded) == 2 and not proc._decoding
    fail.clear()
    callers = 1
    proc(conversation=other)  # not cached as failed: decoded again
    assert len(decoded) == 3


def test_missing_segment_names_the_file(clips, processor, tmp_path):
    missing = tmp_path / "vid_segment_2.mp4"
    with pytest.raises(VideoError, match=r"vid_segment_2\.mp4.*does not exist"):
        processor(conversation=conversation_for([clips["small"], missing]))


def test_corrupt_and_zero_length_segments(processor, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match=r"corrupt\.mp4"):
        processor(conversation=conversation_for([corrupt]))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4"):
        processor(conversation=conversation_for([empty]))


def test_bad_video_item_names_the_field(processor):
    bad = [{"role": "user", "content": [{"type": "video", "video": {"video_path": "x.mp4", "start": 3}}]}]
    with pytest.raises(DataError, match=r"conversation\[0\]\.content\[0\]\.video.*'start'"):
        processor(conversation=bad)
    zero_fps = [{"role": "user", "content": [{"type": "video", "video": {"video_path": "x.mp4", "fps": 0}}]}]
    with pytest.raises(DataError, match=r"content\[0\]\.video\.fps"):
        processor(conversation=zero_fps)
    no_path = [{"role": "user", "content": [{"type": "video", "video": {"fps": 1}}]}]
    with pytest.raises(DataError, match=r"content\[0\]\.video\.video_path"):
        processor(conversation=no_path)
    with pytest.raises(ConfigError, match="decoder"):
        Processor(processor.tokenizer, decoder="opencv")
    with pytest.raises(ConfigError, match="threads"):
        Processor(processor.tokenizer, threads=0)


def test_thread_count_does_not_change_outputs(clips, processor):
    conversation = conversation_for([clips[name] for name in SCENARIOS[sorted(SCENARIOS)[-1]]])
    single = Processor(processor.tokenizer, processor.settings, threads=1)(conversation=conversation)
    many = Processor(processor.tokenizer, processor.settings, threads=3)(conversation=conversation)
    np.testing.assert_array_equal(single.pixel_values, many.pixel_values)
    assert single.input_ids.tolist() == many.input_ids.tolist() and single.timestamps == many.timestamps


@pytest.mark.parametrize("missing", ["vocab.json", "tokenizer_config.json"])
def test_missing_tokenizer_files(tmp_path, missing):
    folder = tmp_path / "ckpt"
    shutil.copytree(REFERENCE, folder)
    (folder / missing).unlink()
    with pytest.raises(ConfigError, match=rf"ckpt.*{missing}"):
        Processor.from_pretrained(folder)
    with pytest.raises(ConfigError, match="does not exist"):
        Processor.from_pretrained(tmp_path / "nowhere")


def test_bad_processor_config_names_file_and_field(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(REFERENCE, folder)
    (folder / "preprocessor_config.json").write_text('{"patch_size": "14"}')
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*'patch_size'"):
        Processor.from_pretrained(folder)


def test_text_only_and_mixed_image_video(clips, processor, tmp_path):
    text_only = processor(conversation=[{"role": "user", "content": "Hello?"}])
    assert text_only.pixel_values is None and text_only.grid_sizes.shape == (0, 3) and text_only.num_frames == 0
    assert text_only.input_ids.tolist() == [processor.tokenizer(
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHello?<|im_end|>\n"
        "<|im_start|>assistant\n")["input_ids"]]
    image = np.random.default_rng(2).integers(0, 256, (70, 98, 3), dtype=np.uint8)
    mixed = [{"role": "user", "content": [{"type": "image", "image": image}, video_item(clips["small"]), "Q?"]}]
    out = processor(conversation=mixed)
    video_frames = ffmpeg_graph_frames(clips["small"])[1]
    sizes = compute_mixed_resize([(1, 70, 98, 1), (len(video_frames), 48, 40, 2)])  # batched_resize path
    assert out.merge_sizes.tolist() == [1, 2] and out.modals == ["image", "video"]
    assert out.grid_sizes.tolist() == [[1, sizes[0][0] // 14, sizes[0][1] // 14],
                                       [len(video_frames), sizes[1][0] // 14, sizes[1][1] // 14]]
    expected = np.concatenate([naive_patchify(naive_pixels(image[None], sizes[0]), 1),
                               naive_patchify(naive_pixels(video_frames, sizes[1]), 2)])
    np.testing.assert_array_equal(out.pixel_values, expected)
    assert out.num_frames == 1 + len(video_frames) and len(out.timestamps) == len(video_frames)
    assert out["input_ids"] is out.input_ids and "pixel_values" in out.keys()


def test_bad_image_items(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(VideoError, match=r"broken\.png.*cannot be read"):
        processor(conversation=[{"role": "user", "content": [{"type": "image", "image": {"image_path": str(broken)}}]}])
    with pytest.raises(VideoError, match=r"gone\.png.*does not exist"):
        processor(conversation=[{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "gone.png")}]}])
    with pytest.raises(DataError, match=r"conversation\[0\]\.content\[0\]\.image"):
        processor(conversation=[{"role": "user", "content": [{"type": "image", "image": np.zeros((4, 4), np.uint8)}]}])
