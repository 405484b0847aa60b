"""Pipeline parallelism across processes: the parts both families' pipelines share.

    failures.py    PipelineError, StageError (rank, role, stage, session, block), FailSpec injection
    transport.py   non-blocking point-to-point sends/receives (NCCL data group, gloo meta group)
    rank.py        a rank's named stages and trace (RankContext, StageEvent)
    procs.py       spawning ranks on this machine, watching them, naming the root cause of a failure

The ranks themselves are the families': LiveTalk's step ranks + decode rank with a replicated clean
ring (runtime/families/livetalk/pipeline.py, docs/pipeline.md; `torchrun ... -m runtime.parallel`
runs it), Live Avatar's timestep-forcing ranks with one ring per step
(runtime/families/liveavatar/tpp*.py, docs/liveavatar.md).
"""
from .failures import FAIL_ENV, FailSpec, PipelineError, StageError
from .rank import RankContext, StageEvent

__all__ = ["FAIL_ENV", "FailSpec", "PipelineError", "RankContext", "StageError", "StageEvent"]
