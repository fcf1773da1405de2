"""LoRA adapters: PEFT semantics, named adapters side by side, merge, the adapter directory format, PEFT parity.

Tiny random VideoLLaMA3 (vocab 160, 2 LLM layers) on CPU in fp32; inputs include an image so the projector
adapters of `full_module` take part.
"""
from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cogstream_jax import adapter_io, lora
from cogstream_jax.config import ModelConfig, videollama3_7b
from cogstream_jax.errors import UserError
from cogstream_jax.model.layers import lora_dropout
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.model.vision import VisualLayout
from cogstream_jax.weights.keys import hf_module_for_our_path
from torch_reference import IMAGE_ID, build_torch_model, random_pixels, tiny_hf_config, to_jax, torch_logits

GRID, MERGE = [[1, 4, 6]], [1]
IDS = np.asarray([[1, 2, 3] + [IMAGE_ID] * 24 + [4, 5, 6]])
LLM_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_hf_config().to_dict())


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return random_pixels(24, 11)


def new_model(config: ModelConfig, seed: int = 0) -> VideoLlama3:
    return VideoLlama3(config, rngs=nnx.Rngs(seed))


def run(model: VideoLlama3, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(model(IDS, pixels, GRID, MERGE).logits)


def randomize(model: VideoLlama3, name: str, seed: int, std: float = 0.2) -> None:
    """Non-zero A and B (B = 0 would make every adapter a no-op)."""
    rng = np.random.default_rng(seed)
    lora.set_adapter_tensors(model, name, {
        hf: (std * rng.standard_normal(a.shape), std * rng.standard_normal(b.shape))
        for hf, (a, b) in lora.adapter_tensors(model, name).items()})


def with_both_adapters(config: ModelConfig) -> VideoLlama3:
    model = new_model(config)
    lora.add_adapter(model, lora.LANGUAGE_MODULE, lora.language_module_spec(config), seed=1)
    lora.add_adapter(model, lora.FULL_MODULE, lora.full_module_spec(config), seed=2)
    return model


def base_params(model: VideoLlama3) -> list[np.ndarray]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def base_logits(config, pixels) -> np.ndarray:
    return run(new_model(config), pixels)


# ---------------------------------------------------------------------------------------------- targets
def expected_modules(layers: int, projector: bool) -> set[str]:
    names = {f"model.layers.{i}.{leaf}" for i in range(layers) for leaf in LLM_LEAVES}
    return names | ({"model.mm_projector.readout.0", "model.mm_projector.readout.2"} if projector else set())


def test_presets_wrap_7xL_and_7xL_plus_2_modules(config):
    model = with_both_adapters(config)
    layers = config.text.num_hidden_layers
    assert set(lora.adapter_tensors(model, lora.LANGUAGE_MODULE)) == expected_modules(layers, False)
    assert set(lora.adapter_tensors(model, lora.FULL_MODULE)) == expected_modules(layers, True)
    assert len(jax.tree.leaves(lora.lora_state(model, lora.FULL_MODULE))) == 2 * (7 * layers + 2)
    big = videollama3_7b()  # 28 layers: resolution only, no model built
    assert set(lora.resolve_targets(big, lora.language_module_spec(big)).values()) == expected_modules(28, False)
    assert len(lora.resolve_targets(big, lora.full_module_spec(big))) == 7 * 28 + 2
    spec = lora.full_module_spec(big)
    assert (spec.r, spec.alpha, spec.dropout, spec.scale) == (8, 16.0, 0.1, 2.0)


def test_new_adapters_use_peft_initialisation(config):
    """B = 0; A ~ kaiming_uniform(a=sqrt(5)) on PEFT's [r, in] weight = U(-1/sqrt(in), 1/sqrt(in))."""
    model = with_both_adapters(config)
    tensors = lora.adapter_tensors(model, lora.FULL_MODULE)
    for hf, (a, b) in tensors.items():
        bound = 1.0 / np.sqrt(a.shape[0])
        assert a.dtype == b.dtype == np.float32 and a.shape[1] == b.shape[0] == 8
        assert not b.any() and np.abs(a).max() <= bound
        assert abs(a.std() / (bound / np.sqrt(3.0)) - 1.0) < 0.15, hf
    lang = lora.adapter_tensors(model, lora.LANGUAGE_MODULE)
    assert not np.array_equal(lang["model.layers.0.mlp.up_proj"][0], tensors["model.layers.0.mlp.up_proj"][0])


def test_native_layout_explicit_index_and_regex_targets(config):
    native = lora.LoraSpec(8, 16, 0.0, ("model.language_model.layers.1.mlp.up_proj", "model.projector.readout.2"))
    original = lora.LoraSpec(8, 16, 0.0, ("model.layers.1.mlp.up_proj", "model.mm_projector.readout.2"))
    regex = lora.LoraSpec(8, 16, 0.0, (r"re:model\.layers\.1\.mlp\.up_proj", r"re:model\.mm_projector\.readout\.2"))
    results = [lora.resolve_targets(config, s) for s in (native, original, regex)]
    assert results[0] == results[1] == results[2]
    assert sorted(results[0].values()) == ["model.layers.1.mlp.up_proj", "model.mm_projector.readout.2"]
    assert results[0]["language_model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("target,fragment", [
    ("model.layers.{i}.self_attn.qkv_proj", "matches no module"),
    ("model.layers.7.self_attn.q_proj", "matches no module"),  # the tiny model has 2 layers
    ("q_proj", "matches no module"),  # no PEFT-style suffix matching
    ("model.layers.{i}.input_layernorm", "non-Linear"),
    ("re:model.layers.(", "invalid regex"),
])
def test_bad_target_raises_naming_it(config, target, fragment):
    spec = lora.LoraSpec(8, 16, 0.1, ("model.layers.{i}.self_attn.q_proj", target))
    model = new_model(config)
    with pytest.raises(UserError, match=fragment) as err:
        lora.add_adapter(model, "bad", spec)
    assert repr(target) in str(err.value)
    assert lora.adapter_names(model) == ()  # nothing half-added
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))


