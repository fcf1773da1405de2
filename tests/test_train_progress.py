"""Training metrics across a resume: lines of updates past the restored checkpoint (which the resumed run does
again) are dropped, a line cut by a kill is dropped, and the token count carries on."""
import json

from cogstream_jax.training.progress import Progress


def test_resume_drops_metrics_past_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "tokens_total": 100.0 * s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    progress = Progress(tmp_path, total_steps=10, start_step=3, show_bar=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert progress.tokens_total == 300.0
    progress.update(4, {"loss": 0.5, "tokens_total": 400.0})
    progress.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_fresh_run_starts_an_empty_file(tmp_path):
    progress = Progress(tmp_path, total_steps=2, show_bar=False)
    assert progress.tokens_total == 0.0
    progress.update(1, {"loss": 1.0})
    progress.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
