"""The demo pipeline end to end on the bundled sample (fewer steps than `make demo`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_pipeline_writes_valid_outputs(tmp_path):
    """Runs as `make demo` does: a fresh process on the machine's real device count (not the 8 fake devices)."""
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "cogstream_jax.demo", "--output_dir", str(out), "--steps", "1",
                           "--videos", "1", "--questions", "2", "--max_new_tokens", "4"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("convert", "stage 1", "stage 2", "export", "streaming evaluation", "metrics report"):
        assert f"=== {stage}" in proc.stdout
    assert "TINY RANDOM" in proc.stdout
    # model, conversion
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "videollama3_qwen2"
    assert (out / "model_orbax" / "cogstream_meta.json").exists()
    # both adapters, in our format and as PEFT folders
    for stage, name, modules in (("stage1", "language_module", 2 * 7), ("stage2", "full_module", 2 * 7 + 2)):
        meta = json.loads((out / stage / "adapter" / "adapter_meta.json").read_text())
        assert meta["name"] == name and meta["r"] == 8
        assert (out / stage / "metrics.jsonl").read_text().strip()
    for folder, modules in (("retrieval", 14), ("answer", 16)):
        cfg = json.loads((out / "peft" / folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and len(cfg["target_modules"]) == modules
    # evaluation results in the official format
    results = sorted((out / "results").glob("*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    chain = data["Data"][0]
    assert [qa["qa_id"] for qa in chain] == [0, 1]
    assert chain[0]["predicted_visual"] is True
    assert all(len(qa["predicted_coi"]) == qa["qa_id"] for qa in chain)
    # report
    report = json.loads((out / "report" / "report.json").read_text())
    assert report and (out / "report" / "report.md").read_text().count("|") > 20


def test_fresh_refuses_to_delete_a_folder_the_demo_did_not_make(tmp_path, capsys):
    from cogstream_jax.demo import main

    keep = tmp_path / "precious.txt"
    keep.write_text("not demo output")
    assert main(["--output_dir", str(tmp_path), "--fresh"]) == 2
    assert keep.read_text() == "not demo output" and "refusing to delete" in capsys.readouterr().err