def test_bad_spec_and_names_raise(config):
    with pytest.raises(UserError, match="LoraSpec.r"):
        lora.LoraSpec(0, 16, 0.1, ("model.layers.{i}.self_attn.q_proj",))
    with pytest.raises(UserError, match="LoraSpec.dropout"):
        lora.LoraSpec(8, 16, 1.0, ("model.layers.{i}.self_attn.q_proj",))
    with pytest.raises(UserError, match="target_modules"):
        lora.LoraSpec(8, 16, 0.1, ())
    model = with_both_adapters(config)
    with pytest.raises(UserError, match="already exists"):
        lora.add_adapter(model, lora.FULL_MODULE, lora.full_module_spec(config))
    with pytest.raises(UserError, match="'nope' not found"):
        lora.set_adapter(model, "nope")


# ---------------------------------------------------------------------------------------------- semantics
def test_zero_B_leaves_the_model_exactly_unchanged(config, pixels, base_logits):
    model = with_both_adapters(config)
    for name in (lora.LANGUAGE_MODULE, lora.FULL_MODULE):
        lora.set_adapter(model, name)
        assert lora.active_adapter(model) == name
        np.testing.assert_array_equal(run(model, pixels), base_logits)


def test_lora_logits_equal_merged_logits(config, pixels, base_logits):
    model = with_both_adapters(config)
    randomize(model, lora.FULL_MODULE, seed=3)
    lora.set_adapter(model, lora.FULL_MODULE)
    with_lora = run(model, pixels)
    assert np.abs(with_lora - base_logits).max() > 0.05  # the adapter does something
    lora.merge_adapter(model, lora.FULL_MODULE)
    assert lora.adapter_names(model) == (lora.LANGUAGE_MODULE,) and lora.active_adapter(model) is None
    merged = run(model, pixels)
    assert np.abs(merged - with_lora).max() <= 1e-5


