"""Video decoding and frame selection against FFmpeg's own filter graph (PyAV) on real MP4 files."""
from __future__ import annotations

import math
import pathlib
from fractions import Fraction

import av
import numpy as np
import pytest

from cogstream_jax.data.frame_selection import (
    option_microseconds,
    select_frame_indices,
    subsample_indices,
    trim_window,
)
from cogstream_jax.data.frame_decoder import DecodeIndex, DecodeStats, decode_frames
from cogstream_jax.data.video import load_stream, load_video, probe_video, stream_trim_time
from cogstream_jax.errors import VideoError
from tests.mp4s import ffmpeg_graph_frames, write_bframe_video, write_test_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Small real MP4s: the issue's 25 fps 7.3 s and 30 fps 4.0 s clips, an 8.0 s clip (integer cumulative
    duration), a 1-frame clip, a B-frame clip and odd frame rates."""
    root = tmp_path_factory.mktemp("videos")
    spec = {
        "a_25fps_7.3s.mp4": dict(fps=25, count=183, height=36, width=64),
        "b_30fps_4.0s.mp4": dict(fps=30, count=120, height=48, width=40, seed=1),
        "c_25fps_8.0s.mp4": dict(fps=25, count=200, height=36, width=64, seed=2),
        "d_24fps_1frame.mp4": dict(fps=24, count=1, height=32, width=48, seed=3),
        "e_29.97fps_3.4s.mp4": dict(fps=29.97, count=101, height=32, width=48, seed=4),
        "f_7fps_5.1s.mp4": dict(fps=7, count=36, height=32, width=48, seed=5),
    }
    out = {name: write_test_video(root, name, **kw) for name, kw in spec.items()}
    out["g_bframes.mp4"] = write_bframe_video(root, "g_bframes.mp4", fps=30, count=95, height=32, width=48, seed=6)
    return out


def oracle_timestamps(path: pathlib.Path, count: int, offset: float = 0.0) -> list[float]:
    """The official `np.arange(start, start + duration + 1/fps, 1/fps)[:T]` from ffprobe-style fields."""
    with av.open(str(path)) as container:
        duration = container.duration / 1e6
    return [float(t) + offset for t in np.arange(0.0, duration + 1.0, 1.0)[:count]]


def oracle_trim(path: pathlib.Path, trim_time: float) -> tuple[str, str] | None:
    if trim_time <= 0:
        return None
    with av.open(str(path)) as container:
        start, end = trim_window(trim_time, container.duration / 1e6)
    return repr(start), repr(end)  # ffmpeg-python passes str(float)


# ----------------------------------------------------------------------------- pure selection
def test_select_frame_indices_pure_examples():
    tb = Fraction(1, 12800)
    pts_25 = [i * 512 for i in range(183)]  # 25 fps, 7.32 s
    assert select_frame_indices(pts_25, 183 * 512, tb, duration=7.32) == [25 * k for k in range(8)]
    # round=up: a frame exactly on a tick is chosen for it; between ticks the latest frame at or before it.
    pts_7 = [round(i * 12800 / 7) for i in range(36)]
    assert select_frame_indices(pts_7, round(36 * 12800 / 7), tb, duration=36 / 7) == [0, 7, 14, 21, 28, 35]
    # trim 0.68 s then an integer-length window: frames 17.. of a 25 fps clip, 3 output frames
    pts_30 = [i * 512 for i in range(100)]
    assert select_frame_indices(pts_30, 100 * 512, tb, duration=4.0, trim_time=0.68) == [17, 42, 67]
    assert subsample_indices(200, 180)[:3] == [0, 1, 2] and subsample_indices(200, 180)[-1] == 199
    assert subsample_indices(5, 180) == [0, 1, 2, 3, 4]


def test_option_parsing_truncates_to_microseconds():
    assert option_microseconds(0.68) == 680000
    assert option_microseconds(1 - math.modf(7.32)[0]) == 679999  # 0.6799999999999997 -> cut, not rounded
    assert option_microseconds(3.0) == 3000000


def test_stream_trim_rule_faithful_and_fixed():
    assert stream_trim_time(0.0) == 0.0
    assert stream_trim_time(7.32) == pytest.approx(0.68)
    assert stream_trim_time(8.0) == 1.0  # the quirk: an integer cumulative duration drops one second
    assert stream_trim_time(8.0, fix_trim=True) == 0.0


# ----------------------------------------------------------------------------- against FFmpeg's graph
@pytest.mark.parametrize("name", ["a_25fps_7.3s.mp4", "b_30fps_4.0s.mp4", "d_24fps_1frame.mp4",
                                  "e_29.97fps_3.4s.mp4", "f_7fps_5.1s.mp4", "g_bframes.mp4"])
@pytest.mark.parametrize("trim_time", [0.0, 0.68, 1 - math.modf(7.32)[0], 0.5])
def test_single_clip_matches_ffmpeg_graph(videos, name, trim_time):
    path = videos[name]
    trim = oracle_trim(path, trim_time)
    if trim is not None and float(trim[1]) <= float(trim[0]):
        with pytest.raises(VideoError, match="no frames"):
            load_video(path, trim_time=trim_time)
        return
    indices, rgb = ffmpeg_graph_frames(path, trim=trim)
    clip = load_video(path, fps=1, max_frames=180, trim_time=trim_time)
    assert clip.frame_indices == indices
    np.testing.assert_array_equal(clip.frames, rgb)  # same pixels as FFmpeg's rgb24 output
    assert clip.timestamps == oracle_timestamps(path, len(indices))


def test_25fps_then_30fps_stream_faithful(videos):
    a, b = videos["a_25fps_7.3s.mp4"], videos["b_30fps_4.0s.mp4"]
    clips = load_stream([a, b], fps=1, max_frames=180)
    first, _ = ffmpeg_graph_frames(a)
    second, second_rgb = ffmpeg_graph_frames(b, trim=oracle_trim(b, 1 - math.modf(7.32)[0]))
    assert clips[0].frame_indices == first == [0, 25, 50, 75, 100, 125, 150, 175]
    assert clips[1].frame_indices == second
    np.testing.assert_array_equal(clips[1].frames, second_rgb)
    assert clips[0].timestamps == [float(t) for t in range(8)]
    assert clips[1].timestamps == oracle_timestamps(b, len(second), offset=8.0) == [8.0, 9.0, 10.0]


@pytest.mark.parametrize("fix_trim", [False, True])
def test_integer_cumulative_duration_faithful_and_fixed(videos, fix_trim):
    c, b = videos["c_25fps_8.0s.mp4"], videos["b_30fps_4.0s.mp4"]
    assert probe_video(c).duration == 8.0
    clips = load_stream([c, b], fix_trim=fix_trim)
    expected, _ = ffmpeg_graph_frames(b, trim=None if fix_trim else oracle_trim(b, 1.0))
    assert clips[1].frame_indices == expected
    assert clips[1].frame_indices[0] == (0 if fix_trim else 30)  # faithful mode loses the first second
    assert len(clips[1].frame_indices) == (4 if fix_trim else 3)
    assert clips[1].timestamps[0] == 8.0


def test_three_segments_timeline(videos):
    paths = [videos["e_29.97fps_3.4s.mp4"], videos["f_7fps_5.1s.mp4"], videos["a_25fps_7.3s.mp4"]]
    clips = load_stream(paths)
    total, offset = 0.0, 0.0
    for path, clip in zip(paths, clips):
        trim = stream_trim_time(total)
        expected, _ = ffmpeg_graph_frames(path, trim=oracle_trim(path, trim))
        assert clip.frame_indices == expected
        assert clip.timestamps == oracle_timestamps(path, len(expected), offset)
        total += probe_video(path).duration
        offset = clip.timestamps[-1] + 1
    stamps = [t for clip in clips for t in clip.timestamps]
    assert stamps == sorted(stamps) and stamps == [float(i) for i in range(len(stamps))]


def test_more_than_max_frames_subsampled_by_linspace(tmp_path):
    path = write_test_video(tmp_path, "long.mp4", fps=2, count=402, height=32, width=48)  # 201 s -> 201 frames
    indices, _ = ffmpeg_graph_frames(path)
    assert len(indices) > 180
    clip = load_video(path, fps=1, max_frames=180)
    keep = np.linspace(0, len(indices) - 1, 180, dtype=int)
    assert clip.frame_indices == [indices[k] for k in keep]
    assert clip.timestamps == [oracle_timestamps(path, len(indices))[k] for k in keep]
    assert clip.frames.shape == (180, 32, 48, 3)


def test_decord_backend_decodes_the_same_pixels(videos):
    path = videos["a_25fps_7.3s.mp4"]
    ours = load_video(path)
    other = load_video(path, decoder="decord")
    assert other.frame_indices == ours.frame_indices
    np.testing.assert_array_equal(other.frames, ours.frames)


# ----------------------------------------------------------------------------- bad input
def test_edit_list_preroll_frames_are_not_counted(tmp_path):
    """A stream-copy cut (`ffmpeg -ss 2.5 -c copy`) keeps the packets from the keyframe on and hides the first
    25 behind an edit list: the decoder uses them as references but never outputs them, and FFmpeg's graph
    starts at the cut."""
    source = write_test_video(tmp_path, "source.mp4", fps=10, count=120, height=32, width=48, seed=3)
    cut = tmp_path / "cut.mp4"
    with av.open(str(source)) as src, av.open(str(cut), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        packets = [p for p in src.demux(src.streams.video[0]) if p.size]
        step = packets[1].dts - packets[0].dts
        for packet in packets:
            packet.stream, packet.pts, packet.dts = out, packet.pts - 25 * step, packet.dts - 25 * step
            dst.mux(packet)
    indices, rgb = ffmpeg_graph_frames(cut)
    probe = probe_video(cut)
    assert len(probe.pts) == 95 and len(probe.decode_index.decode_pts) == 120
    for threads in (1, 2):
        clip = load_video(cut, fps=1, max_frames=None, threads=threads)
        assert clip.frame_indices == indices and clip.timestamps == [float(t) for t in range(len(indices))]
        np.testing.assert_array_equal(clip.frames, rgb)


def test_frames_missing_after_the_shortcuts_are_redone_by_a_plain_decode(short_gop_videos, monkeypatch):
    import cogstream_jax.data.frame_decoder as frame_decoder

    path = short_gop_videos["b_frames"]
    expected = load_video(path, fps=1, max_frames=9)
    real, plain_calls = frame_decoder._decode_group, []

    def lossy(path_, index, targets, runs, skip_disposable):
        frames, stats = real(path_, index, targets, runs, skip_disposable)
        if skip_disposable:
            frames.pop(min(frames))  # as if the reduced packet stream made the decoder drop a picture
        else:
            plain_calls.append(len(targets))
        return frames, stats

    monkeypatch.setattr(frame_decoder, "_decode_group", lossy)
    clip = load_video(path, fps=1, max_frames=9)
    assert plain_calls and clip.frame_indices == expected.frame_indices
    np.testing.assert_array_equal(clip.frames, expected.frames)


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match=r"missing\.mp4.*does not exist"):
        load_video(tmp_path / "missing.mp4")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match=r"corrupt\.mp4"):
        load_video(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4.*empty"):
        load_video(path)


def test_zero_frame_video(tmp_path):
    path = tmp_path / "zero.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    with pytest.raises(VideoError, match=r"zero\.mp4"):
        load_video(path)


def test_segment_missing_in_stream(videos, tmp_path):
    with pytest.raises(VideoError, match=r"seg_2\.mp4.*does not exist"):
        load_stream([videos["a_25fps_7.3s.mp4"], tmp_path / "seg_2.mp4"])


# ----------------------------------------------------------------------------- seeking to IDR pictures
@pytest.fixture(scope="module")
def short_gop_videos(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("short_gop")
    return {
        "p_only": write_test_video(root, "p_only.mp4", fps=10, count=600, height=32, width=48, gop=10, seed=7),
        "b_frames": write_bframe_video(root, "b_frames.mp4", fps=12, count=600, height=32, width=48, gop=12, seed=8),
    }


@pytest.mark.parametrize("name", ["p_only", "b_frames"])
def test_sparse_frames_decoded_with_idr_seeks_match_ffmpeg(short_gop_videos, name):
    path = short_gop_videos[name]
    indices, rgb = ffmpeg_graph_frames(path)
    keep = np.linspace(0, len(indices) - 1, 9, dtype=int)
    clip = load_video(path, fps=1, max_frames=9)
    assert clip.frame_indices == [indices[k] for k in keep]
    np.testing.assert_array_equal(clip.frames, rgb[keep])
    probe = probe_video(path)
    assert len(probe.decode_index.idr_positions) >= 600 // (10 if name == "p_only" else 12)  # + scene cuts
    stats = DecodeStats()
    decode_frames(str(path), probe.raw_pts, sorted(set(clip.frame_indices)), probe.decode_index, stats)
    assert stats.seeks >= 7 and stats.packets_sent < 200  # most of the 600 packets never reach the decoder


@pytest.mark.parametrize("name", ["p_only", "b_frames"])
@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_decode_gives_the_same_pixels(short_gop_videos, name, threads):
    path = short_gop_videos[name]
    probe = probe_video(path)
    wanted = sorted(set(load_video(path, fps=1, max_frames=40).frame_indices))
    single, threaded = DecodeStats(), DecodeStats()
    expected = decode_frames(str(path), probe.raw_pts, wanted, probe.decode_index, single)
    frames = decode_frames(str(path), probe.raw_pts, wanted, probe.decode_index, threaded, threads=threads)
    assert sorted(frames) == wanted and threaded.groups == threads and single.groups == 1
    assert threaded.seeks >= single.seeks  # every group starts at its own IDR
    for k in wanted:
        np.testing.assert_array_equal(frames[k], expected[k])
    clip = load_video(path, fps=1, max_frames=40, threads=threads)
    np.testing.assert_array_equal(clip.frames, load_video(path, fps=1, max_frames=40).frames)


@pytest.mark.parametrize("threads", [1, 2])
def test_seek_that_lands_late_falls_back_to_sequential(short_gop_videos, threads):
    path = short_gop_videos["p_only"]
    probe = probe_video(path)
    index = probe.decode_index
    # aim every seek one IDR too far: the landing check must notice and decode sequentially instead
    wrong = DecodeIndex(index.decode_pts, index.idr_positions, index.idr_pts[1:] + index.idr_pts[-1:])
    wanted = [5, 95, 305, 599]
    stats = DecodeStats()
    frames = decode_frames(str(path), probe.raw_pts, wanted, wrong, stats, threads=threads)
    expected = decode_frames(str(path), probe.raw_pts, wanted, None)
    assert sorted(frames) == wanted and stats.packets_sent > 500 and stats.groups == threads
    for k in wanted:
        np.testing.assert_array_equal(frames[k], expected[k])


def test_seek_that_lands_early_skips_to_the_idr(short_gop_videos):
    path = short_gop_videos["p_only"]
    probe = probe_video(path)
    index = probe.decode_index
    early = DecodeIndex(index.decode_pts, index.idr_positions, index.idr_pts[:1] + index.idr_pts[:-1])
    wanted = [5, 95, 305, 599]
    stats = DecodeStats()
    frames = decode_frames(str(path), probe.raw_pts, wanted, early, stats)
    expected = decode_frames(str(path), probe.raw_pts, wanted, None)
    assert sorted(frames) == wanted and stats.seeks == 3 and stats.packets_sent < 100
    for k in wanted:
        np.testing.assert_array_equal(frames[k], expected[k])
