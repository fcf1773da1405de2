"""`make demo`: CogReasoner's whole life cycle on the bundled synthetic CogStream sample.

model -> convert to orbax -> validate data -> stage-1 training -> stage-2 training -> PEFT export of both
adapters -> streaming evaluation (loading the PEFT folders back) -> metrics report. Every stage runs the same
entry point a user would (`cogstream <command> ...`, printed before it runs) and says where it wrote its outputs.
By default the model is a TINY RANDOM model (real tokenizer and token ids, random weights): the pipeline is
real, the answers are noise. `--model_path` runs the same pipeline on real weights.
"""
from __future__ import annotations

import importlib
import os
import pathlib
import shlex
import shutil
import sys
import time
from typing import Sequence

from cogstream_jax.cli import COMMANDS
from cogstream_jax.cli_utils import ArgumentParser, run_cli
from cogstream_jax.errors import UserError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="cogstream demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default=None,
                   help="a VideoLLaMA3 checkpoint folder; default: a tiny random model written by the demo")
    p.add_argument("--output_dir", default="demo_out", help="where every stage writes (default demo_out/)")
    p.add_argument("--dataset_dir", default=None, help="CogStream-layout dataset (default: the bundled sample)")
    p.add_argument("--steps", type=int, default=4, help="updates per training stage (default 4)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="answer length cap in the evaluation")
    p.add_argument("--videos", type=int, default=3, help="videos to evaluate (default 3)")
    p.add_argument("--questions", type=int, default=14,
                   help="questions per video in the evaluation (default 14: the long sample stream then passes "
                        "135 frames, so event compression runs)")
    p.add_argument("--fresh", action="store_true", help="delete --output_dir first")
    return p


def _run(stage: str, command: str, args: list[str], outputs: Sequence[pathlib.Path]) -> None:
    """Run one `cogstream` subcommand in-process, then check and report its outputs."""
    print(f"\n=== {stage}\n$ cogstream {command} {' '.join(shlex.quote(a) for a in args)}", flush=True)
    start = time.perf_counter()
    code = importlib.import_module(COMMANDS[command][0]).main(args)
    if code:
        raise UserError(f"demo stage '{stage}' failed (exit code {code}); see the messages above")
    missing = [str(p) for p in outputs if not p.exists()]
    if missing:
        raise UserError(f"demo stage '{stage}' did not write {', '.join(missing)}")
    print(f"--- {stage}: done in {time.perf_counter() - start:.1f} s; wrote " + ", ".join(str(p) for p in outputs),
          flush=True)


def write_tiny_model(target: pathlib.Path) -> pathlib.Path:
    """A tiny random VideoLLaMA3 in the original (CogStream) layout with the bundled tokenizer and configs."""
    from cogstream_jax import config as configs
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.reference_files import bundled_model_dir
    from cogstream_jax.weights.export import save_pretrained

    from flax import nnx

    save_pretrained(VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0)), target, layout="original")
    for f in bundled_model_dir().iterdir():
        if f.name != "config.json":
            shutil.copy(f, target / f.name)
    return target


#: marks a folder the demo created, the only kind `--fresh` deletes
DEMO_MARKER = ".cogstream_demo"


def demo(args) -> int:
    from cogstream_jax.data.synth import sample_dataset_dir

    out = pathlib.Path(args.output_dir).resolve()
    if args.fresh and out.exists():
        if any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
            raise UserError(f"--fresh: {out} is not a demo output folder (no {DEMO_MARKER}); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()
    data = pathlib.Path(args.dataset_dir or sample_dataset_dir()).resolve()
    began = time.perf_counter()

    if args.model_path:
        model = pathlib.Path(args.model_path).resolve()
        print(f"model: {model} (real weights)")
    else:
        model = out / "model"
        print("model: TINY RANDOM VideoLLaMA3 (real tokenizer, random weights) -- outputs are noise, the pipeline is "
              "real. Run `make demo MODEL=/path/to/VideoLLaMA3-7B` for real weights.")
        if not (model / "config.json").exists():
            write_tiny_model(model)
        print(f"--- tiny model written to {model}")
    print(f"dataset: {data}")

    orbax = out / "model_orbax"
    _run("convert safetensors -> orbax", "convert",
         ["--model_path", str(model), "--output_dir", str(orbax)], [orbax / "config.json"])
    _run("validate the dataset", "validate-data", ["--data_dir", str(data)], [])

    import jax

    stage1, stage2 = out / "stage1", out / "stage2"
    batch = max(2, jax.device_count())  # one item per data-parallel device at least
    _run("stage 1: Historic Dialogue Retrieval LoRA", "train-stage1",
         ["--model_path", str(orbax), "--QA_path", str(data / "QA_Dataset"), "--output_dir", str(stage1),
          "--max_steps", str(args.steps), "--global_batch_size", str(batch), "--no_progress"],
         [stage1 / "adapter" / "adapter_meta.json", stage1 / "metrics.jsonl"])
    _run("stage 2: interleave-reasoning LoRA", "train-stage2",
         ["--model_path", str(orbax), "--video_dir", str(data / "event_segments"),
          "--query_dir", str(data / "QA_Dataset"), "--num_epochs", "1", "--output_dir", str(stage2),
          "--max_steps", str(args.steps), "--global_batch_qas", "1", "--bucket_scan_qas", str(args.steps),
          "--no_progress"],
         [stage2 / "adapter" / "adapter_meta.json", stage2 / "metrics.jsonl"])

    peft1, peft2 = out / "peft" / "retrieval", out / "peft" / "answer"
    for adapter, target in ((stage1, peft1), (stage2, peft2)):
        _run(f"export {adapter.name} adapter to PyTorch PEFT", "export-peft",
             ["--adapter_dir", str(adapter / "adapter"), "--output_dir", str(target), "--layout", "original"],
             [target / "adapter_config.json", target / "adapter_model.safetensors"])

    results = out / "results"
    _run("streaming evaluation (adapters loaded from the PEFT folders)", "eval",
         ["--model_path", str(orbax), "--retrieval_adapter", str(peft1), "--answer_adapter", str(peft2),
          "--video_dir", str(data / "event_segments"), "--query_dir", str(data / "QA_Dataset"),
          "--save_dir", str(results), "--limit", str(args.videos), "--max_questions", str(args.questions),
          "--max_new_tokens", str(args.max_new_tokens), "--no_progress"],
         [results])
    report = out / "report"
    _run("metrics report (offline judge)", "score",
         ["--results_dir", str(results), "--dataset_dir", str(data), "--output_dir", str(report),
          "--judge", "offline", "--allow_partial_chains"],
         [report / "report.json", report / "report.md"])
    print(f"\ndemo finished in {time.perf_counter() - began:.0f} s; everything is under {out}")
    print(f"read {report / 'report.md'} for the scores (noise with the tiny random model)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_cli(lambda: demo(args))


if __name__ == "__main__":
    sys.exit(main())
