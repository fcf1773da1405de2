"""Reader and validator for the CogStream dataset layout (protocol 1.1-1.5).

```
<root>/QA_Dataset/<vid>.json                        chains of QAs (records.parse_chains)
<root>/VQA_Dataset/<vid>.json                       optional: capability labels
<root>/event_segments/<vid>/<vid>_segment_<n>.mp4   n = 1, 2, ... contiguous
```
QA -> segment mapping. The official code groups a chain's QAs by Event_Time, sorts the distinct times and
ZIPS them with the sorted segment files (protocol 1.4): the k-th distinct time gets segment k. That is our
default (`mapping="zip"`). `mapping="explicit"` instead gives each QA the first segment whose end time is >=
Event_Time (ends from VQA `segment_timestamp` or, failing that, the cumulative MP4 durations). The validator
warns wherever the two differ.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cogstream_jax import remote
from cogstream_jax.data.records import Chain, parse_chains, parse_vqa_labels
from cogstream_jax.errors import DataError, VideoError
from cogstream_jax.io_utils import as_path

QA_DIR = "QA_Dataset"
VQA_DIR = "VQA_Dataset"
SEGMENTS_DIR = "event_segments"
MAPPINGS = ("zip", "explicit")
EXPLICIT_TOLERANCE_S = 0.5  # Event_Time equals the segment end up to container-duration rounding
_SEGMENT_RE = re.compile(r"segment_(\d+)")


@dataclass(frozen=True)
class VideoRecord:
    """One video: its chains, its ordered segment files and, per chain, the segment index (0-based) of each QA."""

    name: str
    qa_file: Path
    segments: tuple[Path, ...]
    chains: tuple[Chain, ...]
    segment_of_qa: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class CogStreamDataset:
    root: Path
    videos: tuple[VideoRecord, ...]
    warnings: tuple[str, ...]

    def video(self, name: str) -> VideoRecord:
        for record in self.videos:
            if record.name == name:
                return record
        raise DataError(f"{self.root / QA_DIR}: no video named {name!r}")


def read_json(path: Path) -> object:
    """Parsed JSON, or a DataError naming the file (invalid JSON with its line, or unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None


def segment_number(filename: str) -> int | None:
    match = _SEGMENT_RE.search(filename)
    return int(match.group(1)) if match else None


def list_segments(video_dir: Path, name: str, warnings: list[str]) -> tuple[Path, ...]:
    """Segment files in the official natural order; numbers must run 1..n without a gap."""
    if not video_dir.is_dir():
        raise DataError(f"{video_dir}: missing segment folder for video {name!r} (field event_segments/{name})")
    numbered: dict[int, Path] = {}
    for entry in sorted(p.name for p in video_dir.iterdir()):  # a local folder or an object-store prefix
        number = segment_number(entry)
        if number is None or not entry.endswith(".mp4"):
            warnings.append(f"{video_dir / entry}: not a `<vid>_segment_<n>.mp4` file, ignored")
            continue
        if number in numbered:
            raise DataError(f"{video_dir / entry}: segment number {number} appears twice")
        numbered[number] = video_dir / entry
    if not numbered:
        raise DataError(f"{video_dir}: no segment files for video {name!r}")
    missing = [k for k in range(1, max(numbered) + 1) if k not in numbered]
    if missing:
        raise DataError(f"{video_dir / f'{name}_segment_{missing[0]}.mp4'}: missing segment {missing[0]} "
                        f"(found {sorted(numbered)})")
    return tuple(numbered[k] for k in sorted(numbered))


def zip_mapping(chain: Chain, n_segments: int, where: str) -> tuple[int, ...]:
    """Official rule: k-th distinct Event_Time (sorted) -> segment k."""
    times = sorted({qa.event_time for qa in chain.qas})
    if len(times) > n_segments:
        raise DataError(
            f"{where}: [{chain.index}] Event_Time has {len(times)} distinct values but there are only "
            f"{n_segments} segment files"
        )
    rank = {t: k for k, t in enumerate(times)}
    return tuple(rank[qa.event_time] for qa in chain.qas)


def explicit_mapping(chain: Chain, segment_ends: Sequence[float], where: str) -> tuple[int, ...]:
    """First segment whose end is >= Event_Time (within EXPLICIT_TOLERANCE_S)."""
    out = []
    for qa in chain.qas:
        index = next((k for k, end in enumerate(segment_ends) if end + EXPLICIT_TOLERANCE_S >= qa.event_time), None)
        if index is None:
            raise DataError(f"{where}: [{chain.index}][{qa.qa_id}].info.Event_Time {qa.event_time} is after the "
                            f"last segment end {segment_ends[-1]:.2f}")
        out.append(index)
    return tuple(out)


def probe_duration(path: Path) -> float:
    """Container duration in seconds (what ffprobe reports as format.duration)."""
    import av

    try:
        with av.open(remote.local_file(str(path))) as container:
            if container.duration is None:
                raise VideoError(f"{path}: container has no duration (field format.duration)")
            return container.duration / 1_000_000
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: unreadable video ({exc})") from None


def segment_ends(segments: Sequence[Path], vqa_data: object | None) -> list[float]:
    """End time of every segment on the video timeline: VQA segment_timestamp when given, else durations."""
    ends: dict[int, float] = {}
    if isinstance(vqa_data, list):
        for chain in vqa_data:
            for item in chain.get("Data", []) if isinstance(chain, dict) else []:
                number = segment_number(os.path.basename(str(item.get("segment_path", ""))))
                if number is not None and isinstance(item.get("segment_timestamp"), (int, float)):
                    ends[number - 1] = float(item["segment_timestamp"])
    if len(ends) == len(segments) and sorted(ends) == list(range(len(segments))):
        return [ends[k] for k in range(len(segments))]
    total, out = 0.0, []
    for path in segments:
        total += probe_duration(path)
        out.append(total)
    return out


def load_video(root: Path, qa_file: Path, mapping: str, warnings: list[str]) -> VideoRecord:
    name = qa_file.stem
    where = f"{QA_DIR}/{qa_file.name}"
    chains = parse_chains(read_json(qa_file), str(qa_file), warnings)
    vqa_file = root / VQA_DIR / qa_file.name
    vqa_data = read_json(vqa_file) if vqa_file.is_file() else None
    if vqa_data is not None:
        chains = parse_vqa_labels(vqa_data, str(vqa_file), chains, warnings)
    segments = list_segments(root / SEGMENTS_DIR / name, name, warnings)
    zipped = tuple(zip_mapping(chain, len(segments), str(qa_file)) for chain in chains)
    chosen = zipped
    if mapping == "explicit":
        ends = segment_ends(segments, vqa_data)
        chosen = tuple(explicit_mapping(chain, ends, str(qa_file)) for chain in chains)
    for chain, seg in zip(chains, zipped):
        unused = set(range(len(segments))) - set(seg)
        if unused and chain.index == 0:
            warnings.append(f"{where}: [0] has no QA for segments {sorted(k + 1 for k in unused)}")
    return VideoRecord(name=name, qa_file=qa_file, segments=segments, chains=chains, segment_of_qa=chosen)


def load_dataset(root: str | os.PathLike, *, mapping: str = "zip") -> CogStreamDataset:
    """Read and validate every `QA_Dataset/*.json` with its segments (raises DataError on bad input)."""
    if mapping not in MAPPINGS:
        raise DataError(f"mapping: unknown QA-to-segment mapping {mapping!r}; expected one of {MAPPINGS}")
    root = as_path(root)  # a local folder or an object-store URL
    qa_dir = root / QA_DIR
    if not qa_dir.is_dir():
        raise DataError(f"{qa_dir}: missing QA_Dataset folder")
    files = sorted(p for p in qa_dir.iterdir() if p.suffix == ".json")
    if not files:
        raise DataError(f"{qa_dir}: no .json QA files")
    warnings: list[str] = []
    videos = tuple(load_video(root, path, mapping, warnings) for path in files)
    return CogStreamDataset(root=root, videos=videos, warnings=tuple(warnings))



def validate_dataset(root: str | os.PathLike, *, mapping: str = "zip") -> CogStreamDataset:
    """Load (zip rule by default) and warn for every QA whose zip and explicit, time-based segments differ."""
    dataset = load_dataset(root, mapping=mapping)
    warnings = list(dataset.warnings)
    for video in dataset.videos:
        vqa_file = dataset.root / VQA_DIR / video.qa_file.name
        ends = segment_ends(video.segments, read_json(vqa_file) if vqa_file.is_file() else None)
        for chain in video.chains:
            zipped = zip_mapping(chain, len(video.segments), str(video.qa_file))
            explicit = explicit_mapping(chain, ends, str(video.qa_file))
            for qa, z, e in zip(chain.qas, zipped, explicit):
                if z != e:
                    warnings.append(
                        f"{QA_DIR}/{video.qa_file.name}: [{chain.index}][{qa.qa_id}] zip rule gives segment {z + 1} "
                        f"but Event_Time {qa.event_time} falls in segment {e + 1}"
                    )
    return CogStreamDataset(root=dataset.root, videos=dataset.videos, warnings=tuple(warnings))
