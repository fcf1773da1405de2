"""The streaming evaluation run (protocol 2): one result file per video, resumable and split across workers.

Per video (only chain 0 unless `chains="all"`): group the chain's QAs by Event_Time, zip the sorted times with
the sorted segment files (protocol 1.4), add segment k before the first QA of group k, ask every QA in order,
save `{save_dir}/{video}.json` = {"video_name", "Data": [[per-QA dicts]]} (the official keys, indent 4, UTF-8)
atomically. A QA that fails with a user error (e.g. prompt over the context limit) is saved with an `error`
field and an empty prediction; it stays in the conversation so later indices keep their meaning. The folders may
be object-store URLs (gs://bucket/...): they are handled as `as_path` paths (epath), each file one upload.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cogstream_jax.data.dataset import list_segments, read_json, zip_mapping
from cogstream_jax.data.records import Chain, QARecord, parse_chains
from cogstream_jax.errors import DataError, UserError
from cogstream_jax.io_utils import as_path, atomic_write_text
from cogstream_jax.inference.session import StreamingSession
from cogstream_jax.run_settings import as_json, describe_changes


@dataclass(frozen=True)
class VideoJob:
    name: str
    qa_file: Path
    segments: tuple[Path, ...]
    chains: tuple[Chain, ...]


def find_jobs(video_dir: Path, query_dir: Path, warn: Callable[[str], None] = print) -> list[VideoJob]:
    """Every `query_dir/*.json` whose segment folder exists (the official rule; others are warned about)."""
    video_dir, query_dir = as_path(video_dir), as_path(query_dir)
    if not query_dir.is_dir():
        raise DataError(f"{query_dir}: --query_dir does not exist")
    if not video_dir.is_dir():
        raise DataError(f"{video_dir}: --video_dir does not exist")
    files = sorted(p for p in query_dir.iterdir() if p.suffix == ".json")
    if not files:
        raise DataError(f"{query_dir}: --query_dir holds no .json QA files")
    jobs = []
    for path in files:
        if not (video_dir / path.stem).is_dir():
            warn(f"warning: {video_dir / path.stem}: no segment folder for {path.name}, skipped")
            continue
        warnings: list[str] = []
        chains = parse_chains(read_json(path), str(path), warnings)
        jobs.append(VideoJob(path.stem, path, list_segments(video_dir / path.stem, path.stem, warnings), chains))
        for message in warnings:
            warn(f"warning: {message}")
    if not jobs:
        raise DataError(f"{query_dir}: none of the QA files has a segment folder in {video_dir}")
    return jobs


def shard(jobs: list[VideoJob], process_index: int, num_processes: int) -> list[VideoJob]:
    """Round-robin over the name-sorted videos: every video exactly once over all workers (no padding)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise UserError(f"--process_index {process_index} must be in [0, --num_processes {num_processes})")
    return [job for k, job in enumerate(sorted(jobs, key=lambda j: j.name)) if k % num_processes == process_index]


#: the settings of the run that wrote a results folder (not `*.json`, so scoring never mistakes it for a result)
SETTINGS_FILE = ".cogstream_eval_settings"


def check_settings(save_dir: Path, settings: dict | None) -> None:
    """A rerun skips finished videos, so it must be the same run: with result files present, refuse settings
    that differ from those recorded with them, naming them."""
    save_dir = as_path(save_dir)
    path = save_dir / SETTINGS_FILE
    if settings is None or not path.is_file() or not any(save_dir.glob("*.json")):
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    details = describe_changes(saved, as_json(settings))
    if details:
        raise UserError(f"{save_dir}: holds results of a run with other settings ({details}); use another "
                        "--save_dir or the original settings")


def record_settings(save_dir: Path, settings: dict | None) -> None:
    if settings is not None:
        atomic_write_text(save_dir / SETTINGS_FILE, json.dumps(as_json(settings), indent=2, sort_keys=True) + "\n")


def result_path(save_dir: Path, name: str) -> Path:
    return save_dir / f"{name}.json"


