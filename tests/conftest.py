"""Shared test setup: 8 fake CPU devices, quick XLA compiles (xla_env.py), a persistent compilation cache, and
the longest test files first.

Both must be configured before JAX initialises its backends, so they live at the top of conftest.
"""
import os

from xla_env import xla_flags  # noqa: E402  (tests/ is on sys.path)

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# every program is cached, however quick to compile: the suite starts dozens of CLI processes that compile the same
# small programs (weight initialisers, slices, optimiser pieces) again and again
_MIN_COMPILE_S = float(os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"))
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"),
)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_S)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pathlib  # noqa: E402

import pytest  # noqa: E402

pytest_plugins = ("gcs_server",)  # the `gcs` fixture (a local Cloud Storage emulator) for the object-store tests

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE_DIR = SHARED / "reference" / "videollama3-7b"
PROMPTS_DIR = SHARED / "reference" / "cogstream-prompts"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    """The real VideoLLaMA3-7B tokenizer/config folder (no weights)."""
    return REFERENCE_DIR


#: test files by wall time in a `--durations` run on our 2-core machine, longest first: `make test`'s workers
#: (`-n 2 --dist loadfile`) take them in this order, so no long file is left running alone at the end
LONGEST_FIRST = (
    "test_compile_check.py", "test_remote_paths.py", "test_train_cli.py", "test_train_remat.py",
    "test_train_learning.py", "test_train_stage2_multihost.py", "test_train_multihost.py",
    "test_train_stage2_buckets.py", "test_eval_answer_generate.py", "test_demo.py", "test_eval_devices.py",
    "test_train_sharding.py", "test_distributed_startup.py", "test_train_step.py", "test_scan_layers.py",
    "test_fused_attention.py", "test_inference_events.py", "test_attention_and_decoding.py", "test_lora.py",
    "test_remote_eval.py", "test_inference_prefix_cache.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's file scheduler hands out the files with the most tests first; ours, the longest first."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    class LongestFileFirst(LoadFileScheduling):
        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "_ranked", False):
                order = lambda item: rank.get(item[0].rsplit("/", 1)[-1], len(rank))  # noqa: E731
                ranked = sorted(self.workqueue.items(), key=order)
                self.workqueue.clear()
                self.workqueue.update(ranked)
                self._ranked = True
            super()._assign_work_unit(node)

    return LongestFileFirst(config, log)
