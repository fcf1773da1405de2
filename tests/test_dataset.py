"""Dataset layer: typed records from the bundled sample, the official zip mapping and the explicit
alternative (with a validator warning where they differ), and one bad-input test per error case."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cogstream_jax.data.dataset import load_dataset, validate_dataset
from cogstream_jax.data.records import CAPABILITIES, canonical_capability
from cogstream_jax.data.synth import sample_dataset_dir
from cogstream_jax.errors import DataError


@pytest.fixture()
def dataset_copy(tmp_path) -> Path:
    """A writable copy of the bundled sample with a single short video."""
    root = tmp_path / "ds"
    src = sample_dataset_dir()
    for sub in ("QA_Dataset", "VQA_Dataset"):
        (root / sub).mkdir(parents=True)
        shutil.copy(src / sub / "synth_0_000.json", root / sub)
    shutil.copytree(src / "event_segments" / "synth_0_000", root / "event_segments" / "synth_0_000")
    return root


def qa_file(root: Path) -> Path:
    return root / "QA_Dataset" / "synth_0_000.json"


def edit_qa(root: Path, edit) -> None:
    data = json.loads(qa_file(root).read_text())
    edit(data)
    qa_file(root).write_text(json.dumps(data))


def test_sample_loads_as_typed_records():
    ds = load_dataset(sample_dataset_dir())
    assert [v.name for v in ds.videos] == ["synth_0_000", "synth_0_001", "synth_0_long_00"]
    video = ds.video("synth_0_000")
    assert [p.name for p in video.segments] == [f"synth_0_000_segment_{k}.mp4" for k in (1, 2, 3)]
    qa = video.chains[0].qas[1]
    assert qa.qa_id == 1 and isinstance(qa.coi, tuple) and len(qa.relevance) == 1
    assert qa.relevance_text == json.dumps(list(qa.relevance))
    labels = {canonical_capability(label) for v in ds.videos for c in v.chains for label in c.labels}
    assert labels == set(CAPABILITIES)
    with pytest.raises(Exception):
        qa.qa_id = 3  # frozen


def test_zip_mapping_follows_sorted_event_times():
    video = load_dataset(sample_dataset_dir()).video("synth_0_001")
    for chain, seg in zip(video.chains, video.segment_of_qa):
        times = sorted({qa.event_time for qa in chain.qas})
        assert seg == tuple(times.index(qa.event_time) for qa in chain.qas)


def test_explicit_mapping_and_validator_warning(dataset_copy):
    # Drop every QA of segment 2 from chain 0: the zip rule then gives segment-3 QAs the segment-2 clip.
    def drop_segment_two(data):
        times = sorted({qa["info"]["Event_Time"] for qa in data[0]})
        chain = [qa for qa in data[0] if qa["info"]["Event_Time"] != times[1]]
        for i, qa in enumerate(chain):
            qa["info"].update(ID=i, COI="[]", relevance=json.dumps([0] * i))
        data[0] = chain
    edit_qa(dataset_copy, drop_segment_two)
    (dataset_copy / "VQA_Dataset" / "synth_0_000.json").unlink()
    zipped = load_dataset(dataset_copy).videos[0]
    explicit = load_dataset(dataset_copy, mapping="explicit").videos[0]
    assert max(zipped.segment_of_qa[0]) == 1 and max(explicit.segment_of_qa[0]) == 2
    report = validate_dataset(dataset_copy)
    assert any("zip rule gives segment 2" in w and "falls in segment 3" in w for w in report.warnings)
    assert any("no QA for segments [3]" in w for w in report.warnings)


def test_missing_segment(dataset_copy):
    (dataset_copy / "event_segments" / "synth_0_000" / "synth_0_000_segment_2.mp4").unlink()
    with pytest.raises(DataError, match=r"synth_0_000_segment_2\.mp4: missing segment 2"):
        load_dataset(dataset_copy)


def test_missing_segment_folder(dataset_copy):
    shutil.rmtree(dataset_copy / "event_segments" / "synth_0_000")
    with pytest.raises(DataError, match=r"event_segments/synth_0_000"):
        load_dataset(dataset_copy)


def test_qa_file_not_a_list_of_chains(dataset_copy):
    qa_file(dataset_copy).write_text(json.dumps({"Q": "x"}))
    with pytest.raises(DataError, match=r"synth_0_000\.json: top level must be a non-empty list of chains"):
        load_dataset(dataset_copy)


def test_relevance_length_differs_from_id(dataset_copy):
    edit_qa(dataset_copy, lambda d: d[0][2]["info"].update(relevance="[1]"))
    with pytest.raises(DataError, match=r"synth_0_000\.json: \[0\]\[2\]\.info\.relevance: length 1 != ID 2"):
        load_dataset(dataset_copy)


def test_unparsable_coi(dataset_copy):
    edit_qa(dataset_copy, lambda d: d[0][1]["info"].update(COI="[0,"))
    with pytest.raises(DataError, match=r"\[0\]\[1\]\.info\.COI: COI '\[0,' is not a readable list"):
        load_dataset(dataset_copy)


def test_decreasing_event_time(dataset_copy):
    edit_qa(dataset_copy, lambda d: d[1][-1]["info"].update(Event_Time=0.5))
    with pytest.raises(DataError, match=r"\[1\]\[\d+\]\.info\.Event_Time: 0\.5 decreases"):
        load_dataset(dataset_copy)


def test_more_event_time_groups_than_segments(dataset_copy):
    (dataset_copy / "event_segments" / "synth_0_000" / "synth_0_000_segment_3.mp4").unlink()
    with pytest.raises(DataError, match=r"synth_0_000\.json: \[0\] Event_Time has 3 distinct values but there are only 2"):
        load_dataset(dataset_copy)


def test_wrong_id_and_missing_field(dataset_copy):
    edit_qa(dataset_copy, lambda d: d[0][1]["info"].update(ID=5))
    with pytest.raises(DataError, match=r"\[0\]\[1\]\.info\.ID: 5 but the QA is at chain position 1"):
        load_dataset(dataset_copy)
    edit_qa(dataset_copy, lambda d: (d[0][1]["info"].update(ID=1), d[0][1].pop("A")))
    with pytest.raises(DataError, match=r"\[0\]\[1\]\.A: missing"):
        load_dataset(dataset_copy)


def test_invalid_json_and_unknown_mapping(dataset_copy):
    with pytest.raises(DataError, match="mapping"):
        load_dataset(dataset_copy, mapping="nearest")
    qa_file(dataset_copy).write_text("[[{")
    with pytest.raises(DataError, match=r"synth_0_000\.json: not valid JSON"):
        load_dataset(dataset_copy)


def test_validate_cli_reports_and_fails_with_one_line(dataset_copy, capsys):
    from cogstream_jax.data.validate import main

    assert main(["--data-dir", str(dataset_copy)]) == 0
    assert "ok: 1 videos, 0 warnings" in capsys.readouterr().out
    edit_qa(dataset_copy, lambda d: d[0][2]["info"].update(relevance="[1]"))
    assert main(["--data_dir", str(dataset_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "info.relevance: length 1 != ID 2" in err and "Traceback" not in err
