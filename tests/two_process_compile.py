"""compile-check's stage-1 gradients compiled by two cooperating JAX processes (run by `multihost_helpers.launch`
as `python -m tests.two_process_compile FOLDER MAX_LENGTH GLOBAL_BATCH MESH`): the CPU analogue of a pod slice's
compile-only devices, whose ids are the slice's. Process 0 saves them with `compiled_store.save`."""
from __future__ import annotations

import sys

from cogstream_jax.training.distributed import DistributedConfig, maybe_initialize


def main(folder: str, max_length: int, global_batch: int, mesh_text: str) -> None:
    import jax

    from cogstream_jax import compiled_store
    from cogstream_jax.compilecheck import jobs, report
    from cogstream_jax.compilecheck.cli import stage1_lengths
    from cogstream_jax.config import tiny
    from cogstream_jax.sharding import make_mesh

    shape = jobs.JobShape(dtype="float32", global_batch_size=global_batch, max_length=max_length, seed=0,
                          length_buckets=stage1_lengths("all", max_length))
    programs = [p for p in jobs.stage1_programs(tiny(), shape, make_mesh(mesh_text)) if p.trains]
    with report.no_persistent_cache():
        reports = [report.compile_program(p) for p in programs]
    if jax.process_index() == 0:
        compiled_store.save(folder, reports)


if __name__ == "__main__":
    maybe_initialize(DistributedConfig.from_env())
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
