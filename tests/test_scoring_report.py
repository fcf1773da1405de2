"""The whole `python -m evaluate.metrics` pipeline: a hand-computed report.json, rendered markdown and PNGs,
several chains per file, and bad input (named in the error, the rest still scored)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cogstream_jax.scoring.nlp_metrics import METEOR_UNAVAILABLE
from cogstream_jax.scoring.plots import expected_pixel_size
from evaluate.metrics import main
from judge_server import JudgeServer, always_scripted, scripted_reply
from scoring_fixtures import QASpec, scripted, write_dataset, write_results

REPO = Path(__file__).resolve().parents[1]

VID_A = [
    QASpec("Basic/Attributes", 1, "What colour is the umbrella?", "red", scripted(10, 10, 10, 10, 10)),
    QASpec("Basic/Attributes", 1, "What is its shape?", "round", scripted(8, 8, 8, 8, 8), (1,), (1,)),
    QASpec("Streaming/Causality", 2, "Why did he open it?", "because rain", scripted(6, 4, 6, 4, 5), (1, 0), (0, 1)),
    QASpec("Streaming/Dialogue Recalling", 2, "What did I ask first?", "umbrella colour", scripted(2, 2, 2, 2, 2),
           (1, 0, 1), (1, 0, 0), is_visual=False, predicted_visual=False),
    QASpec("Global/Overall Summary", 2, "Summarise the video.", "man walks rain", scripted(9, 7, 8, 6, 10),
           (0, 0, 1, 0), (0, 0, 1), predicted_visual=False),
]
VID_B = [
    QASpec("Basic/Attributes", 1, "What colour is the car?", "blue", scripted(4, 4, 4, 4, 4)),
    QASpec("Streaming/Temporal Perception", 2, "When did it stop?", "at noon", scripted(0, 0, 0, 0, 0), (1,), ()),
    QASpec("Streaming/Reasoning", 2, "Why did it stop?", "traffic light", scripted(7, 7, 7, 7, 7), (0, 1), (0, 1)),
]
R4 = lambda x: round(x, 4)  # noqa: E731


def hand_computed_summary() -> dict:
    """Worked by hand from VID_A and VID_B (the Temporal Perception QA is excluded from judge aggregates)."""
    none11 = dict.fromkeys(["Basic/Attributes", "Basic/Items", "Basic/Co-reference", "Basic/Actions",
                            "Streaming/Reasoning", "Streaming/Sequence Perception", "Streaming/Dialogue Recalling",
                            "Streaming/Dynamic Updating", "Streaming/Object Tracking", "Global/Overall Summary",
                            "Global/Global Analysis"])
    basic = R4(220 / 3)
    return {
        "n_qas": 7, "n_excluded_qas": 1,
        # IA 10,8,6,2,9,4,7 | DC 10,8,4,2,7,4,7 | CA 10,8,6,2,8,4,7 | TP 10,8,4,2,6,4,7 | LC 10,8,5,2,10,4,7
        "metrics": {"IA": R4(460 / 7), "DC": 60.0, "CA": R4(450 / 7), "TP": R4(410 / 7), "LC": R4(460 / 7)},
        "Avg": R4(2200 / 35),  # 62.8571; the mean of the 4 filled columns would be 58.33
        "capabilities": none11 | {"Basic/Attributes": basic, "Streaming/Reasoning": 60.0,
                                  "Streaming/Dialogue Recalling": 20.0, "Global/Overall Summary": 80.0},
        "capability_counts": dict.fromkeys(none11, 0) | {"Basic/Attributes": 3, "Streaming/Reasoning": 2,
                                                         "Streaming/Dialogue Recalling": 1, "Global/Overall Summary": 1},
        "extra_capabilities": {},
        "levels": {
            "Basic": {"IA": basic, "DC": basic, "CA": basic, "TP": basic, "LC": basic, "Mean": basic},
            "Streaming": {"IA": 50.0, "DC": R4(130 / 3), "CA": 50.0, "TP": R4(130 / 3), "LC": R4(140 / 3),
                          "Mean": R4(140 / 3)},
            "Global": {"IA": 90.0, "DC": 70.0, "CA": 80.0, "TP": 60.0, "LC": 100.0, "Mean": 80.0},
        },
        # inter: A seg1 (10, 8) -> 0.8, A seg2 (5, 2, 8) -> 0.55; exter: A (9, 5) -> 0.6, B (4, 7) -> 0.7
        "coherence": {"inter": 67.5, "inter_segments": 2, "exter": 65.0, "exter_chains": 2},
        "retrieval": {
            # flattened: A1 tp | A2 fn fp | A3 tp tn fn | A4 tp tn tn tn | B1 fn | B2 tn tp
            "flattened": {"accuracy": R4(9 / 13), "precision": 0.8, "recall": R4(4 / 7), "f1": R4(8 / 12),
                          "tp": 4, "fp": 1, "fn": 3, "tn": 5},
            "per_qa_macro": {"accuracy": R4(11 / 18), "precision": R4(4 / 6), "recall": R4(3.5 / 6),
                             "f1": R4(11 / 18), "n_qas": 6},
            # QA>0: A1 tp, A2 tp, A3 tn, A4 fn (visual but predicted not), B1 tp, B2 tp
            "visual": {"accuracy": R4(5 / 6), "n_qas": 6, "tp": 4, "fp": 0, "fn": 1, "tn": 1},
        },
    }


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    write_dataset(root / "ds", {"vidA": [VID_A, VID_B], "vidB": [VID_B]})
    write_results(root / "res", {"vidA": [VID_A], "vidB": [VID_B]})
    return root


@pytest.fixture(scope="module")
def scripted_run(fixture_dirs):
    out = fixture_dirs / "out"
    with JudgeServer() as server:
        argv = ["--results_dir", str(fixture_dirs / "res"), "--dataset-dir", str(fixture_dirs / "ds"),
                "--output_dir", str(out), "--judge", "openai", "--judge_url", server.url, "--judge_model", "scripted",
                "--judge_concurrency", "3"]
        first = main(argv)
        first_calls = len(server.requests)
        first_report = json.loads((out / "report.json").read_text())
        second = main(argv)
        second_calls = len(server.requests) - first_calls
    return {"out": out, "rc": (first, second), "calls": (first_calls, second_calls), "report": first_report,
            "rerun_report": json.loads((out / "report.json").read_text())}


def test_report_json_equals_hand_computed(scripted_run, fixture_dirs):
    summary = hand_computed_summary()
    expected = {
        "schema": "cogstream-jax-scoring/1",
        "inputs": {"results_dir": str(fixture_dirs / "res"), "dataset_dir": str(fixture_dirs / "ds"),
                   "result_files": 2, "videos_scored": 2, "qas_scored": 8,
                   "qas_with_inference_error": 0},
        # vidA: 1 IA batch + 4 x 5 single-QA calls; vidB: 1 + 4 x 3
        "judge": {"identity": "openai:scripted", "requests": 34, "cache_hits": 0, "calls": 34, "failures": []},
        "skipped": [],
        "question_mismatches": [],
        "overall": summary,
        "per_chain": {"0": summary},
        # predictions share no token with the answers: every text metric is 0
        "nlp": {"n_qas": 8, "tokenizer": "lower-cased regex words and punctuation (\\w+|[^\\w\\s])",
                "BLEU-4 (corpus)": 0.0, "BLEU-4 (sentence mean, smoothing method1)": 0.0,
                "BLEU-2 (sentence mean; the official step2c 'BLEU-4')": 0.0, "ROUGE-L": 0.0, "CIDEr-D": 0.0,
                "METEOR": None, "METEOR_unavailable": METEOR_UNAVAILABLE},
    }
    assert scripted_run["rc"] == (0, 0)
    assert scripted_run["report"] == expected
    filled = [v for v in summary["capabilities"].values() if v is not None]
    assert round(sum(filled) / len(filled), 2) == 58.33 != round(summary["Avg"], 2)  # Avg is QA-weighted


def test_rerun_is_served_from_the_cache(scripted_run):
    assert scripted_run["calls"] == (34, 0)
    rerun = scripted_run["rerun_report"]
    assert rerun["judge"]["cache_hits"] == 34 and rerun["judge"]["calls"] == 0
    assert rerun["overall"] == scripted_run["report"]["overall"]


def test_report_renders_markdown_and_pngs(scripted_run):
    out = scripted_run["out"]
    markdown = (out / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    cells = [cell.strip() for cell in header.strip("|").split("|")]
    assert cells == ["Method", "Att.", "Obj.", "Co-ref.", "Act.", "Rea.", "Seq.", "Dial.", "Dyn.", "Obj.", "Over.",
                     "Glob.", "Avg."]
    assert "| CogReasoner (paper) | 74.8 | 71.5 |" in markdown and "| 72.26 |" in markdown
    assert "| **This run** | 73.3 | \u2013 | \u2013 | \u2013 | 60.0 | \u2013 | 20.0 | \u2013 | \u2013 | 80.0 | \u2013 | 62.86 |" \
        in markdown
    for name in ("capabilities.png", "metrics.png", "retrieval.png"):
        assert f"]({name})" in markdown
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.size == expected_pixel_size(name)
            image.load()  # decodes the whole file


def test_several_chains_are_scored_per_chain_and_overall(tmp_path):
    good = [QASpec("Basic/Items", 1, "What is held?", "a red umbrella", "a red umbrella"),
            QASpec("Basic/Actions", 1, "What does he do?", "he walks", "he walks", (1,), (1,))]
    bad = [QASpec("Basic/Items", 1, "What is held?", "a red umbrella", "seven parrots"),
           QASpec("Basic/Actions", 2, "What does he do?", "he walks", "green cheese", (1,), (0,))]
    write_dataset(tmp_path / "ds", {"vid": [good, bad]})
    write_results(tmp_path / "res", {"vid": [good, bad]})
    assert main(["--results_dir", str(tmp_path / "res"), "--dataset_dir", str(tmp_path / "ds"),
                 "--output_dir", str(tmp_path / "out"), "--no_plots"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["per_chain"]["0"]["Avg"] == 100.0 and report["per_chain"]["1"]["Avg"] == 0.0
    assert report["overall"]["Avg"] == 50.0
    assert report["per_chain"]["1"]["retrieval"]["flattened"]["fn"] == 1
    assert "This run, chain 1" in (tmp_path / "out" / "report.md").read_text()


def test_bad_inputs_are_named_and_the_rest_is_scored(tmp_path, capsys):
    labelled = [QASpec("Basic/Items", 1, "What is held?", "a red umbrella", "a red umbrella")] * 3
    write_dataset(tmp_path / "ds", {"good": [labelled], "short": [labelled], "nolabel": [labelled]})
    broken = json.loads((tmp_path / "ds" / "VQA_Dataset" / "nolabel.json").read_text())
    del broken[0]["Data"][1]["label"]
    (tmp_path / "ds" / "VQA_Dataset" / "nolabel.json").write_text(json.dumps(broken))
    results = write_results(tmp_path / "res", {"good": [labelled], "short": [labelled[:2]], "nolabel": [labelled],
                                               "stranger": [labelled]})
    (results / "corrupt.json").write_text('{"video_name": "corrupt", "Data": [[{"qa_id": 0,')
    rc = main(["--results_dir", str(results), "--dataset_dir", str(tmp_path / "ds"), "--output_dir",
               str(tmp_path / "out"), "--no_plots"])
    assert rc == 2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["inputs"]["videos_scored"] == 1 and report["overall"]["Avg"] == 100.0
    reasons = {Path(item["file"]).stem: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {"corrupt", "short", "nolabel", "stranger"}
    assert "corrupt.json: corrupt result JSON" in reasons["corrupt"]
    assert "short.json: chain 0 has 2 QA results but the dataset chain has 3 QAs" in reasons["short"]
    assert "--allow_partial_chains" in reasons["short"]
    assert "nolabel.json" in reasons["nolabel"] and "Data[1].label: missing capability label" in reasons["nolabel"]
    assert "stranger.json" in reasons["stranger"] and "'stranger' is not in the dataset" in reasons["stranger"]
    err = capsys.readouterr().err
    assert all(f"{stem}.json" in err for stem in reasons) and "Traceback" not in err


@pytest.mark.parametrize("problem, message", [
    ("no_vqa", "has no VQA_Dataset folder"),
    ("empty_results", "no result files"),
    ("openai_without_url", "--judge openai needs --judge_url and --judge_model"),
    ("url_without_openai", "--judge_url / --judge_model are for --judge openai"),
    ("infinite_timeout", "--judge_timeout > 0 (finite)"),
])
def test_fatal_user_errors_exit_nonzero_with_one_line(tmp_path, problem, message):
    write_dataset(tmp_path / "ds", {"v": [VID_B]})
    write_results(tmp_path / "res", {"v": [VID_B]})
    (tmp_path / "empty").mkdir()
    results, dataset, extra = tmp_path / "res", tmp_path / "ds", []
    if problem == "no_vqa":
        dataset = tmp_path / "res"
    elif problem == "empty_results":
        results = tmp_path / "empty"
    elif problem == "url_without_openai":
        extra = ["--judge_url", "http://127.0.0.1:1", "--judge_model", "gpt-4o"]
    elif problem == "infinite_timeout":
        extra = ["--judge_timeout", "inf"]
    else:
        extra = ["--judge", "openai"]
    argv = ["--results_dir", str(results), "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"), *extra]
    proc = subprocess.run([sys.executable, "-m", "evaluate.metrics", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_killed_cli_run_resumes_without_repeating_answered_requests(fixture_dirs, tmp_path):
    """A real interruption: the CLI process is killed while judge request 6 is in flight; the rerun asks only
    for what was never answered (requests 1-5 were answered and cached before request 6 was sent)."""
    out = tmp_path / "out"
    # request 6 hangs long enough that the kill surely lands while it is in flight, however busy the machine
    behaviour = lambda call, body: (200, scripted_reply(body), 60.0 if call == 6 else 0.0)  # noqa: E731
    with JudgeServer(behaviour) as server:
        argv = ["--results_dir", str(fixture_dirs / "res"), "--dataset_dir", str(fixture_dirs / "ds"),
                "--output_dir", str(out), "--judge", "openai", "--judge_url", server.url, "--judge_model", "scripted",
                "--judge_concurrency", "1", "--no_plots"]
        proc = subprocess.Popen([sys.executable, "-m", "evaluate.metrics", *argv], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600  # a bound for a stuck run only; a busy machine may start slowly
        while len(server.requests) < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=30)
        assert len(server.requests) == 6 and not (out / "report.json").exists()
        answered = {json.dumps(r["body"]["messages"]) for r in server.requests[:5]}
        in_flight = json.dumps(server.requests[5]["body"]["messages"])
        server.behaviour = always_scripted
        assert main(argv) == 0
        asked_again = [json.dumps(r["body"]["messages"]) for r in server.requests[6:]]
    assert len(asked_again) == 34 - 5 and len(set(asked_again)) == len(asked_again)
    assert not answered & set(asked_again) and in_flight in asked_again
    report = json.loads((out / "report.json").read_text())
    assert report["judge"]["cache_hits"] == 5 and report["overall"]["Avg"] == hand_computed_summary()["Avg"]


#: `python -c INTERRUPTIBLE module args...`: runs the module as `python -m` would, with Python's own SIGINT handler
INTERRUPTIBLE = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def test_ctrl_c_stops_promptly_and_keeps_finished_judgements(fixture_dirs, tmp_path):
    out = tmp_path / "out"
    # 1 s per request: the 30 queued after the 4th take 15 s, far more than the test's delay in sending SIGINT
    with JudgeServer(lambda call, body: (200, scripted_reply(body), 1.0)) as server:
        argv = ["--results_dir", str(fixture_dirs / "res"), "--dataset_dir", str(fixture_dirs / "ds"),
                "--output_dir", str(out), "--judge", "openai", "--judge_url", server.url, "--judge_model", "scripted",
                "--judge_concurrency", "2", "--no_plots"]
        # Ctrl-C as a terminal delivers it, whatever this process inherited: a shell that starts jobs in the
        # background (CI runners, `make test &`) ignores SIGINT, and an ignored SIGINT stays ignored across exec
        proc = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, "evaluate.metrics", *argv], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600  # a bound for a stuck run only
        while len(server.requests) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        asked = len(server.requests)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert asked < 34  # the queued calls were dropped, not run
    cached = list((out / "judge_cache").rglob("*.json"))
    assert 3 <= len(cached) <= asked


def test_output_dir_may_be_the_results_dir(tmp_path):
    write_dataset(tmp_path / "ds", {"v": [VID_B]})
    results = write_results(tmp_path / "res", {"v": [VID_B]})
    argv = ["--results_dir", str(results), "--dataset_dir", str(tmp_path / "ds"), "--output_dir", str(results),
            "--no_plots"]
    assert main(argv) == 0 and main(argv) == 0  # the second run does not mistake report.json for a result
    assert json.loads((results / "report.json").read_text())["inputs"]["result_files"] == 1


def test_partial_chains_and_inference_errors(tmp_path):
    """Runs made with --max_questions hold chain prefixes; failed QAs carry an `error` field and "" prediction."""
    labelled = [QASpec("Basic/Items", 1, "What is held?", "a red umbrella", "a red umbrella")] * 3
    write_dataset(tmp_path / "ds", {"v": [labelled]})
    results = write_results(tmp_path / "res", {"v": [labelled[:2]]})
    payload = json.loads((results / "v.json").read_text())
    payload["Data"][0][1].update(prediction="", error="prompt over the context limit")
    (results / "v.json").write_text(json.dumps(payload))
    argv = ["--results_dir", str(results), "--dataset_dir", str(tmp_path / "ds"), "--output_dir",
            str(tmp_path / "out"), "--no_plots"]
    assert main(argv) == 2  # a prefix is a count mismatch unless asked for
    assert main(argv + ["--allow-partial-chains"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["inputs"]["qas_scored"] == 2 and report["inputs"]["qas_with_inference_error"] == 1
    assert report["overall"]["Avg"] == 50.0  # 10 for the answer, 0 for the failed (empty) one
