"""scanrestore's image pipeline: decode with metadata, run a chain of stages, encode.

Pure image work: nothing here knows about folders, queues, databases or schedules.
"""

from pipeline.chain import Chain, ChainConfigError, ChainResult, StageRecord, build_chain
from pipeline.image import Image, Metadata, decode, encode
from pipeline.models import ModelSpec, ModelStore
from pipeline.stage import Stage, StageContext, StageOptions, StageResult
from pipeline.stages import STAGES

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
