"""The real VideoLLaMA3-7B jobs through `cogstream compile-check` (issue 13): stage 1 (global batch 32 items =
128 rows x 2048 tokens), stage 2 (the largest QA: 180 frames at 14x26 patches, 12,285 kept visual tokens,
13,824 tokens) and eval (largest prompt bucket, decode loop), per topology, with each job's default flags.

Each (job, topology) runs as its own compile-check process; finished rows are kept in `--out` (JSON lines) and
skipped on a rerun, since one 7B program takes minutes to compile on a small host. The table gives per-device GB,
% of HBM, TFLOP per device per step and the step time those FLOPs imply at 40% and 60% MFU (a projection from
the compiler's FLOP count and the chip's published peak, not a measurement). Last line: one JSON object.

    .venv/bin/python bench/compile_check_7b.py [--topologies v5p-8,v6e-8,v5e-16,h100-8] [--jobs stage1,stage2,eval]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402
from cogstream_jax.compilecheck.hardware import target  # noqa: E402


def run_one(job: str, topology: str, extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "cogstream_jax.compilecheck", "--topology", topology, "--job", job,
           "--model_path", "videollama3_7b", "--json", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode not in (0, 3) or not lines:
        return {"job": job, "topology": topology, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return {**json.loads(lines[-1]), "exit_code": done.returncode, "flags": extra}


def table(rows: list[dict]) -> str:
    head = ("| job | topology | mesh | program | GB per device | % HBM | TFLOP per device per step | "
            "step at 40% MFU (projection) | step at 60% MFU (projection) | compile s |")
    out = [head, "|" + "---|" * 10]
    for row in rows:
        if "error" in row and "programs" not in row:
            out.append(f"| {row['job']} | {row['topology']} | | error: {row['error']} |" + " |" * 6)
            continue
        peak = target(row["topology"]).generation.peak_bf16_flops
        mesh = ",".join(f"{k}={v}" for k, v in row["mesh"].items() if v > 1) or "1 device"
        for p in row["programs"]:
            tflop = p["flops_per_chip"] / 1e12
            t40, t60 = (f"{p['flops_per_chip'] / (peak * m):.2f} s" if tflop else "n/a" for m in (0.4, 0.6))
            pct = 100 * p["per_chip_bytes"] / row["hbm_bytes"]
            note = " (does not compile: " + p["error"] + ")" if p.get("error") else ""
            out.append(f"| {row['job']} | {row['topology']} | {mesh} | {p['name']}{note} | "
                       f"{p['per_chip_bytes'] / 1e9:.1f} | {pct:.0f}% | {tflop:.1f} | {t40} | {t60} | "
                       f"{p['compile_s']:.0f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topologies", default="v5p-8,v6e-8,v5e-16,h100-8")
    p.add_argument("--jobs", default="stage1,stage2,eval")
    p.add_argument("--out", default=str(REPO / ".cache" / "compile_check_7b.jsonl"))
    p.add_argument("--timeout", type=int, default=7200, help="seconds per (job, topology)")
    p.add_argument("extra", nargs="*", help="flags passed to every compile-check (after --)")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    have = {(r["job"], r["topology"], tuple(r.get("flags", []))) for r in done if "programs" in r}
    for topology in args.topologies.split(","):
        for job in args.jobs.split(","):
            if (job, topology, tuple(args.extra)) in have:
                continue
            row = run_one(job, topology, args.extra, args.timeout)
            print(json.dumps(row), file=sys.stderr)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    rows = [r for r in done if tuple(r.get("flags", [])) == tuple(args.extra)]
    print(table(rows))
    fits = sum(1 for r in rows if r.get("fits"))
    emit("compile_check_7b", fits, rows=len(rows), fitting=fits,
         note="value = (job, topology) pairs whose every program fits; figures from XLA's compiled programs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
