"""Model configuration: frozen dataclasses, both HF config.json layouts, and presets.

Two on-disk layouts exist for the same network (spec videollama3.md 0 and 7):
- "original": VideoLLaMA3's custom code (`model_type` "videollama3_qwen2"), LLM fields at the top level and a
  `vision_encoder_config` dict; this is what CogStream ships.
- "native": transformers' `video_llama_3` (`vision_config` / `text_config`).
`ModelConfig.from_hf_config` reads either; `to_hf_config(layout)` writes either.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Literal

from cogstream_jax.errors import ConfigError
from cogstream_jax.io_utils import read_config_json

Layout = Literal["original", "native"]

IMAGE_TOKEN_ID = 151665
BOS_TOKEN_ID = 151643
EOS_TOKEN_ID = 151645


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP-NaViT vision tower (no absolute positions, 2-D RoPE, per-frame attention)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder (GQA, q/k/v bias, untied lm_head)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """VideoLLaMA3 = vision tower + mlp2x_gelu projector + Qwen2.

    `image_token_id` is the placeholder CogReasoner uses for both images and video frames; `video_token_id`
    may differ (transformers' native model uses two ids), both are filled in order of appearance.
    """

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = IMAGE_TOKEN_ID
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    use_token_compression: bool = True

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """The config's image / video ids plus CogReasoner's `<image>` (151665), which our processor writes for
        every frame: a transformers-native config names 151655 / 151656 instead, and without this its visual
        features would silently find no slot in CogReasoner prompts."""
        ids = {self.image_token_id, self.video_token_id}
        if IMAGE_TOKEN_ID < self.text.vocab_size:
            ids.add(IMAGE_TOKEN_ID)
        return tuple(sorted(ids))

    def fingerprint(self) -> str:
        """Stable hash of the weight-bearing architecture: adapters record it and refuse another base.

        Token ids are left out on purpose: the same checkpoint read from the original layout (one placeholder id)
        and from the native layout (separate image / video ids) must accept the same adapters.
        """
        arch = {"vision": dataclasses.asdict(self.vision), "text": dataclasses.asdict(self.text),
                "projector_type": self.projector_type}
        blob = json.dumps(arch, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ HF config I/O
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | os.PathLike, *, source: str = "config") -> "ModelConfig":
        """Build from a config.json dict (or a path to it / its folder) of either layout."""
        if not isinstance(config, dict):
            config, source = read_config_json(config, "config.json")
        model_type = config.get("model_type")
        if model_type == "videollama3_qwen2":
            return cls._from_original(config, source)
        if model_type == "video_llama_3":
            return cls._from_native(config, source)
        raise ConfigError(
            f"{source}: unsupported model_type {model_type!r}; expected 'videollama3_qwen2' (original "
            "VideoLLaMA3 layout) or 'video_llama_3' (transformers-native layout)"
        )

    @classmethod
    def _from_original(cls, c: dict[str, Any], source: str) -> "ModelConfig":
        v = c.get("vision_encoder_config") or {}
        if not isinstance(v, dict):
            raise ConfigError(f"{source}: field 'vision_encoder_config' must be an object")
        projector = c.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise ConfigError(f"{source}: field 'mm_projector_type' is {projector!r}; only 'mlp2x_gelu' is supported")
        image_token = int(c.get("image_token_index", IMAGE_TOKEN_ID))
        return cls(
            vision=_vision_from_dict(v),
            text=_text_from_dict(c, source),
            projector_type=projector,
            image_token_id=image_token,
            video_token_id=image_token,
            bos_token_id=int(c.get("bos_token_id", BOS_TOKEN_ID)),
            eos_token_id=int(c.get("eos_token_id", EOS_TOKEN_ID)),
            use_token_compression=bool(c.get("use_token_compression", True)),
        )

    @classmethod
    def _from_native(cls, c: dict[str, Any], source: str) -> "ModelConfig":
        t = c.get("text_config") or {}
        v = c.get("vision_config") or {}
        if t.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(f"{source}: text_config.model_type {t.get('model_type')!r} is not 'qwen2'")
        vision = _vision_from_dict(v)
        rope = v.get("rope_parameters") or {}
        if "rope_theta" in rope:
            vision = dataclasses.replace(vision, rope_theta=float(rope["rope_theta"]))
        return cls(
            vision=vision,
            text=_text_from_dict(t, source + ":text_config"),
            image_token_id=int(c.get("image_token_id", IMAGE_TOKEN_ID)),
            video_token_id=int(c.get("video_token_id", c.get("image_token_id", IMAGE_TOKEN_ID))),
            bos_token_id=int(t.get("bos_token_id") or BOS_TOKEN_ID),
            eos_token_id=int(t.get("eos_token_id") or EOS_TOKEN_ID),
            use_token_compression=bool(c.get("use_token_compression", True)),
        )

    def to_hf_config(self, layout: Layout = "original") -> dict[str, Any]:
        """A config.json dict that the original code or transformers' native class can load."""
        t, v = self.text, self.vision
        text = {
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        vision = {
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps,
        }
        if layout == "original":
            return {
                "architectures": ["Videollama3Qwen2ForCausalLM"],
                "model_type": "videollama3_qwen2",
                **text,
                "rope_theta": t.rope_theta,
                "rope_scaling": None,
                "use_sliding_window": False,
                "sliding_window": None,
                "attention_dropout": 0.0,
                "mm_projector_type": self.projector_type,
                "image_token_index": self.image_token_id,
                "use_token_compression": self.use_token_compression,
                "vision_encoder": None,
                "vision_encoder_config": {"model_type": "videollama3_vision_encoder", **vision},
                "torch_dtype": "bfloat16",
            }
        if layout == "native":
            return {
                "architectures": ["VideoLlama3ForConditionalGeneration"],
                "model_type": "video_llama_3",
                "text_config": {
                    "model_type": "qwen2",
                    **text,
                    "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                    "use_sliding_window": False,
                },
                "vision_config": {
                    "model_type": "video_llama_3_vision",
                    **vision,
                    "hidden_act": "gelu_pytorch_tanh",
                    "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
                },
                "image_token_id": self.image_token_id,
                "video_token_id": self.video_token_id,
                "tie_word_embeddings": t.tie_word_embeddings,
                "use_token_compression": self.use_token_compression,
            }
        raise ConfigError(f"unknown layout {layout!r}; expected 'original' or 'native'")


def _vision_from_dict(v: dict[str, Any]) -> VisionConfig:
    d = VisionConfig()
    return VisionConfig(
        hidden_size=int(v.get("hidden_size", d.hidden_size)),
        intermediate_size=int(v.get("intermediate_size", d.intermediate_size)),
        num_hidden_layers=int(v.get("num_hidden_layers", d.num_hidden_layers)),
        num_attention_heads=int(v.get("num_attention_heads", d.num_attention_heads)),
        patch_size=int(v.get("patch_size", d.patch_size)),
        num_channels=int(v.get("num_channels", d.num_channels)),
        layer_norm_eps=float(v.get("layer_norm_eps", d.layer_norm_eps)),
        rope_theta=float(v.get("rope_theta", d.rope_theta)),
    )


def _text_from_dict(c: dict[str, Any], source: str) -> TextConfig:
    try:
        hidden = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        rope = c.get("rope_parameters") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        if c.get("use_sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention is not supported")
        return TextConfig(
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(c.get("num_key_value_heads", heads)),
            head_dim=int(c.get("head_dim") or hidden // heads),
            rope_theta=float(theta),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(c.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None


# ---------------------------------------------------------------------- presets
def videollama3_7b() -> ModelConfig:
    """The VideoLLaMA3-7B / CogReasoner backbone (spec section 0)."""
    return ModelConfig()


def tiny(vocab_size: int = 152064) -> ModelConfig:
    """A few-MB random model with the real vocabulary and token ids, for tests and `make demo`.

    Dimensions are divisible by 8 so every mesh of 8 fake devices can shard them.
    """
    return ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            max_position_embeddings=32768,
        ),
    )


def bench() -> ModelConfig:
    """The benchmark configuration of the issues (LLM 896/8 layers/14 heads/2 kv heads, vision 6 layers)."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12),
        text=TextConfig(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=8,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
        ),
    )


PRESETS = {"videollama3_7b": videollama3_7b, "tiny": tiny, "bench": bench}
