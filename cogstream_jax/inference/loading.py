"""Model + processor + sampling defaults for inference, from a checkpoint folder (local or an object-store URL
such as gs://bucket/model: file checks go through `remote`, which keeps URLs as URLs) or the literal `tiny`."""
from __future__ import annotations

import os

from cogstream_jax import remote
from cogstream_jax.data.processor import Processor
from cogstream_jax.errors import WeightError
from cogstream_jax.model.sampling import SamplingConfig
from cogstream_jax.reference_files import bundled_model_dir

TINY = "tiny"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def tiny_model(seed: int = 0, dtype: str = "float32"):
    """A random tiny VideoLLaMA3 with the real vocabulary (the `make demo` / test model)."""
    from flax import nnx

    from cogstream_jax.config import tiny
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.weights.loader import resolve_dtype

    param_dtype = resolve_dtype(dtype)
    return VideoLlama3(tiny(), rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=param_dtype)


def _check_folder(model_path: str) -> None:
    if not remote.isdir(model_path):
        raise WeightError(f"{model_path}: model folder not found (or pass the literal 'tiny')")


def weight_bytes(model_path: str, dtype: str = "float32") -> int:
    """Bytes of the model's weights in `dtype`, from its config alone (nothing is read or allocated)."""
    from flax import nnx

    from cogstream_jax.compile_log import tree_bytes
    from cogstream_jax.config import ModelConfig, tiny
    from cogstream_jax.weights.loader import abstract_model, resolve_dtype

    if model_path == TINY:
        config = tiny()
    else:
        _check_folder(model_path)
        config = ModelConfig.from_hf_config(model_path)
    param_dtype = resolve_dtype(dtype)
    return tree_bytes(nnx.state(abstract_model(config, param_dtype, param_dtype)))


def load_model_and_processor(model_path: str, dtype: str = "float32", decode_threads: int | None = None,
                             mesh=None):
    """(model, processor, sampling defaults). Tokenizer/processor/generation configs come from the folder when it
    has them, else from the bundled VideoLLaMA3 files (same tokenizer for every CogReasoner checkpoint).
    `decode_threads`: the processor's video threads (None: the usable cores, at most 8). `mesh`: each weight goes
    straight to its place on the mesh as it is read (a model too large for one device never lands on one)."""
    if model_path == TINY:
        directory = bundled_model_dir()
        model = tiny_model(dtype=dtype)
        if mesh is not None:
            from cogstream_jax.sharding import shard_model

            shard_model(model, mesh)
    else:
        _check_folder(model_path)
        from cogstream_jax.weights.loader import load_pretrained

        model = load_pretrained(model_path, dtype=dtype, mesh=mesh)
        has_tokenizer = all(remote.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES)
        directory = model_path if has_tokenizer else bundled_model_dir()
    # the checkpoint's own generation_config.json wins even when its tokenizer files are missing
    candidates = [os.path.join(d, "generation_config.json") for d in (model_path, directory) if d != TINY]
    generation = next((c for c in candidates if remote.isfile(c)), None)
    sampling = SamplingConfig.from_generation_config(generation or bundled_model_dir())
    return model, Processor.from_pretrained(directory, threads=decode_threads), sampling
