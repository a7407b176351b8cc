"""What a dump's and a restore's runner both work with, handed over once by the facade."""

from __future__ import annotations

from dataclasses import dataclass

from llmux.service.core.authz import RestoredRegistry
from llmux.service.core.claims import Claims
from llmux.service.core.config import EngineConfig
from llmux.service.core.criu import CriuTool
from llmux.service.core.cuda import CudaCheckpointer
from llmux.service.core.store import CheckpointStore


@dataclass
class JobBase:
    """The engine's configuration, CRIU, the store, the CUDA checkpointer, the claims the
    jobs share and the registry of restored trees."""

    config: EngineConfig
    criu: CriuTool
    store: CheckpointStore
    cuda: CudaCheckpointer
    claims: Claims
    restored: RestoredRegistry
