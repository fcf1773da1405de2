"""compile-check: the jobs' own programs compile for TPU topologies (libtpu's compile-only devices) on this CPU
host, report positive per-device figures, name exactly the model-sized programs a real run of the job compiles,
refuse what does not fit (exit 3) and bad input (exit 2, one line)."""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import pytest
from flax import nnx

from cogstream_jax.compile_log import CompileLog
from cogstream_jax.compilecheck import cli
from cogstream_jax.config import tiny
from cogstream_jax.data.synth import sample_dataset_dir

SMALL = ["--frames", "4", "--grid", "4x4", "--kept", "10", "--tokens", "128", "--answer_tokens", "16",
         "--max_new_tokens", "8", "--max_length", "256", "--global_batch_size", "4"]
CASES = [("stage1", "v5e-4", "-1,1,1"), ("stage2", "v5e-4", "-1,1,1"),
         ("stage2", "v5p-8", "1,4,1"), ("eval", "v5e-4", "-1,1,1")]
#: flags of one case on top of SMALL: streams over 135 frames, so stage 2 also lists its event-scoring program
EXTRA = {("stage2", "v5p-8"): ["--frames", "140", "--kept", "500", "--tokens", "1024"]}
#: the cases above compile unrolled layers (quicker for a tiny model); this one as the training default, scanned
SCANNED = ("stage2", "v5e-4", "-1,1,1")


def _config_folder(root: pathlib.Path, **text) -> pathlib.Path:
    """A checkpoint-like folder holding only config.json (compile-check never reads weights)."""
    import dataclasses

    config = tiny(vocab_size=text.pop("vocab_size", 2048))
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, **text))
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config.to_hf_config("native")))
    return root


def _check(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), err


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> pathlib.Path:
    return _config_folder(tmp_path_factory.mktemp("small"), num_hidden_layers=3)  # FLOPs extrapolate 1, 2 -> 3


@pytest.fixture(scope="module")
def reports(small_model) -> dict:
    """JSON reports of every case, compiled once for the module."""
    out = {}
    for (job, topology, mesh), scan in [*((case, False) for case in CASES), (SCANNED, True)]:
        pytest_capsys = _Capture()
        code = cli.main(["--topology", topology, "--job", job, "--model_path", str(small_model), f"--mesh={mesh}",
                         "--json", *SMALL, *EXTRA.get((job, topology), []), *([] if scan else ["--no_scan_layers"])])
        out[job, topology, scan] = (code, json.loads(pytest_capsys.stop().strip().splitlines()[-1]))
    return out


class _Capture:
    """stdout capture usable inside a module-scoped fixture (capsys is function-scoped)."""

    def __init__(self):
        import contextlib
        import io

        self.buffer = io.StringIO()
        self._ctx = contextlib.redirect_stdout(self.buffer)
        self._ctx.__enter__()

    def stop(self) -> str:
        self._ctx.__exit__(None, None, None)
        return self.buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("job, topology, mesh", CASES)
def test_jobs_compile_for_tpu_topologies_with_positive_figures(reports, job, topology, mesh):
    code, report = reports[job, topology, False]
    assert code == 0 and report["fits"] is True
    assert report["job"] == job and report["topology"] == topology
    expected_mesh = dict(zip(("data", "fsdp", "tensor"), (int(x) for x in mesh.split(","))))
    if -1 in expected_mesh.values():
        expected_mesh["data"] = report["chips"] // (expected_mesh["fsdp"] * expected_mesh["tensor"])
    assert report["mesh"] == expected_mesh
    assert report["chips"] == 4 and report["hbm_bytes"] > 10**10 and report["compile_s"] > 0
    assert 0 < report["per_chip_bytes"] < report["hbm_bytes"]
    for program in report["programs"]:
        for key in ("per_chip_bytes", "flops_per_chip", "examples_per_step", "compile_s"):
            assert program[key] > 0, (program["name"], key)
    assert report["per_chip_bytes"] == max(p["per_chip_bytes"] for p in report["programs"])
    names = [p["name"] for p in report["programs"]]
    if job == "stage2":  # event scoring (all rows of a call in one program) only for streams over 135 frames
        assert names == ["_encode_chunk", "grad"] + (["score_rows"] if (job, topology) in EXTRA else []), names


