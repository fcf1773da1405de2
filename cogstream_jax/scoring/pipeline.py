"""End-to-end scoring of a results folder: load, join labels, judge, aggregate, write the report."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogstream_jax.errors import DataError
from cogstream_jax.io_utils import as_given
from cogstream_jax.scoring.aggregate import ScoredQA, summarize
from cogstream_jax.scoring.join import QARecord, join_results
from cogstream_jax.scoring.judge_cache import JudgeCache
from cogstream_jax.scoring.judge_prompts import JudgeRequest, chain_requests
from cogstream_jax.scoring.judge_runner import JudgingOutcome, run_judgements
from cogstream_jax.scoring.judges import Judge
from cogstream_jax.scoring.labels import vqa_dir
from cogstream_jax.scoring.nlp_metrics import nlp_report
from cogstream_jax.scoring.report import write_report
from cogstream_jax.scoring.results import load_results_dir
from cogstream_jax.scoring.retrieval import retrieval_report

REPORT_SCHEMA = "cogstream-jax-scoring/1"


@dataclass(frozen=True)
class ScoringRun:
    report: dict[str, Any]
    output_dir: Path

    @property
    def problems(self) -> list[str]:
        """One line per input that was not (fully) scored; empty when everything was."""
        lines = [f"skipped: {item['reason']}" for item in self.report["skipped"]]
        lines += [f"judgement failed: {failure}" for failure in self.report["judge"]["failures"]]
        return lines


def _chains(records: list[QARecord]) -> dict[tuple[str, int], list[QARecord]]:
    chains: dict[tuple[str, int], list[QARecord]] = defaultdict(list)
    for record in records:
        chains[(record.video, record.chain_id)].append(record)
    return chains


def judge_records(records: list[QARecord], judge: Judge, cache: JudgeCache, concurrency: int,
                  progress: bool = False) -> tuple[list[ScoredQA], JudgingOutcome]:
    """Build every judge call, run them (cached) and attach the scores to the QAs."""
    requests: list[JudgeRequest] = []
    owners: list[tuple[str, int]] = []
    chains = _chains(records)
    for owner, chain in chains.items():
        chain_reqs = chain_requests([record.qa for record in chain])
        requests += chain_reqs
        owners += [owner] * len(chain_reqs)
    outcome = run_judgements(requests, judge, cache, concurrency=concurrency, progress=progress,
                             describe=[f"{video} chain {chain_id}" for video, chain_id in owners])
    scores: dict[tuple[str, int, str], dict[str, int]] = defaultdict(dict)
    for request, owner, result in zip(requests, owners, outcome.scores):
        for key, value in (result or {}).items():
            scores[(*owner, key)][request.metric] = value
    scored = [ScoredQA(video=r.video, chain_id=r.chain_id, qa_id=r.qa.qa_id, label=r.label.label, level=r.label.level,
                       segment=r.label.segment, scores=scores.get((r.video, r.chain_id, f"PredA{r.qa.qa_id}"), {}))
              for chain in chains.values() for r in chain]
    return scored, outcome


def _rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def build_report(records: list[QARecord], scored: list[ScoredQA], outcome: JudgingOutcome, judge: Judge,
                 inputs: dict[str, Any], skipped: list[dict[str, str]], mismatches: list[str]) -> dict[str, Any]:
    chain_ids = sorted({record.chain_id for record in records})
    per_chain = {}
    for chain_id in chain_ids:
        per_chain[str(chain_id)] = summarize([qa for qa in scored if qa.chain_id == chain_id]) | {
            "retrieval": retrieval_report([r for r in records if r.chain_id == chain_id])}
    return _rounded({
        "schema": REPORT_SCHEMA,
        "inputs": inputs,
        "judge": {"identity": judge.identity, "requests": len(outcome.scores), "cache_hits": outcome.cache_hits,
                  "calls": outcome.calls, "failures": sorted(outcome.failures)},
        "skipped": skipped,
        "question_mismatches": mismatches,
        "overall": summarize(scored) | {"retrieval": retrieval_report(records)},
        "per_chain": per_chain,
        "nlp": nlp_report([r.qa.prediction for r in records], [r.qa.answer for r in records]),
    })


def score_results(results_dir: Path, dataset_dir: Path, output_dir: Path, judge: Judge, cache_dir: Path | None = None,
                  concurrency: int = 4, progress: bool = False, plots: bool = True,
                  allow_partial: bool = False) -> ScoringRun:
    """Score every result file; bad files are listed in the report and the rest is still scored. Any folder may
    be a URL (gs://...): the report, figures and judge cache are then written there."""
    results_dir, dataset_dir, output_dir = as_given(results_dir), as_given(dataset_dir), as_given(output_dir)
    vqa_dir(dataset_dir)
    videos, skipped_files = load_results_dir(results_dir)
    joined = join_results(videos, skipped_files, dataset_dir, allow_partial)
    skipped = [{"file": str(item.path), "reason": item.reason} for item in joined.skipped]
    if not joined.records:
        first = skipped[0]["reason"] if skipped else "no QA results"
        raise DataError(f"--results_dir {results_dir}: no result file could be scored ({len(skipped)} skipped; "
                        f"first: {first})")
    records = list(joined.records)
    cache = JudgeCache(as_given(cache_dir) if cache_dir else output_dir / "judge_cache")
    scored, outcome = judge_records(records, judge, cache, concurrency, progress)
    inputs = {"results_dir": str(results_dir), "dataset_dir": str(dataset_dir),
              "result_files": len(videos) + len(skipped_files), "videos_scored": len({r.video for r in records}),
              "qas_scored": len(records), "qas_with_inference_error": sum(r.qa.error is not None for r in records)}
    report = build_report(records, scored, outcome, judge, inputs, skipped, list(joined.question_mismatches))
    write_report(output_dir, report, plots=plots)
    return ScoringRun(report=report, output_dir=output_dir)
