"""Stage-2 CLI input checks (tiny random model, bundled sample): a missing video folder, global batches the mesh
cannot make and token buckets the run cannot use are one-line errors. Runs end to end (resolved config, resume on
another device count, compile count, padding, adapter) are in test_train_stage2_multihost.py."""
from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cogstream_jax" / "assets" / "sample"
ARGS = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
        str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "0"]


def test_stage2_missing_video_dir_is_a_clear_error(tmp_path, capsys):
    from train.stage2 import main

    argv = [*ARGS, "--output_dir", str(tmp_path)]
    argv[argv.index("--video_dir") + 1] = str(tmp_path / "nope")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--video_dir" in err and "nope" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (("--global_batch_qas", "0"), "must be >= 1"),
    (("--global_batch_qas", "100000", "--mesh", "1,8,1"), "do not fill one update"),
    (("--global_batch_qas", "6", "--mesh", "4,1,2"), "--global_batch_qas 6 is not a multiple of"),
    (("--global_batch_qas", "8", "--mesh", "2,2,2", "--qas_per_device", "3"), "= 12"),
    (("--token_buckets", "short"), "--token_buckets 'short': expected auto or ladder"),
    (("--token_buckets", "256,200"), "must be multiples of 128"),
    (("--token_bucket_count", "0"), "--token_bucket_count (0)"),
    (("--prep_workers", "0"), "--prep_workers: expected a positive integer, got 0"),
    (("--decode_threads", "0"), "--decode_threads: expected a positive integer, got 0"),
    (("--token_buckets", "ladder", "--compiled_dir", "x"), "--compiled_dir serves the gradient programs a run"),
])
def test_stage2_flags_that_cannot_train_are_refused(extra, message, tmp_path, capsys):
    from train.stage2 import main

    assert main([*ARGS, "--output_dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