@pytest.mark.slow
def test_scanned_layers_report_the_unrolled_flops(reports):
    """XLA counts a scan's body once; compile-check extrapolates from 1- and 2-layer compiles to the 3 layers."""
    code, scanned = reports[(*SCANNED[:2], True)]
    unrolled = reports[(*SCANNED[:2], False)][1]
    assert code == 0 and [p["name"] for p in scanned["programs"]] == [p["name"] for p in unrolled["programs"]]
    for s, u in zip(scanned["programs"], unrolled["programs"]):
        assert s["flops_method"] == "layer extrapolation" and u["flops_method"] == "compiled"
        assert abs(s["flops_per_chip"] - u["flops_per_chip"]) <= 0.01 * u["flops_per_chip"], (s, u)


def test_no_flop_count_reports_xlas_own_count_without_counting_compiles(reports, small_model, capsys):
    """`--no_flop_count` (for runs that only save executables): XLA's count, each scanned layer body once."""
    code, report, err = _check(capsys, "--topology", SCANNED[1], "--job", SCANNED[0], "--model_path", str(small_model),
                               f"--mesh={SCANNED[2]}", "--json", "--no_flop_count", *SMALL)
    counted = reports[(*SCANNED[:2], True)][1]
    assert code == 0 and "1- and 2-layer compiles" not in err
    assert [p["name"] for p in report["programs"]] == [p["name"] for p in counted["programs"]]
    for own, extrapolated in zip(report["programs"], counted["programs"]):
        assert own["flops_method"] == "compiled (loop bodies counted once)"
        assert 0 < own["flops_per_chip"] < extrapolated["flops_per_chip"]
        assert own["per_chip_bytes"] == extrapolated["per_chip_bytes"]


def _model_sized_programs(run) -> set[str]:
    """Names of the programs a real run compiled that take a tower's weights (vision encoder or LLM)."""
    from cogstream_jax.model.videollama3 import VideoLlama3

    model = nnx.eval_shape(lambda: VideoLlama3(tiny(), rngs=nnx.Rngs(0)))
    jax.clear_caches()  # programs an earlier test of this process compiled would otherwise be reused, not compiled
    with CompileLog() as log:
        assert run() == 0
    return {p.name for p in log.model_sized(nnx.state(model.vision_encoder), nnx.state(model.language_model))}


@pytest.mark.slow
def test_programs_are_those_a_real_tiny_run_compiles(reports, tmp_path):
    import train.stage1
    import train.stage2
    from evaluate.answer_generate import main as eval_main

    sample = sample_dataset_dir()
    common = ["--model_path", "tiny", "--dtype", "float32", "--no_progress", "--max_steps", "1"]
    real = {
        "stage1": lambda: train.stage1.main([*common, "--QA_path", str(sample), "--global_batch_size", "8",
                                             "--max_length", "576", "--num_train_epochs", "1",
                                             "--output_dir", str(tmp_path / "s1")]),
        "stage2": lambda: train.stage2.main([*common, "--video_dir", str(sample / "event_segments"),
                                             "--query_dir", str(_one_video(sample, tmp_path)),
                                             "--num_epochs", "1", "--global_batch_qas", "8",
                                             "--output_dir", str(tmp_path / "s2")]),
        "eval": lambda: eval_main(["--model_path", "tiny", "--video_dir", str(sample / "event_segments"),
                                   "--query_dir", str(_one_video(sample, tmp_path)), "--save_dir",
                                   str(tmp_path / "ev"), "--max_questions", "2", "--max_new_tokens", "4",
                                   "--no_progress"]),
    }
    for job, run in real.items():
        listed = [p["name"] for p in reports[job, "v5e-4", False][1]["programs"]]
        compiled = _model_sized_programs(run)
        assert sorted(set(listed)) == sorted(compiled) and len(listed) == len(compiled), (job, listed, compiled)


