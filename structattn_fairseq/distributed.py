"""Guard against a silent fairseq launch failure: ``torchrun`` started N processes, fairseq trains N independent
models (docs/distributed.md, "Training on several GPUs or machines").

fairseq 0.12 only joins ``torchrun``'s process group when ``--distributed-world-size`` is > 1, and its default is the
number of local GPUs. On a CPU machine, or on a machine with a single GPU in a multi-node job, the default is 1, so
every process started by ``torchrun`` trains alone on all the data: no error, identical logs, N times the compute
for one model's worth of progress. :func:`check_data_parallel_launch` turns that into an error with the fix.

No fairseq code is patched; the check only reads the environment that ``torchrun`` sets and torch.distributed's state.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

CPU_FLAGS = (
    "--cpu --distributed-backend gloo --ddp-backend legacy_ddp "
    "--distributed-init-method env:// --distributed-no-spawn --distributed-rank -1 --distributed-world-size {world}"
)


def check_data_parallel_launch(environ: Optional[Mapping[str, str]] = None) -> None:
    """Raise ``RuntimeError`` when this process was started by a launcher as one of ``WORLD_SIZE`` > 1 ranks but
    torch.distributed was not initialised, i.e. fairseq is about to train (or decode) as if it were alone.

    Call it once the model is being built (fairseq initialises torch.distributed before building the model).
    Does nothing for single-process runs, for fairseq's own process spawning (which sets no ``WORLD_SIZE``), and
    for correctly joined process groups.
    """
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return  # not a launcher's variable; nothing we can say
    if world <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    rank = env.get("RANK", "?")
    raise RuntimeError(
        f"this process is rank {rank} of WORLD_SIZE={world} (set by torchrun or another launcher), but fairseq did "
        "not join the process group: every process would train its own model on all the data. fairseq only joins "
        "when --distributed-world-size > 1, and its default is the number of local GPUs "
        f"(here {_local_gpus()}). Fix: on GPUs add --distributed-world-size {world}; on CPU processes add "
        + CPU_FLAGS.format(world=world)
        + ". See docs/distributed.md."
    )


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
