"""Config layouts and presets; host-side input validation with errors naming the tensor at fault."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cogstream_jax import config as configs
from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import ConfigError, InputError
from torch_reference import VIDEO_ID, random_pixels, reference_pair, tiny_hf_config


def test_real_7b_config_reads_as_the_preset(reference_dir):
    cfg = ModelConfig.from_hf_config(reference_dir)
    assert cfg == configs.videollama3_7b()
    assert cfg.text.head_dim == 128 and cfg.vision.head_dim == 72 and cfg.placeholder_ids == (151665,)


@pytest.mark.parametrize("layout", ["original", "native"])
def test_to_hf_config_round_trips(layout, tmp_path):
    for cfg in (configs.videollama3_7b(), configs.tiny(), configs.bench()):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg.to_hf_config(layout)))
        assert ModelConfig.from_hf_config(tmp_path) == cfg


def test_native_config_from_transformers():
    hf = tiny_hf_config(kv_heads=1)
    cfg = ModelConfig.from_hf_config(hf.to_dict())
    assert (cfg.text.num_key_value_heads, cfg.image_token_id, cfg.video_token_id) == (1, 150, 151)
    from transformers import VideoLlama3Config

    back = VideoLlama3Config(**{k: v for k, v in cfg.to_hf_config("native").items() if k != "model_type"})
    assert back.text_config.num_key_value_heads == 1 and back.vision_config.patch_size == 14


def test_cogreasoner_placeholder_fills_a_native_config_too():
    """A transformers-native config names 151655 / 151656; CogReasoner prompts write <image> (151665) for every
    frame, and its features must land in those slots exactly as with the config's own id."""
    import dataclasses

    from flax import nnx

    from cogstream_jax.data.tokens import IMAGE_TOKEN_ID
    from cogstream_jax.model.videollama3 import VideoLlama3

    native = dataclasses.replace(configs.tiny(), image_token_id=151655, video_token_id=151656)
    assert native.placeholder_ids == (151655, 151656, IMAGE_TOKEN_ID)
    model = VideoLlama3(native, rngs=nnx.Rngs(0))
    pix = random_pixels(96, 0)
    ours = model(np.asarray([[1, 2] + [IMAGE_TOKEN_ID] * 24 + [3]]), pix, [[4, 4, 6]], [2]).logits
    theirs = model(np.asarray([[1, 2] + [151656] * 24 + [3]]), pix, [[4, 4, 6]], [2]).logits
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-6)


def test_tiny_preset_keeps_real_vocabulary_and_divides_by_8():
    cfg = configs.tiny()
    assert cfg.text.vocab_size == 152064 and cfg.image_token_id == 151665
    for dim in (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.vision.hidden_size, cfg.vision.intermediate_size):
        assert dim % 8 == 0
    assert cfg.fingerprint() != configs.bench().fingerprint()


def test_config_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="config.json.*unsupported model_type 'llava'"):
        ModelConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "videollama3_qwen2", "hidden_size": 8, "num_attention_heads": 2}))
    with pytest.raises(ConfigError, match="missing field 'vocab_size'"):
        ModelConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_hf_config(tmp_path / "missing")


def test_pixel_rows_inconsistent_with_grid_sizes():
    _, jm = reference_pair()
    ids = np.asarray([[1] + [VIDEO_ID] * 24])
    with pytest.raises(InputError, match=r"pixel_values has 90 rows but grid_sizes .* 96 patches"):
        jm(ids, random_pixels(90, 0), [[4, 4, 6]], [2])
    with pytest.raises(InputError, match="not divisible by merge_sizes"):
        jm(ids, random_pixels(60, 0), [[4, 3, 5]], [2])
    with pytest.raises(InputError, match=r"pixel_values must be \[N, 588\]"):
        jm(ids, np.zeros((96, 3)), [[4, 4, 6]], [2])


def test_placeholder_count_must_equal_kept_features():
    _, jm = reference_pair()
    pix = random_pixels(96, 0)
    with pytest.raises(InputError, match="25 visual placeholders but there are 24 visual features"):
        jm(np.asarray([[1] + [VIDEO_ID] * 25]), pix, [[4, 4, 6]], [2])
    mask = np.ones(24, bool)
    mask[:4] = False
    with pytest.raises(InputError, match="24 visual placeholders but there are 20 kept visual features"):
        jm(np.asarray([[1] + [VIDEO_ID] * 24]), pix, [[4, 4, 6]], [2], compression_mask=mask)
    with pytest.raises(InputError, match="compression_mask has shape"):
        jm(np.asarray([[1] + [VIDEO_ID] * 24]), pix, [[4, 4, 6]], [2], compression_mask=np.ones(7, bool))
    with pytest.raises(InputError, match="no pixel_values"):
        jm(np.asarray([[1, VIDEO_ID]]))


def test_eager_entry_points_refuse_lora_dropout():
    import jax

    from cogstream_jax.model.layers import lora_dropout

    _, jm = reference_pair()
    with lora_dropout(jax.random.PRNGKey(0)), pytest.raises(RuntimeError, match="lora_dropout"):
        jm(np.asarray([[1, 2, 3]]))


def test_fingerprint_ignores_token_ids_but_not_shapes():
    import dataclasses

    base = configs.tiny()
    assert dataclasses.replace(base, video_token_id=151656).fingerprint() == base.fingerprint()
    other = dataclasses.replace(base, text=dataclasses.replace(base.text, num_key_value_heads=2))
    assert other.fingerprint() != base.fingerprint()
