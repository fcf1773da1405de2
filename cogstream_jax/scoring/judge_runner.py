"""Running all judge calls of a result set: cache first, then the judge with bounded concurrency."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from cogstream_jax.scoring.judge_cache import JudgeCache, judgement_key
from cogstream_jax.scoring.judge_prompts import JudgeRequest
from cogstream_jax.scoring.judges import Judge, JudgeError


@dataclass
class JudgingOutcome:
    """Scores per request index (None when the judgement failed) and the bookkeeping for the report."""

    scores: list[dict[str, int] | None]
    cache_hits: int = 0
    calls: int = 0
    failures: list[str] = field(default_factory=list)


def run_judgements(requests: list[JudgeRequest], judge: Judge, cache: JudgeCache, concurrency: int = 4,
                   progress: bool = False, describe: list[str] | None = None) -> JudgingOutcome:
    """Judge every request once; results are cached as they arrive so an interrupted run resumes.

    `describe[i]` names where request i comes from (e.g. "video chain 0") in failure messages.
    """
    outcome = JudgingOutcome(scores=[None] * len(requests))
    keys = [judgement_key(judge.identity, request.messages) for request in requests]
    pending = []
    for index, key in enumerate(keys):
        cached = cache.get(key)
        if cached is not None and set(cached) == set(requests[index].expected_keys):
            outcome.scores[index] = cached
            outcome.cache_hits += 1
        else:
            pending.append(index)

    def call(index: int) -> dict[str, int]:
        scores = judge.judge(requests[index])
        cache.put(keys[index], judge.identity, requests[index].metric, scores)
        return scores

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(call, index): index for index in pending}
        for done, future in enumerate(as_completed(futures), start=1):
            index = futures[future]
            outcome.calls += 1
            try:
                outcome.scores[index] = future.result()
            except JudgeError as exc:
                request = requests[index]
                where = f"{describe[index]} " if describe else ""
                outcome.failures.append(f"{where}{request.metric} {','.join(request.expected_keys)}: {exc}")
            if progress and (done % 50 == 0 or done == len(futures)):
                print(f"judged {done}/{len(futures)} (cache hits {outcome.cache_hits})", file=sys.stderr)
    except BaseException:
        cancel = getattr(judge, "cancel", None)
        if cancel is not None:  # calls in flight give up their remaining retries
            cancel()
        raise
    finally:
        # On Ctrl-C (or any error) drop the queued calls instead of running them all; finished ones are cached.
        pool.shutdown(wait=True, cancel_futures=True)
    return outcome
