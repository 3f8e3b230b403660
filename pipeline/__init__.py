"""scanrestore's image pipeline: decode with metadata, run a chain of stages, encode.

Pure image work: nothing here knows about folders, queues, databases or schedules. The public
names are imported when first used, so that `import pipeline.files` (hashing, durable writes)
does not load the stages and their neural-network libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.chain import Chain, ChainConfigError, ChainResult, StageRecord, build_chain
    from pipeline.image import Image, Metadata, decode, encode
    from pipeline.models import ModelSpec, ModelStore
    from pipeline.stage import Stage, StageContext, StageOptions, StageResult
    from pipeline.stages import STAGES

_HOMES = {
    "pipeline.chain": ("Chain", "ChainConfigError", "ChainResult", "StageRecord", "build_chain"),
    "pipeline.image": ("Image", "Metadata", "decode", "encode"),
    "pipeline.models": ("ModelSpec", "ModelStore"),
    "pipeline.stage": ("Stage", "StageContext", "StageOptions", "StageResult"),
    "pipeline.stages": ("STAGES",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "STAGES",
    "Chain",
    "ChainConfigError",
    "ChainResult",
    "Image",
    "Metadata",
    "ModelSpec",
    "ModelStore",
    "Stage",
    "StageContext",
    "StageOptions",
    "StageRecord",
    "StageResult",
    "build_chain",
    "decode",
    "encode",
]


def __getattr__(name: str) -> Any:
    home = _HOME_OF.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