def _one_video(sample: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "QA_Dataset"
    if not folder.is_dir():
        folder.mkdir()
        shutil.copy(sample / "QA_Dataset" / "synth_0_000.json", folder)
    return folder


@pytest.mark.slow
def test_a_model_that_cannot_fit_exits_3_naming_the_program(tmp_path, capsys):
    huge = _config_folder(tmp_path / "huge", vocab_size=70_000_000)  # 2 x 70M x 64 bf16 = 17.9 GB per chip
    code, report, err = _check(capsys, "--topology", "v5e-4", "--job", "stage2", "--model_path", str(huge),
                               "--mesh=4,1,1", "--json", *SMALL)  # data parallel: weights replicated per chip
    assert code == cli.EXIT_DOES_NOT_FIT and report["fits"] is False
    assert report["per_chip_bytes"] > report["hbm_bytes"] == 16 * 2**30
    too_big = [p for p in report["programs"] if p["per_chip_bytes"] > report["hbm_bytes"] or p.get("error")]
    assert too_big and all(f"does not fit: {p['name']} ({p['label']}) needs" in err for p in too_big)
    assert "a v5e-4 device has 16.00 GiB HBM" in err
    assert "--remat offload" not in err  # weights, not activations, are what does not fit: offloading cannot help


def test_offload_is_suggested_when_activations_fill_the_chip():
    import dataclasses

    from cogstream_jax.compilecheck.report import ProgramReport

    gib = 2**30
    report = lambda temps, args=1 * gib: ProgramReport("grad", "g", args, 0, temps, 0, 0, 1.0, 1, 1.0)  # noqa: E731
    hint = cli.remat_hint([report(15 * gib)], 16 * gib, None)  # 97% of HBM, nearly all temporaries
    assert hint and hint.startswith("grad leaves under 10% of HBM free, mostly activations: --remat offload")
    dots = cli.remat_hint([report(16 * gib)], 16 * gib, "dots")  # its saved matmul outputs are the excess
    assert dots.startswith("grad does not fit, mostly activations: --remat full keeps only the decoder layers' inputs")
    assert cli.remat_hint([report(16 * gib)], 16 * gib, "none").startswith("grad does not fit, mostly "
                                                                             "activations: --remat full")
    assert cli.remat_hint([report(10 * gib)], 16 * gib, None) is None  # 69%: room left
    refused = dataclasses.replace(report(0), error="RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                                  "required for HLO temporaries (173.49G) exceeds available HBM (95.74G).")
    assert cli.remat_hint([refused], 16 * gib, "none").startswith("grad does not fit: --remat full keeps only")
    assert cli.remat_hint([refused], 16 * gib, None) is None  # full already: weights or logits may be the excess
    assert cli.remat_hint([report(2 * gib, args=13 * gib)], 16 * gib, None) is None  # weights fill it
    assert cli.remat_hint([report(15 * gib)], 16 * gib, "offload") is None  # already offloaded


@pytest.mark.slow
def test_remat_offload_keeps_the_layer_inputs_in_host_memory(reports, small_model, capsys):
    """`--remat offload` on a TPU: the scanned gradient's saved layer inputs are host buffers (memory space
    pinned_host in the compiled program), which compile-check reports apart from the device's bytes."""
    mesh = f"--mesh={SCANNED[2]}"
    code, report, err = _check(capsys, "--topology", SCANNED[1], "--job", "stage2", "--model_path", str(small_model),
                               mesh, "--json", *SMALL, "--remat", "offload", "--no_flop_count")
    full = {p["name"]: p for p in reports[(*SCANNED[:2], True)][1]["programs"]}
    grads = [p for p in report["programs"] if p["name"] == "grad"]
    assert code == 0 and len(grads) == 1 and full["grad"]["host_bytes"] == 0
    assert grads[0]["host_bytes"] > 0 and "in host memory)" in err
    assert all(p["host_bytes"] == 0 for p in report["programs"] if p["name"] != "grad")  # no remat, nothing offloaded


def test_stage2_compiles_one_gradient_per_listed_token_bucket(capsys):
    """`--token_buckets` (a run's planned buckets): the vision chunk and one gradient per bucket, each at the
    run's call shape (U = 2 L, every call's answer positions)."""
    code, report, _ = _check(capsys, "--topology", "v5e-4", "--job", "stage2", "--model_path", "tiny", "--json",
                             "--mesh=-1,1,1", *SMALL, "--token_buckets", "256,128", "--no_flop_count")
    assert code == 0 and len(report["programs"]) == 3
    grads = [p["label"] for p in report["programs"][1:]]
    assert grads == ["stage-2 gradient (4 QAs, bucket L=128 U=256 A=64)",
                     "stage-2 gradient (4 QAs, bucket L=256 U=512 A=64)"], grads


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9z-8", "--job", "stage1", "--model_path", "tiny"], "--topology 'v9z-8': unknown accelerator"),
    (["--topology", "v5e-4", "--job", "stage1", "--model_path", "tiny", "--mesh", "2,4,1"],
     "needs 8 devices but 4 are available"),
    (["--topology", "v5e-4", "--job", "stage3", "--model_path", "tiny"], "--job 'stage3': choose one of"),
    (["--topology", "v5e-4", "--job", "stage1", "--model_path", "{empty}"], "no config.json in the folder"),
    (["--topology", "v5e-4", "--job", "stage2", "--model_path", "tiny", "--grid", "4by4"], "--grid '4by4'"),
    (["--topology", "v5e-4", "--job", "stage2", "--model_path", "tiny", "--token_buckets", "auto"],
     "--token_buckets 'auto': expected token counts"),
    (["--topology", "v5e-4", "--job", "stage2", "--model_path", "tiny", "--token_buckets", "200"],
     "must be multiples of 128"),
    (["--topology", "v5e-4", "--job", "stage1", "--model_path", "tiny", "--length_buckets", "600"],
     "--length_buckets '600': 'all' or some of a --max_length 2048 run's padded lengths 512,768,1024,1536,2048"),
    (["--topology", "v5e-4", "--job", "stage2", "--model_path", "tiny", "--length_buckets", "all"],
     "--length_buckets is for --job stage1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_compile_log_names_and_sizes_programs():
    import jax.numpy as jnp

    @jax.jit
    def double(x):
        return x * 2

    x = jnp.ones((4, 8), jnp.float32)
    with CompileLog() as log:
        double(x)
        double(x)  # cached: no second compile
    assert [(p.name, p.argument_bytes, p.argument_shapes) for p in log.programs] == [("double", 128, ((4, 8),))]
    assert log.programs[0].seconds > 0 and [p.name for p in log.model_sized([x])] == ["double"]
    assert log.model_sized([x.T, x.T]) == []


def test_compile_seconds_count_overlapping_compiles_once():
    from cogstream_jax.compile_log import CompiledProgram

    log = CompileLog()
    log.programs = [CompiledProgram("a", 0, (), 2.0, 12.0), CompiledProgram("b", 0, (), 3.0, 13.0),
                    CompiledProgram("c", 0, (), 1.0, 20.0), CompiledProgram("d", 0, (), 0.0, 0.0)]
    assert log.compile_seconds == 4.0  # [10, 13] and [19, 20]


def test_every_tpu_name_maps_to_a_libtpu_topology_with_its_device_count():
    from cogstream_jax.compilecheck.devices import compile_only_devices
    from cogstream_jax.compilecheck.hardware import TARGETS

    kinds = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
    for name, target in TARGETS.items():
        if target.platform != "tpu":
            continue
        devices = compile_only_devices(target)  # raises unless libtpu describes it with target.devices devices
        assert devices[0].device_kind == kinds[target.generation.name], name


def test_gpu_targets_without_the_cudnn_library_are_a_clear_error():
    """Tracing cuDNN attention needs the cuDNN library even to compile only; without it: one line naming the fix."""
    from jax._src.lib import cuda_versions

    from cogstream_jax.errors import ConfigError

    try:
        if cuda_versions is not None and cuda_versions.cudnn_get_version() > 0:
            pytest.skip("this host has cuDNN")
    except RuntimeError:
        pass
    message = r"--topology h100-8: cuDNN attention cannot be compiled here.*--attn_impl xla"
    with pytest.raises(ConfigError, match=message):
        cli.check_cudnn_library("h100-8")


def test_flop_counts_see_through_xla_windowed_einsums():
    """On an fsdp=8 TPU mesh XLA turns an all-gather beside a matmul into a loop over the shards and counts its body
    once (half the FLOPs here); compile-check's FLOP-counting compiles turn that off and get the exact count."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cogstream_jax.compilecheck.devices import compile_only_devices
    from cogstream_jax.compilecheck.hardware import target
    from cogstream_jax.compilecheck.jobs import Program
    from cogstream_jax.compilecheck.report import compile_program, flop_count, has_while_loops, no_persistent_cache

    mesh = Mesh(np.asarray(compile_only_devices(target("v5p-16"))), ("fsdp",))
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    x = jax.ShapeDtypeStruct((8, 16384, 3584), jnp.bfloat16, sharding=rows)
    w = jax.ShapeDtypeStruct((3584, 18944), jnp.bfloat16, sharding=rows)
    matmul = jax.jit(lambda x, w: jnp.einsum("btd,df->btf", x, w), out_shardings=rows)
    program = Program("fsdp matmul", lambda: matmul.lower(x, w), 8)
    exact = 2 * 16384 * 3584 * 18944  # per device: one of the 8 rows of x against all of w
    with no_persistent_cache():  # as compile-check: compile-only executables cannot be read back from the cache
        as_run = compile_program(program)
        flops, loops = flop_count(program, "tpu")
    assert has_while_loops(as_run.executable) and as_run.flops_per_chip < 0.75 * exact
    assert not loops and abs(flops - exact) <= 0.01 * exact
