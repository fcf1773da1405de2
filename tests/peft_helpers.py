"""Shared pieces of the PEFT interop tests: fresh transformers bases (PEFT injects layers into the model it is
given, so every test wraps its own copy), non-zero random adapters, the official CogStream module list written
out from spec section 3 / the official training script, and running a CLI to get (exit code, stderr)."""
from __future__ import annotations

import numpy as np

from cogstream_jax import lora
from torch_reference import build_torch_model, tiny_hf_config, to_jax

SEED = 3
LLM_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")


def fresh_torch(seed: int = SEED, **config_kwargs):
    """A new tiny transformers VideoLlama3ForConditionalGeneration (same weights for the same seed)."""
    return build_torch_model(tiny_hf_config(**config_kwargs), seed=seed)


def fresh_ours(seed: int = SEED):
    return to_jax(fresh_torch(seed))


def official_targets(layers: int, projector: bool) -> list[str]:
    """The target_modules list CogStream's training scripts build (original layout), written out by hand."""
    names = [f"model.layers.{i}.{leaf}" for i in range(layers) for leaf in LLM_LEAVES]
    return names + (["model.mm_projector.readout.0", "model.mm_projector.readout.2"] if projector else [])


def to_native_by_hand(name: str) -> str:
    """Spec 7.2's prefix rename, independent of the code under test."""
    for original, native in (("model.mm_projector.", "model.projector."), ("model.", "model.language_model.")):
        if name.startswith(original):
            return native + name[len(original):]
    return name


def randomize(model, name: str, seed: int, std: float = 0.2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Non-zero A and B for adapter `name` (B = 0 would make the adapter a no-op); returns the tensors set."""
    rng = np.random.default_rng(seed)
    tensors = {hf: (std * rng.standard_normal(a.shape).astype(np.float32),
                    std * rng.standard_normal(b.shape).astype(np.float32))
               for hf, (a, b) in lora.adapter_tensors(model, name).items()}
    lora.set_adapter_tensors(model, name, tensors)
    return tensors


def with_random_adapters(model):
    """Both CogReasoner adapters, random and non-zero, on `model`."""
    config = model.config
    lora.add_adapter(model, lora.LANGUAGE_MODULE, lora.language_module_spec(config), seed=1)
    lora.add_adapter(model, lora.FULL_MODULE, lora.full_module_spec(config), seed=2)
    randomize(model, lora.LANGUAGE_MODULE, seed=10)
    randomize(model, lora.FULL_MODULE, seed=11)
    return model


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of a CLI `main(argv)`."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err
