"""Checkpoint key tables kept as data and used in both directions (spec videollama3.md section 7).

One table lists every *module* of the network once, relative to its component, with a kind that says how its
tensors convert. Layout prefixes turn relative names into checkpoint names ("original" = VideoLLaMA3 /
CogStream, "native" = transformers `video_llama_3`) and into our NNX parameter paths. Import, export, merged
export and PEFT conversion all derive their mappings from here: there is no second table.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Literal

import numpy as np

from cogstream_jax.config import ModelConfig

Layout = Literal["original", "native"]
Kind = Literal["linear", "linear_nobias", "patch", "layernorm", "rmsnorm", "embed"]

#: checkpoint prefix of each component, per layout
HF_PREFIX: dict[str, dict[str, str]] = {
    "original": {"vision": "model.vision_encoder.", "projector": "model.mm_projector.", "llm": "model.", "head": ""},
    "native": {"vision": "model.vision_model.", "projector": "model.projector.", "llm": "model.language_model.",
               "head": ""},
}
#: our NNX path prefix of each component
OUR_PREFIX = {"vision": "vision_encoder.", "projector": "mm_projector.", "llm": "language_model.", "head": ""}

#: (component, relative module name with {i} for the layer index, kind)
VISION_LAYER = [
    ("layer_norm1", "layernorm"),
    ("self_attn.q_proj", "linear"),
    ("self_attn.k_proj", "linear"),
    ("self_attn.v_proj", "linear"),
    ("self_attn.out_proj", "linear"),
    ("layer_norm2", "layernorm"),
    ("mlp.fc1", "linear"),
    ("mlp.fc2", "linear"),
]
LLM_LAYER = [
    ("input_layernorm", "rmsnorm"),
    ("self_attn.q_proj", "linear"),
    ("self_attn.k_proj", "linear"),
    ("self_attn.v_proj", "linear"),
    ("self_attn.o_proj", "linear_nobias"),
    ("post_attention_layernorm", "rmsnorm"),
    ("mlp.gate_proj", "linear_nobias"),
    ("mlp.up_proj", "linear_nobias"),
    ("mlp.down_proj", "linear_nobias"),
]
#: tensor suffixes per kind: (checkpoint suffix, our leaf name)
TENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    "linear": (("weight", "kernel"), ("bias", "bias")),
    "linear_nobias": (("weight", "kernel"),),
    "patch": (("weight", "kernel"), ("bias", "bias")),
    "layernorm": (("weight", "scale"), ("bias", "bias")),
    "rmsnorm": (("weight", "weight"),),
    "embed": (("weight", "embedding"),),
}
#: the LLM modules LoRA targets by default (PEFT leaf names of the official recipes)
LLM_LORA_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    component: str
    rel: str
    kind: Kind

    def hf_module(self, layout: Layout) -> str:
        return HF_PREFIX[layout][self.component] + self.rel

    @property
    def our_module(self) -> str:
        return OUR_PREFIX[self.component] + self.rel


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    module: ModuleEntry
    hf_suffix: str
    our_leaf: str

    def hf_key(self, layout: Layout) -> str:
        return f"{self.module.hf_module(layout)}.{self.hf_suffix}"

    @property
    def our_path(self) -> tuple[str, ...]:
        return tuple(f"{self.module.our_module}.{self.our_leaf}".split("."))

    def to_ours(self, tensor: np.ndarray) -> np.ndarray:
        """Checkpoint layout -> ours (PyTorch Linear [out, in] -> kernel [in, out])."""
        if self.our_leaf != "kernel":
            return tensor
        if self.module.kind == "patch":
            return tensor.reshape(tensor.shape[0], -1).T
        return tensor.T

    def to_hf(self, value: np.ndarray, config: ModelConfig) -> np.ndarray:
        """Ours -> checkpoint layout (inverse of `to_ours`)."""
        if self.our_leaf != "kernel":
            return value
        if self.module.kind == "patch":
            v = config.vision
            return value.T.reshape(value.shape[1], v.num_channels, v.patch_size, v.patch_size)
        return value.T


def module_entries(config: ModelConfig) -> Iterator[ModuleEntry]:
    """Every module of the network, in checkpoint order."""
    yield ModuleEntry("vision", "embeddings.patch_embedding", "patch")
    for i in range(config.vision.num_hidden_layers):
        for rel, kind in VISION_LAYER:
            yield ModuleEntry("vision", f"encoder.layers.{i}.{rel}", kind)
    yield ModuleEntry("vision", "post_layernorm", "layernorm")
    yield ModuleEntry("projector", "readout.0", "linear")
    yield ModuleEntry("projector", "readout.2", "linear")
    yield ModuleEntry("llm", "embed_tokens", "embed")
    for i in range(config.text.num_hidden_layers):
        for rel, kind in LLM_LAYER:
            yield ModuleEntry("llm", f"layers.{i}.{rel}", kind)
    yield ModuleEntry("llm", "norm", "rmsnorm")
    yield ModuleEntry("head", "lm_head", "linear_nobias")


def tensor_entries(config: ModelConfig) -> Iterator[TensorEntry]:
    for module in module_entries(config):
        for hf_suffix, leaf in TENSORS[module.kind]:
            yield TensorEntry(module, hf_suffix, leaf)


def hf_key_table(config: ModelConfig, layout: Layout) -> dict[str, TensorEntry]:
    """Checkpoint key -> entry, for one layout."""
    return {e.hf_key(layout): e for e in tensor_entries(config)}


def detect_layout(keys) -> Layout:
    """Which layout a set of checkpoint keys uses (by the vision prefix)."""
    keys = list(keys)
    if any(k.startswith("model.vision_model.") or k.startswith("model.language_model.") for k in keys):
        return "native"
    return "original"


def hf_module_for_our_path(config: ModelConfig, layout: Layout) -> dict[str, str]:
    """Our module path -> checkpoint module name (for LoRA / PEFT conversion)."""
    return {m.our_module: m.hf_module(layout) for m in module_entries(config)}