def test_switching_adapters_changes_output_not_base_weights(config, pixels, base_logits):
    model = with_both_adapters(config)
    before = base_params(model)
    randomize(model, lora.LANGUAGE_MODULE, seed=4)
    randomize(model, lora.FULL_MODULE, seed=5)
    outputs = {}
    for name in (lora.LANGUAGE_MODULE, lora.FULL_MODULE, None, lora.LANGUAGE_MODULE):
        lora.set_adapter(model, name)
        outputs.setdefault(name, []).append(run(model, pixels))
    lang, full, base = outputs[lora.LANGUAGE_MODULE][0], outputs[lora.FULL_MODULE][0], outputs[None][0]
    assert np.abs(lang - full).max() > 0.05 and np.abs(lang - base).max() > 0.05
    np.testing.assert_array_equal(base, base_logits)  # None = the untouched base model
    np.testing.assert_array_equal(outputs[lora.LANGUAGE_MODULE][1], lang)  # switching back is exact
    for a, b in zip(before, base_params(model)):
        np.testing.assert_array_equal(a, b)


def test_language_adapter_leaves_the_projector_alone(config, pixels):
    """`language_module` has no projector targets: the projector runs as base while it is active."""
    model = with_both_adapters(config)
    randomize(model, lora.LANGUAGE_MODULE, seed=6)
    lora.set_adapter(model, lora.LANGUAGE_MODULE)
    assert model.mm_projector.readout["0"].active_adapter is None
    assert model.language_model.layers[1].mlp.down_proj.active_adapter == lora.LANGUAGE_MODULE
    feats = np.asarray(pixels[:4, :32])
    lora.set_adapter(model, None)
    base = np.asarray(model.mm_projector(feats))
    lora.set_adapter(model, lora.LANGUAGE_MODULE)
    np.testing.assert_array_equal(np.asarray(model.mm_projector(feats)), base)


def test_lora_state_and_filter_select_one_adapter(config):
    model = with_both_adapters(config)
    state = lora.lora_state(model, lora.LANGUAGE_MODULE)
    paths = [tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(state)]
    assert len(paths) == 2 * 7 * config.text.num_hidden_layers
    assert all(p[-3:-1] == ("adapters", lora.LANGUAGE_MODULE) and p[-1] in ("lora_a", "lora_b") for p in paths)
    assert len(jax.tree.leaves(nnx.state(model, lora.lora_filter(lora.FULL_MODULE)))) == 2 * (7 * 2 + 2)


