"""Rematerialisation in the training steps (issue 14): every `--remat` policy gives the no-remat loss and LoRA
gradients (fp32, tiny model) in the stage-1 accumulating step and the stage-2 QA gradient, inside
`jax.value_and_grad` over the split LoRA params (where `nnx.remat` used to raise TraceContextError), and the
same holds through both CLIs (loss, gradient norm and final adapter of `--remat full|dots|offload` vs `--remat
none`)."""
from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cogstream_jax import lora
from cogstream_jax.model.qwen2 import REMAT_CHOICES
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import step as steps
from cogstream_jax.training.batching import step_batch
from cogstream_jax.training.losses import allowed_mask
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.step import StepOptions
from train_helpers import ALLOWED, random_rows, random_video_batch, small_vocab_config

POLICIES = [p for p in REMAT_CHOICES if p != "none"]
REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cogstream_jax" / "assets" / "sample"
REMAT_EQN = re.compile(r"\b(?:remat\w*|checkpoint)\[")  # jax.checkpoint's primitive in a printed jaxpr


def _close(loss, ref_loss, grads, ref_grads) -> None:
    """Loss within 1e-5 relative; every gradient within 1e-5 of the largest |g| of the reference."""
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(leaves) == len(ref_leaves) > 0
    scale = max(float(np.abs(np.asarray(g)).max()) for g in ref_leaves)
    assert scale > 0
    worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(leaves, ref_leaves))
    assert worst <= 1e-5 * scale, (worst, scale)


