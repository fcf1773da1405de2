"""Score CogStream result files: retrieval quality, the five judge metrics, text metrics and a report.

    python -m evaluate.metrics --results_dir DIR --dataset_dir DIR --output_dir DIR \
        [--judge offline|openai|local] [--judge_url URL --judge_model NAME --judge_concurrency N]

Writes report.json, report.md and PNG figures to --output_dir; judgements are cached (default
<output_dir>/judge_cache) so an interrupted run resumes and a rerun makes no judge calls. The openai judge
sends $OPENAI_API_KEY as a bearer token when that variable is set. Exit status 0 when
everything was scored, 2 on a user error or when some files or judgements could not be scored (the report
still covers the rest and lists them), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import math
import sys

from cogstream_jax.cli_utils import EXIT_USER_ERROR, add_flag, run_cli
from cogstream_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.metrics", description=__doc__.split("\n\n")[0])
    # folders stay strings (score_results makes them paths): a gs:// URL must not become a local gs:/ folder
    add_flag(parser, "results_dir", required=True, help="folder (or gs:// URL) of {video}.json result files")
    add_flag(parser, "dataset_dir", required=True, help="split folder holding VQA_Dataset/ (labels)")
    add_flag(parser, "output_dir", required=True, help="where report.json, report.md and PNGs go")
    add_flag(parser, "judge", default="offline", choices=["offline", "openai", "local"],
             help="offline: text-similarity proxy (default); openai: OpenAI-compatible server; local: our JAX model")
    add_flag(parser, "judge_url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    add_flag(parser, "judge_model", default=None, help="model name sent to the judge server")
    add_flag(parser, "judge_concurrency", default=4, type=int, help="parallel judge requests (default 4)")
    add_flag(parser, "judge_timeout", default=60.0, type=float, help="seconds per judge request (default 60)")
    add_flag(parser, "judge_retries", default=3, type=int, help="retries per judgement after the first try (default 3)")
    add_flag(parser, "cache_dir", default=None, help="judgement cache (default <output_dir>/judge_cache)")
    add_flag(parser, "model_path", default=None, help="model for --judge local")
    add_flag(parser, "no_plots", action="store_true", help="skip the PNG figures")
    add_flag(parser, "allow_partial_chains", action="store_true",
             help="score result chains shorter than the dataset chain (runs made with --max_questions)")
    return parser


def _score(args: argparse.Namespace) -> int:
    from cogstream_jax.scoring.judges import make_judge
    from cogstream_jax.scoring.pipeline import score_results

    if args.judge_concurrency < 1 or args.judge_retries < 0 or not (math.isfinite(args.judge_timeout)
                                                                    and args.judge_timeout > 0):
        raise UserError("--judge_concurrency must be >= 1, --judge_retries >= 0 and --judge_timeout > 0 (finite)")
    if args.judge != "openai" and (args.judge_url or args.judge_model):
        raise UserError(f"--judge_url / --judge_model are for --judge openai, but --judge is {args.judge!r}")
    if args.judge != "local" and args.model_path:
        raise UserError(f"--model_path is for --judge local, but --judge is {args.judge!r}")
    judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model, timeout_s=args.judge_timeout,
                       max_retries=args.judge_retries, model_path=args.model_path)
    try:
        run = score_results(args.results_dir, args.dataset_dir, args.output_dir, judge, cache_dir=args.cache_dir,
                            concurrency=args.judge_concurrency, progress=True, plots=not args.no_plots,
                            allow_partial=args.allow_partial_chains)
    except KeyboardInterrupt:
        print("error: interrupted; finished judgements are cached, rerun the same command to resume", file=sys.stderr)
        return 130
    avg = run.report["overall"]["Avg"]
    print(f"wrote {run.output_dir / 'report.md'}: Avg {'n/a' if avg is None else f'{avg:.2f}'} over "
          f"{run.report['inputs']['qas_scored']} QAs (judge: {judge.identity})")
    for line in run.problems:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR if run.problems else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _score(args))


if __name__ == "__main__":
    sys.exit(main())