def test_training_gradients_reach_only_the_selected_adapter(config, pixels):
    """With B = 0 (PEFT init) the loss gradient reaches B but not A, and no other parameter is differentiated."""
    model = with_both_adapters(config)
    lora.set_adapter(model, lora.FULL_MODULE)
    layout = VisualLayout.from_arrays(GRID, MERGE)

    def loss(m):
        return m.forward(jnp.asarray(IDS), pixel_values=jnp.asarray(pixels), layout=layout).logits.mean()

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.lora_filter(lora.FULL_MODULE))))(model)
    flat = {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    assert len(flat) == 2 * (7 * config.text.num_hidden_layers + 2)
    assert all(path[-2] == lora.FULL_MODULE for path in flat)
    assert all(not g.any() for path, g in flat.items() if path[-1] == "lora_a")
    assert all(g.any() for path, g in flat.items() if path[-1] == "lora_b")


def test_merge_into_bf16_base_is_computed_in_fp32(config):
    model = VideoLlama3(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    lora.add_adapter(model, lora.FULL_MODULE, lora.full_module_spec(config))
    randomize(model, lora.FULL_MODULE, seed=12)
    linear = model.mm_projector.readout["2"]
    a, b = (np.asarray(v[...], np.float64) for v in (linear.adapters[lora.FULL_MODULE].lora_a,
                                                     linear.adapters[lora.FULL_MODULE].lora_b))
    expected = np.asarray(linear.kernel[...], np.float64) + 2.0 * a @ b
    lora.merge_adapter(model, lora.FULL_MODULE)
    assert linear.kernel[...].dtype == jnp.bfloat16 and len(linear.adapters) == 0
    merged = np.asarray(linear.kernel[...], np.float64)
    # only the final rounding to bf16 (8-bit significand: at most 2^-8 relative) separates it from the exact sum
    assert (np.abs(merged - expected) <= 2.0 ** -8 * np.abs(expected) * 1.001).all()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward_with_dropout(graphdef, layout, state, pixels, key):
    with lora_dropout(key):
        return nnx.merge(graphdef, state).forward(jnp.asarray(IDS), pixel_values=pixels, layout=layout).logits


def _dropout_forward(model: VideoLlama3, pixels: np.ndarray):
    graphdef, state = nnx.split(model)
    layout = VisualLayout.from_arrays(GRID, MERGE)
    return lambda key: np.asarray(_forward_with_dropout(graphdef, layout, state, jnp.asarray(pixels), key))


def test_dropout_changes_output_deterministically_per_key(config, pixels, base_logits):
    model = with_both_adapters(config)
    lora.set_adapter(model, lora.FULL_MODULE)
    # B = 0: dropout acts on A's input only, so the base path is untouched even with dropout on
    np.testing.assert_array_equal(_dropout_forward(model, pixels)(jax.random.key(0)), base_logits)
    randomize(model, lora.FULL_MODULE, seed=7)
    forward = _dropout_forward(model, pixels)
    plain = run(model, pixels)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    out1 = forward(k1)
    assert np.abs(out1 - plain).max() > 1e-3
    np.testing.assert_array_equal(forward(k1), out1)
    assert np.abs(forward(k2) - out1).max() > 1e-3
    # a key captured as a constant by a trace would freeze the masks: the layer refuses it ...
    graphdef, state = nnx.split(model)

    @jax.jit
    def captured(state):
        return nnx.merge(graphdef, state).forward(jnp.asarray([[7, 8, 9]])).logits

    with pytest.raises(ValueError, match="must be an argument of the jitted function"):
        with lora_dropout(k1):
            captured(state)
    # ... and the eager API (whose jit cannot take the key) refuses any active key up front
    with pytest.raises(RuntimeError, match="lora_dropout is only honoured"):
        with lora_dropout(k1):
            model(np.asarray([[7, 8, 9]]))


# ---------------------------------------------------------------------------------------------- adapter files
def test_save_load_round_trip_is_bit_identical(config, pixels, tmp_path):
    model = with_both_adapters(config)
    randomize(model, lora.FULL_MODULE, seed=8)
    lora.set_adapter(model, lora.FULL_MODULE)
    expected = run(model, pixels)
    target = tmp_path / "adapters" / "full"
    adapter_io.save_adapter(model, lora.FULL_MODULE, target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_meta.json", "lora"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    meta = json.loads((target / "adapter_meta.json").read_text())
    assert {k: meta[k] for k in ("name", "r", "alpha", "dropout")} == {"name": "full_module", "r": 8, "alpha": 16.0,
                                                                        "dropout": 0.1}
    assert meta["target_modules"] == list(lora.full_module_spec(config).target_modules)
    assert meta["base_fingerprint"] == config.fingerprint() and meta["created_by"].startswith("cogstream_jax")

    fresh = new_model(config)
    assert adapter_io.load_adapter(fresh, target) == lora.FULL_MODULE
    saved, loaded = lora.adapter_tensors(model, lora.FULL_MODULE), lora.adapter_tensors(fresh, lora.FULL_MODULE)
    assert saved.keys() == loaded.keys()
    for hf in saved:
        for a, b in zip(saved[hf], loaded[hf]):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    lora.set_adapter(fresh, lora.FULL_MODULE)
    np.testing.assert_array_equal(run(fresh, pixels), expected)
    with pytest.raises(UserError, match="already holds an adapter named 'full_module'"):
        adapter_io.load_adapter(fresh, target)

    # the model-free reader and writer see the same tensors
    meta, on_disk = adapter_io.read_adapter_tensors(target)
    assert meta.name == lora.FULL_MODULE and meta.spec == lora.full_module_spec(config)
    assert on_disk.keys() == saved.keys()
    for hf in saved:
        for a, b in zip(saved[hf], on_disk[hf]):
            assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    doubled = {hf: (a, 2 * b) for hf, (a, b) in on_disk.items()}
    adapter_io.write_adapter_dir(tmp_path / "written", meta, doubled)
    adapter_io.load_adapter(fresh, tmp_path / "written", name="doubled")
    np.testing.assert_array_equal(lora.adapter_tensors(fresh, "doubled")["model.mm_projector.readout.0"][1],
                                  doubled["model.mm_projector.readout.0"][1])

    # saving again replaces the directory; loading under another name keeps both
    randomize(model, lora.FULL_MODULE, seed=9)
    adapter_io.save_adapter(model, lora.FULL_MODULE, target)
    assert adapter_io.load_adapter(fresh, target, name="full_v2") == "full_v2"
    assert lora.adapter_names(fresh) == ("doubled", "full_module", "full_v2")
    np.testing.assert_array_equal(lora.adapter_tensors(fresh, "full_v2")["model.layers.0.self_attn.q_proj"][1],
                                  lora.adapter_tensors(model, lora.FULL_MODULE)["model.layers.0.self_attn.q_proj"][1])


@pytest.fixture(scope="module")
def saved_adapter(config, tmp_path_factory):
    model = with_both_adapters(config)
    path = tmp_path_factory.mktemp("lora") / "language"
    adapter_io.save_adapter(model, lora.LANGUAGE_MODULE, path)
    return path


def test_loading_onto_another_base_raises(config, saved_adapter):
    other = ModelConfig.from_hf_config(tiny_hf_config(layers=3).to_dict())
    model = new_model(other)
    with pytest.raises(UserError, match="base_fingerprint.*another base") as err:
        adapter_io.load_adapter(model, saved_adapter)
    assert "adapter_meta.json" in str(err.value)
    assert lora.adapter_names(model) == ()


def test_failed_rename_raises_and_leaves_the_old_adapter(config, saved_adapter, tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    shutil.copytree(saved_adapter, target)
    before = (target / "adapter_meta.json").read_bytes()

    def refuse(new, old):
        raise PermissionError(f"{old}: read-only file system")

    monkeypatch.setattr(adapter_io, "_replace_dir", refuse)
    with pytest.raises(PermissionError, match="read-only"):
        adapter_io.save_adapter(with_both_adapters(config), lora.FULL_MODULE, target)
    assert (target / "adapter_meta.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left behind


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


@pytest.mark.parametrize("case,fragment", [
    ("no_dir", "does not exist"),
    ("no_meta", "missing adapter metadata file"),
    ("bad_json", "unreadable JSON"),
    ("missing_field", "missing field\\(s\\) base_fingerprint"),
    ("bad_rank", "LoraSpec.r"),
    ("no_tensors", "missing LoRA tensor checkpoint"),
    ("other_targets", "do not match adapter_meta.json"),
])
def test_broken_adapter_directories_raise_clearly(config, saved_adapter, tmp_path, case, fragment):
    def meta_edit(**changes):
        def edit(d):
            meta = json.loads((d / "adapter_meta.json").read_text())
            meta.update(changes)
            for key in [k for k, v in changes.items() if v is None]:
                del meta[key]
            (d / "adapter_meta.json").write_text(json.dumps(meta))
        return edit

    edits = {
        "no_dir": None,
        "no_meta": lambda d: (d / "adapter_meta.json").unlink(),
        "bad_json": lambda d: (d / "adapter_meta.json").write_text("{not json"),
        "missing_field": meta_edit(base_fingerprint=None),
        "bad_rank": meta_edit(r=-1),
        "no_tensors": lambda d: shutil.rmtree(d / "lora"),
        "other_targets": meta_edit(target_modules=["model.layers.{i}.self_attn.q_proj",
                                                   "model.mm_projector.readout.0"]),
    }
    path = tmp_path / "missing" if edits[case] is None else _broken_copy(saved_adapter, tmp_path / case, edits[case])
    model = new_model(config)
    with pytest.raises(UserError, match=fragment) as err:
        adapter_io.load_adapter(model, path)
    assert str(path) in str(err.value)
    assert lora.adapter_names(model) == ()  # a failed load leaves nothing behind


def test_save_refuses_to_replace_a_foreign_directory(config, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an adapter directory"):
        adapter_io.save_adapter(with_both_adapters(config), lora.FULL_MODULE, tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- sharding
def test_adapters_on_a_sharded_model(config, pixels, saved_adapter, tmp_path):
    from cogstream_jax.sharding import make_mesh, shard_model

    model = with_both_adapters(config)
    randomize(model, lora.FULL_MODULE, seed=10)
    lora.set_adapter(model, lora.FULL_MODULE)
    expected = run(model, pixels)

    sharded = new_model(config)
    shard_model(sharded, make_mesh("data=2,fsdp=2,tensor=2"))
    lora.add_adapter(sharded, lora.FULL_MODULE, lora.full_module_spec(config))
    lora.set_adapter_tensors(sharded, lora.FULL_MODULE, lora.adapter_tensors(model, lora.FULL_MODULE))
    adapter_io.load_adapter(sharded, saved_adapter)
    a = sharded.language_model.layers[0].self_attn.q_proj.adapters[lora.LANGUAGE_MODULE].lora_a[...]
    assert len(a.sharding.device_set) == 8
    lora.set_adapter(sharded, lora.FULL_MODULE)
    assert np.abs(run(sharded, pixels) - expected).max() <= 1e-5

    # saved from the mesh, restored onto a single-device model: same tensors
    adapter_io.save_adapter(sharded, lora.FULL_MODULE, tmp_path / "from_mesh")
    single = new_model(config)
    adapter_io.load_adapter(single, tmp_path / "from_mesh")
    for hf, pair in lora.adapter_tensors(model, lora.FULL_MODULE).items():
        for a, b in zip(pair, lora.adapter_tensors(single, lora.FULL_MODULE)[hf]):
            np.testing.assert_array_equal(a, b)

    # merging on the mesh keeps each kernel's sharding and the adapter's output
    kernel = sharded.mm_projector.readout["0"].kernel
    kernel_sharding = kernel[...].sharding
    lora.merge_adapter(sharded, lora.FULL_MODULE)
    assert kernel[...].sharding == kernel_sharding
    assert np.abs(run(sharded, pixels) - expected).max() <= 1e-5


# ---------------------------------------------------------------------------------------------- PEFT parity
def test_matches_peft_lora_on_transformers_videollama3(pixels):
    peft = pytest.importorskip("peft")
    torch_model = build_torch_model(tiny_hf_config(), seed=3)
    ours = to_jax(torch_model)  # base weights copied before PEFT injects its layers
    config = ours.config
    spec = lora.full_module_spec(config)
    native = list(lora.resolve_targets(config, spec, "native").values())
    assert set(native) == {hf_module_for_our_path(config, "native")[p] for p in lora.resolve_targets(config, spec)}
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=native))
    peft_model.eval()

    g = torch.Generator().manual_seed(0)
    tensors = {}
    with torch.no_grad():
        for module in native:
            layer = peft_model.base_model.model.get_submodule(module)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(0.2 * torch.randn(a.shape, generator=g))
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
            tensors[module] = (a.numpy().T, b.numpy().T)  # A_ours = lora_A.weight.T, B_ours = lora_B.weight.T
    assert len(tensors) == 7 * config.text.num_hidden_layers + 2

    kwargs = dict(input_ids=IDS, pixel_values=pixels, image_grid_thw=GRID, image_merge_sizes=MERGE)
    ref = torch_logits(peft_model, **kwargs)
    with peft_model.disable_adapter():
        ref_base = torch_logits(peft_model, **kwargs)
    assert np.abs(ref - ref_base).max() > 0.05

    lora.add_adapter(ours, lora.FULL_MODULE, spec)
    lora.set_adapter_tensors(ours, lora.FULL_MODULE, tensors, layout="native")
    lora.set_adapter(ours, lora.FULL_MODULE)
    assert np.abs(run(ours, pixels) - ref).max() <= 1e-4
    # and back out: PEFT's state dict is our tensors transposed under base_model.model.<native name>
    peft_state = {k: v.numpy() for k, v in peft_model.state_dict().items() if ".lora_" in k}
    exported = lora.adapter_tensors(ours, lora.FULL_MODULE, layout="native")
    assert len(peft_state) == 2 * len(exported)
    for module, (a, b) in exported.items():
        np.testing.assert_array_equal(peft_state[f"base_model.model.{module}.lora_A.default.weight"], a.T)
        np.testing.assert_array_equal(peft_state[f"base_model.model.{module}.lora_B.default.weight"], b.T)