def _setup(spec_fn, adapter: str):
    """fp32 tiny model (small vocabulary), adapter with random A and B (so both get real gradients), SGD(1)."""
    model = VideoLlama3(small_vocab_config(), rngs=nnx.Rngs(0))
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    setup = build_setup(model, adapter, spec_fn(model.config), optax.sgd(1.0), mesh, seed=0,
                        options=StepOptions(remat="none", dropout=False))
    leaves, treedef = jax.tree.flatten(setup.state.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    random = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    setup.state = setup.state.replace(params=jax.tree.unflatten(treedef, random))
    return setup


@pytest.fixture(scope="module")
def stage1_results():
    """{policy: (loss, grads)} of one stage-1 update (2 micro-batches of 2 rows); grads = params - new params."""
    setup = _setup(lora.language_module_spec, lora.LANGUAGE_MODULE)
    ids, labels, mask = random_rows(np.random.default_rng(1), rows=4, length=24, n_targets=5, pad=3)
    batch = step_batch(ids, labels, mask, micro_batches=2)
    allowed = allowed_mask(ALLOWED, small_vocab_config().text.vocab_size)
    before = jax.tree.map(np.asarray, setup.state.params)
    out = {}
    for policy in REMAT_CHOICES:
        step = steps.make_accumulating_step(setup.split.graphdef, setup.tx, setup.lr_schedule, allowed=allowed,
                                            options=StepOptions(remat=policy, dropout=False),
                                            state_sharding=setup.state_sharding,
                                            frozen_sharding=setup.frozen_sharding, mesh=setup.mesh)
        state = jax.tree.map(jnp.copy, setup.state)  # the step donates its state
        new_state, metrics = step(state, setup.frozen, batch)
        out[policy] = (metrics["loss"], jax.tree.map(lambda b, a: b - np.asarray(a), before, new_state.params))
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_stage1_step_remat_matches_no_remat(stage1_results, policy):
    loss, grads = stage1_results[policy]
    ref_loss, ref_grads = stage1_results["none"]
    _close(loss, ref_loss, grads, ref_grads)


@pytest.fixture(scope="module")
def stage2_results():
    """{policy: (loss, grads)} of the stage-2 gradient of one multimodal QA (full_module: LLM + projector)."""
    setup = _setup(lora.full_module_spec, lora.FULL_MODULE)
    arrays, layout, kept, _ = random_video_batch(small_vocab_config(), seed=2)
    out = {}
    for policy in REMAT_CHOICES:
        grad = steps.make_qa_grad(setup.split.graphdef, options=StepOptions(remat=policy, dropout=False),
                                  accumulation=1, state_sharding=setup.state_sharding,
                                  frozen_sharding=setup.frozen_sharding, mesh=setup.mesh)
        grads, loss, count = grad(setup.state, setup.frozen, arrays, 0, layout, kept)
        assert float(count) == 6
        jaxpr = str(jax.make_jaxpr(lambda *a: grad(*a, 0, layout, kept))(setup.state, setup.frozen, arrays))
        out[policy] = (loss, grads, len(REMAT_EQN.findall(jaxpr)))
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_stage2_qa_grad_remat_matches_no_remat(stage2_results, policy):
    loss, grads, remats = stage2_results[policy]
    ref_loss, ref_grads, ref_remats = stage2_results["none"]
    layers = small_vocab_config().text.num_hidden_layers
    # the layers run as one scan (the training default): one rematerialised block, the scanned layer body
    assert layers > 1 and (remats, ref_remats) == (1, 0)
    _close(loss, ref_loss, grads, ref_grads)
    projector = [np.asarray(g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
                 if "mm_projector" in jax.tree_util.keystr(path)]
    assert projector and max(np.abs(g).max() for g in projector) > 0  # gradient reaches the projector adapter


def test_remat_setting_is_checked_and_defaults_on():
    assert StepOptions().remat == steps.DEFAULT_REMAT != "none"
    with pytest.raises(ValueError, match="unknown remat policy 'nothing'"):
        StepOptions(remat="nothing")
    from cogstream_jax.training.run_common import build_common_parser

    parse = lambda *a: build_common_parser("t").parse_args(["--model_path", "tiny", "--output_dir", "o", *a]).remat
    assert parse() == steps.DEFAULT_REMAT
    assert parse("--remat") == "full" and parse("--remat", "--seed", "1") == "full"  # bare flag: backward compatible
    assert parse("--remat", "dots") == "dots" and parse("--remat=none") == "none"


# ------------------------------------------------------------------------------------------ through the CLIs
def _runs(root: pathlib.Path, module: str, args: list[str]) -> dict[str, pathlib.Path]:
    """One CLI run per policy (`--remat` alone for full: the backward-compatible spelling), in this process: the
    CLI's own `main` with its own flags (a subprocess per run would only add start-up, tokenizer and compile time)."""
    import importlib

    main = importlib.import_module(module).main
    flags = {"none": ["--remat", "none"], "full": ["--remat"], **{p: ["--remat", p] for p in POLICIES if p != "full"}}
    outs = {policy: root / policy for policy in flags}
    for policy, extra in flags.items():
        assert main([*args, *extra, "--output_dir", str(outs[policy])]) == 0, policy
    return outs


def _metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: pathlib.Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore((out / "adapter" / "lora").absolute())
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_cli(outs: dict[str, pathlib.Path], policy: str, updates: int) -> None:
    ref, got = _metrics(outs["none"]), _metrics(outs[policy])
    assert [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, updates + 1))
    for a, b in zip(got, ref):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
    assert json.loads((outs[policy] / "train_config.json").read_text())["remat"] == policy
    a, b = _adapter(outs[policy]), _adapter(outs["none"])
    assert a.keys() == b.keys() and a
    scale = max(float(np.abs(v).max()) for v in b.values())
    moved = max(float(np.abs(v).max()) for k, v in b.items() if "lora_b" in k)
    assert moved > 0  # the compared updates changed the adapter (lora_b starts at zero)
    for key in a:
        assert np.abs(a[key] - b[key]).max() <= 1e-5 * scale, key


@pytest.fixture(scope="module")
def stage1_cli(tmp_path_factory):
    # 2 updates: the first one has learning rate 0 (warmup), the second moves the adapter
    args = ["--model_path", "tiny", "--QA_path", str(SAMPLE), "--global_batch_size", "2", "--max_length", "576",
            "--dtype", "float32", "--num_train_epochs", "1", "--no_progress", "--seed", "0", "--max_steps", "2"]
    return _runs(tmp_path_factory.mktemp("remat_stage1"), "train.stage1", args)


@pytest.fixture(scope="module")
def stage2_cli(tmp_path_factory):
    # one QA per update keeps it to one compiled shape; tensor=8 spans the 8 devices of this process with one row
    args = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
            str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "0",
            "--global_batch_qas", "1", "--max_steps", "1", "--mesh", "1,1,8", "--bucket_scan_qas", "1"]
    return _runs(tmp_path_factory.mktemp("remat_stage2"), "train.stage2", args)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_stage1_cli_remat_matches_no_remat(stage1_cli, policy):
    _check_cli(stage1_cli, policy, updates=2)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_stage2_cli_remat_matches_no_remat(stage2_cli, policy):
    _check_cli(stage2_cli, policy, updates=1)
