"""Which token buckets a stage-2 run compiles its gradient for (`--token_buckets`).

Each token bucket is one model-sized gradient program (a minute or more to compile for a 7B model on a TPU) and
every QA pays the padding up to its bucket. On the bundled sample (100 updates) the fixed ladder
(`stage2_buckets.TOKEN_BUCKETS`, 1.5-2x steps) compiles six gradient programs at 20.2% padding; "auto" (the
default) five at 17.4%. It prepares the first `--bucket_scan_qas` distinct QAs of the stream once, with the code
the run uses (decode, resize, rewrite, DiffFP, and event compression scored with the starting adapter through the
run's own vision and scoring programs), and picks the `--token_bucket_count` sizes with the least padding for
those lengths. Which frames event compression pools changes with the adapter and the step (a scanned QA of 1792
tokens took 2894 later in a run), so the largest chosen size holds every scanned QA without event compression;
the fixed ladder continues above it for any longer QA. Every process computes the same buckets from the same
stream (each preparing its own rows of each scan call). The run compiles the chosen (or listed) sizes before its
first update (`BucketPlan.chosen`, `Stage2Device.precompile`), with every call's answer positions at least the
scanned QAs' largest bucket (`BucketPlan.answers`), so that training itself compiles nothing unless a QA outgrows
the plan. Checkpoints record the plan: a resumed run with the same flags takes it without scanning (the same
programs, which a persistent compilation cache then serves). Buckets change padding only, never a loss or a
gradient, so a resumed run with other flags may choose anew.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Iterable

from cogstream_jax.errors import ConfigError, InputError
from cogstream_jax.training import stage2_buckets as sb

CHOICES = ("auto", "ladder")


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """A run's token ladder, the sizes it compiles before the first update (`chosen`: the scan's or the listed ones;
    none for the fixed ladder), and the answer-position bucket every call takes at least (the scanned QAs' largest),
    so that the gradient programs differ by token bucket only."""

    ladder: tuple[int, ...]
    chosen: tuple[int, ...] = ()
    answers: int = sb.ANSWER_BUCKETS[0]


def distinct_qas(samples: Iterable, limit: int) -> list:
    """The first `limit` distinct QAs of `samples` (by name), in stream order."""
    seen, out = set(), []
    for sample in samples:
        if len(out) >= limit:
            break
        name = sb.qa_name(sample)
        if name not in seen:
            seen.add(name)
            out.append(sample)
    return out


def scan_lengths(samples: Iterable, measure: Callable[[list], Iterable[tuple[int, int, int] | None]], limit: int
                 ) -> tuple[list[int], int, int]:
    """Token counts of the first `limit` distinct QAs of `samples` as `measure` makes them (given them all, in
    order, it yields one result per QA, preparing them a device call's worth at a time; None = an over-large QA,
    skipped); the most tokens any of them can take (`measure`'s second count: the QA without event compression,
    whose minor frames depend on the adapter and the step, so a QA can grow back up to it later in the run); the
    most answer tokens (its third). Every process runs the same calls (the same samples, in order)."""
    lengths, longest, answers = [], 0, 0
    for got in measure(distinct_qas(samples, limit)):
        if got is not None:
            lengths.append(got[0])
            longest, answers = max(longest, got[1]), max(answers, got[2])
    return lengths, longest, answers


def parse(choice: str, count: int, scan_qas: int) -> BucketPlan | None:
    """`--token_buckets` checked before any work: the plan it names, or None for "auto"."""
    if choice == "ladder":
        return BucketPlan(sb.TOKEN_BUCKETS)
    if choice == "auto":
        if count < 1 or scan_qas < 1:
            raise ConfigError(f"--token_bucket_count ({count}) and --bucket_scan_qas ({scan_qas}) must be >= 1")
        return None
    try:
        sizes = [int(x) for x in choice.split(",")]
    except ValueError:
        raise ConfigError(f"--token_buckets {choice!r}: expected {' or '.join(CHOICES)} or token counts like "
                          "'256,640,1920'") from None
    try:
        return BucketPlan(sb.token_ladder(sizes), tuple(sorted(set(sizes))))
    except InputError as e:
        raise ConfigError(f"--token_buckets {choice!r}: {e}") from None


def checkpoint_record(choice: str, count: int, scan_qas: int, plan: BucketPlan) -> dict:
    """What a checkpoint keeps of the run's buckets (its metadata), so that a resumed run skips the scan."""
    return {"settings": [choice, count, scan_qas], "ladder": [int(b) for b in plan.ladder],
            "chosen": [int(b) for b in plan.chosen], "answers": int(plan.answers)}


def saved_plan(meta: dict | None, choice: str, count: int, scan_qas: int) -> BucketPlan | None:
    """The plan a resumed run's checkpoint chose under the same flags (None: none, or other flags)."""
    record = (meta or {}).get("token_buckets") or {}
    if record.get("settings") != [choice, count, scan_qas] or not record.get("ladder"):
        return None
    return BucketPlan(tuple(int(b) for b in record["ladder"]), tuple(int(b) for b in record.get("chosen", ())),
                      int(record.get("answers", sb.ANSWER_BUCKETS[0])))


def resolve(plan: BucketPlan | None, count: int, scan_qas: int, make_samples: Callable[[], Iterable],
            measure: Callable[[list], Iterable[tuple[int, int, int] | None]], saved: BucketPlan | None = None
            ) -> BucketPlan:
    """The run's plan: `parse`'s, or for "auto" (None) the one `saved` in the checkpoint a run resumes (every
    process reads the same checkpoint, so all skip the scan or none), else the best `count` sizes for the scanned
    QAs, the largest holding every scanned QA at its longest."""
    if plan is not None:
        return plan
    if saved:
        print(f"stage-2 token buckets {list(saved.ladder)} as the resumed checkpoint's run chose them (no scan)",
              file=sys.stderr)
        return saved
    started = time.perf_counter()
    lengths, longest, answers = scan_lengths(make_samples(), measure, scan_qas)
    if not lengths:
        return BucketPlan(sb.TOKEN_BUCKETS)
    chosen = sb.choose_token_buckets(lengths, count, longest=longest)
    padded = sum(sb.bucket(n, chosen) for n in lengths)
    print(f"stage-2 token buckets {list(chosen)} chosen from {len(lengths)} QAs in "
          f"{time.perf_counter() - started:.1f} s ({100 * (padded / sum(lengths) - 1):.1f}% padding on them; the "
          "fixed ladder above them)", file=sys.stderr)
    return BucketPlan(sb.token_ladder(chosen), chosen, sb.bucket(max(answers, 1), sb.ANSWER_BUCKETS))
