"""Score CogStream result files: retrieval quality, the five judge metrics, text metrics and a report.

    python -m evaluate.metrics --results_dir DIR --dataset_dir DIR --output_dir DIR \
        [--judge offline|openai|local] [--judge_url URL --judge_model NAME --judge_concurrency N]

Writes report.json, report.md and PNG figures to --output_dir; judgements are cached (default
<output_dir>/judge_cache) so an interrupted run resumes and a rerun makes no judge calls. The openai judge
sends $OPENAI_API_KEY as a bearer token when that variable is set. Exit status 0 when
everything was scored, 1 on a user error or when some files or judgements could not be scored (the report
still covers the rest and lists them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cogstream_jax.errors import UserError


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Official underscore flag plus its hyphenated alias."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.metrics", description=__doc__.split("\n\n")[0])
    _add(parser, "results_dir", required=True, type=Path, help="folder of {video}.json result files")
    _add(parser, "dataset_dir", required=True, type=Path, help="split folder holding VQA_Dataset/ (labels)")
    _add(parser, "output_dir", required=True, type=Path, help="where report.json, report.md and PNGs go")
    _add(parser, "judge", default="offline", choices=["offline", "openai", "local"],
         help="offline: text-similarity proxy (default); openai: OpenAI-compatible server; local: our JAX model")
    _add(parser, "judge_url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    _add(parser, "judge_model", default=None, help="model name sent to the judge server")
    _add(parser, "judge_concurrency", default=4, type=int, help="parallel judge requests (default 4)")
    _add(parser, "judge_timeout", default=60.0, type=float, help="seconds per judge request (default 60)")
    _add(parser, "judge_retries", default=3, type=int, help="retries per judgement after the first try (default 3)")
    _add(parser, "cache_dir", default=None, type=Path, help="judgement cache (default <output_dir>/judge_cache)")
    _add(parser, "model_path", default=None, help="model for --judge local")
    _add(parser, "no_plots", action="store_true", help="skip the PNG figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cogstream_jax.scoring.judges import make_judge
    from cogstream_jax.scoring.pipeline import score_results

    try:
        if args.judge_concurrency < 1 or args.judge_retries < 0 or args.judge_timeout <= 0:
            raise UserError("--judge_concurrency must be >= 1, --judge_retries >= 0 and --judge_timeout > 0")
        judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model, timeout_s=args.judge_timeout,
                           max_retries=args.judge_retries, model_path=args.model_path)
        run = score_results(args.results_dir, args.dataset_dir, args.output_dir, judge, cache_dir=args.cache_dir,
                            concurrency=args.judge_concurrency, progress=True, plots=not args.no_plots)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; finished judgements are cached, rerun the same command to resume", file=sys.stderr)
        return 130
    overall = run.report["overall"]
    avg = overall["Avg"]
    print(f"wrote {run.output_dir / 'report.md'}: Avg {'n/a' if avg is None else f'{avg:.2f}'} over "
          f"{run.report['inputs']['qas_scored']} QAs")
    for line in run.problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if run.problems else 0


if __name__ == "__main__":
    sys.exit(main())
