"""Read the processor's settings (`preprocessor_config.json`, `processor_config.json`) and the Qwen2 tokenizer
from a local checkpoint folder, with errors that name the file and field."""
from __future__ import annotations

import json
import pathlib
import warnings
from dataclasses import dataclass, field
from typing import Any

from cogstream_jax.data.image import IMAGE_MERGE_SIZE, PATCH_SIZE, VIDEO_MERGE_SIZE, ImageConfig
from cogstream_jax.errors import ConfigError

# A Qwen2 tokenizer folder needs its config plus either tokenizer.json or the vocab.json + merges.txt pair.
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
#: every file the tokenizer may read (copied to a local folder when the checkpoint folder is a URL)
TOKENIZER_FILES = (TOKENIZER_CONFIG, "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.json", "chat_template.jinja")


@dataclass(frozen=True)
class ProcessorSettings:
    """Processor defaults (the official `processor_config.json`; CogStream items override max_frames)."""

    fps: float = 1
    max_frames: int | None = 128
    image_merge_size: int = IMAGE_MERGE_SIZE
    video_merge_size: int = VIDEO_MERGE_SIZE
    image: ImageConfig = field(default_factory=ImageConfig)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _field(data: dict[str, Any], key: str, kind, default, path: pathlib.Path):
    value = data.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is not None and not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{path}: field '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _triple(data: dict[str, Any], key: str, default: tuple[float, float, float], path: pathlib.Path):
    value = data.get(key, list(default))
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise ConfigError(f"{path}: field '{key}' must be a list of 3 numbers, got {value!r}")
    return tuple(float(v) for v in value)


def load_settings(directory) -> ProcessorSettings:
    """Settings from the folder's JSON files; absent files give the VideoLLaMA3 defaults."""
    pre_path = directory / "preprocessor_config.json"
    proc_path = directory / "processor_config.json"
    pre, proc = _read_json(pre_path), _read_json(proc_path)
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if pre.get(flag, True) is not True:
            raise ConfigError(f"{pre_path}: field '{flag}' = {pre[flag]!r} is not supported (must be true)")
    defaults = ImageConfig()
    image = ImageConfig(
        patch_size=_field(pre, "patch_size", int, PATCH_SIZE, pre_path),
        min_tokens=_field(pre, "min_tokens", int, defaults.min_tokens, pre_path),
        max_tokens=_field(pre, "max_tokens", int, defaults.max_tokens, pre_path),
        rescale_factor=_field(pre, "rescale_factor", float, defaults.rescale_factor, pre_path),
        image_mean=_triple(pre, "image_mean", defaults.image_mean, pre_path),
        image_std=_triple(pre, "image_std", defaults.image_std, pre_path),
        resample=_field(pre, "resample", int, int(defaults.resample), pre_path),
    )
    return ProcessorSettings(
        fps=_field(proc, "fps", float, 1.0, proc_path),
        max_frames=_field(proc, "max_frames", int, 128, proc_path),
        image_merge_size=_field(proc, "image_merge_size", int, IMAGE_MERGE_SIZE, proc_path),
        video_merge_size=_field(proc, "video_merge_size", int, VIDEO_MERGE_SIZE, proc_path),
        image=image,
    )


def load_tokenizer(directory):
    """The Qwen2 tokenizer of a VideoLLaMA3 folder, from local files only.

    `Qwen2Tokenizer` is named directly: `AutoTokenizer` would read the checkpoint's config.json, whose custom
    `videollama3_qwen2` type makes transformers warn (or, without `trust_remote_code=False`, prompt).
    """
    from cogstream_jax import remote
    from cogstream_jax.io_utils import as_path

    directory = as_path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: tokenizer folder does not exist")
    if not (directory / TOKENIZER_CONFIG).is_file():
        raise ConfigError(f"{directory}: missing tokenizer file {TOKENIZER_CONFIG}")
    if not any(all((directory / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        missing = [name for name in TOKENIZER_FILE_SETS[1] if not (directory / name).is_file()]
        raise ConfigError(f"{directory}: missing tokenizer file(s) {', '.join(missing)} (or tokenizer.json)")
    try:
        from transformers import Qwen2Tokenizer
    except ImportError:  # pragma: no cover - transformers is a pinned dependency
        raise ConfigError(f"{directory}: loading the tokenizer needs the 'transformers' package") from None
    try:
        with warnings.catch_warnings():  # transformers warns about the checkpoint's config.json, not the tokenizer
            warnings.simplefilter("ignore", FutureWarning)
            local = remote.local_folder(str(directory), TOKENIZER_FILES)  # transformers reads local files only
            return Qwen2Tokenizer.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{directory}: the tokenizer files cannot be loaded ({exc})") from None