def is_finished(save_dir: Path, name: str) -> bool:
    """A complete result file exists (files are only ever written whole, so a parseable one is final)."""
    path = result_path(save_dir, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("video_name") == name and isinstance(data.get("Data"), list)


def write_atomic(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=4))


def chain_order(chain: Chain, n_segments: int, where: str) -> list[tuple[QARecord, int | None]]:
    """(QA, segment to add first or None) in the official order: Event_Time groups ascending, chain order inside."""
    segment_of = zip_mapping(chain, n_segments, where)
    order = sorted(range(len(chain.qas)), key=lambda k: (segment_of[k], k))
    out, added = [], set()
    for k in order:
        seg = segment_of[k]
        out.append((chain.qas[k], None if seg in added else seg))
        added.add(seg)
    return out


def qa_record(index: int, qa: QARecord, prediction: str, coi: list[int], visual: bool, error: str | None) -> dict:
    record = {"qa_id": index, "question": qa.question, "answer": qa.answer, "prediction": prediction,
              "predicted_coi": coi, "predicted_visual": visual, "coi": qa.relevance_text}
    if error is not None:
        record["error"] = error
    return record


def run_chain(session: StreamingSession, job: VideoJob, chain: Chain, max_questions: int | None,
              on_question: Callable[[], None]) -> list[dict]:
    stream_id = job.name if chain.index == 0 else f"{job.name}#chain{chain.index}"
    session.reset(stream_id)
    records = []
    for index, (qa, segment) in enumerate(chain_order(chain, len(job.segments), str(job.qa_file))):
        if max_questions is not None and index >= max_questions:
            break
        if segment is not None:
            session.add_segment(job.segments[segment])
        try:
            r = session.ask(qa.question, gt_coi=qa.coi, gt_visual=qa.is_visual)
            records.append(qa_record(index, qa, r.answer, r.predicted_coi, r.if_visual, None))
        except UserError as exc:
            session.record_failure(qa.question)
            records.append(qa_record(index, qa, "", [0] * index, True, str(exc)))
        on_question()
    return records


def run_evaluation(session: StreamingSession | Sequence[StreamingSession], jobs: Iterable[VideoJob], save_dir: Path,
                   *, chains: str = "first", max_questions: int | None = None, progress: bool = True,
                   settings: dict | None = None, groups: Sequence[Sequence] | None = None) -> dict:
    """Evaluate `jobs` (already sharded), skipping finished videos; returns counts. `settings` (what changes the
    results) are checked against and recorded with the result files. Several sessions (`parallel.replicate_session`,
    `groups[i]` the devices of session i) evaluate different videos at once, each video once."""
    from tqdm import tqdm

    from cogstream_jax.inference.parallel import run_workers

    sessions = [session] if isinstance(session, StreamingSession) else list(session)
    save_dir = as_path(save_dir)
    check_settings(save_dir, settings)
    save_dir.mkdir(parents=True, exist_ok=True)
    jobs = list(jobs)
    todo = [j for j in jobs if not is_finished(save_dir, j.name)]
    stats = {"videos": 0, "skipped": len(jobs) - len(todo), "questions": 0, "errors": 0}
    if todo:
        record_settings(save_dir, settings)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="video", disable=not progress, dynamic_ncols=True)
    lock = threading.Lock()

    def on_question():
        with lock:
            stats["questions"] += 1
            bar.set_postfix(questions=stats["questions"],
                            qps=f"{stats['questions'] / (time.perf_counter() - start):.2f}")

    def evaluate(worker_session: StreamingSession, job: VideoJob) -> None:
        selected = job.chains if chains == "all" else job.chains[:1]
        data = [run_chain(worker_session, job, chain, max_questions, on_question) for chain in selected]
        write_atomic(result_path(save_dir, job.name), {"video_name": job.name, "Data": data})
        with lock:
            stats["errors"] += sum("error" in r for chain in data for r in chain)
            stats["videos"] += 1
            bar.update(1)

    try:
        run_workers(sessions, todo, groups, evaluate)
    finally:
        bar.close()
    return stats
