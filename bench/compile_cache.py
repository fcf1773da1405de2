"""What `--compilation_cache_dir` saves: the same `cogstream eval` run (tiny random model, one sample video, a few
questions) in fresh processes, without the cache, then twice with an empty cache folder: the first run compiles
and writes every program, the second reads them back. Wall time of each process (start-up, loading and the
questions included), median over `--repeats` rounds, and the cache's own report (programs read back, compiled).

Headline value = warm-cache run / no-cache run wall time (lower is better). Every program is kept
(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0: the tiny model's programs compile in well under JAX's one-second
default). On CPU the tiny model computes little, so this is mostly compile time; a 7B run's compiles take minutes
on a TPU or GPU (compile-check table), its compute too. Run: `python bench/compile_cache.py [--repeats 3]`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"compilation cache \S+: (\d+) programs read back, (\d+) compiled \((\d+) written\)")


def _eval(args: list[str], env: dict[str, str]) -> tuple[float, tuple[int, int, int] | None]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "evaluate.answer_generate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"eval exited {done.returncode}: {done.stderr[-2000:]}")
    found = SUMMARY.search(done.stderr)
    return wall, None if found is None else tuple(int(n) for n in found.groups())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--questions", type=int, default=3)
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    from cogstream_jax.data.synth import sample_dataset_dir

    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    work = pathlib.Path(tempfile.mkdtemp(prefix="compile-cache-bench-"))
    queries = work / "QA"
    queries.mkdir()
    shutil.copy(sample_dataset_dir() / "QA_Dataset" / "synth_0_000.json", queries)
    common = ["--model_path", "tiny", "--video_dir", str(sample_dataset_dir() / "event_segments"),
              "--query_dir", str(queries), "--max_questions", str(args.questions), "--max_new_tokens", "8",
              "--no_progress"]
    plain, cold, warm, reports = [], [], [], []
    for r in range(args.repeats):
        cache = work / f"cache{r}"
        plain.append(_eval([*common, "--save_dir", str(work / f"plain{r}")], env)[0])
        for times, name in ((cold, "cold"), (warm, "warm")):
            wall, report = _eval([*common, "--save_dir", str(work / f"{name}{r}"), "--compilation_cache_dir",
                                  str(cache)], env)
            times.append(wall)
            reports.append((name, report))
        print(f"round {r}: no cache {plain[-1]:.1f} s, empty cache {cold[-1]:.1f} s, warm cache {warm[-1]:.1f} s "
              f"({reports[-1][1]})", file=sys.stderr)
    same = all((work / f"{name}{r}" / "synth_0_000.json").read_bytes()
               == (work / f"plain{r}" / "synth_0_000.json").read_bytes()
               for r in range(args.repeats) for name in ("cold", "warm"))
    shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in (("plain", plain), ("cold", cold), ("warm", warm))}
    warm_report = [rep for name, rep in reports if name == "warm"][-1]
    print(json.dumps({"bench": "compile_cache_eval", "value": round(med["warm"] / med["plain"], 3),
                      "no_cache_s": round(med["plain"], 2), "empty_cache_s": round(med["cold"], 2),
                      "warm_cache_s": round(med["warm"], 2), "warm_read_back": warm_report[0],
                      "warm_compiled": warm_report[1], "same_results": same, "repeats": args.repeats,
                      "questions": args.questions}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
