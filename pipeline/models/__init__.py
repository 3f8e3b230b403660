"""Models: which weights scanrestore knows, where they live, how they are trusted and loaded.

Official weights are fetched from pinned URLs and checked against pinned SHA-256 hashes; any other
file is imported as a custom model whose hash and detected architecture are recorded in the cache.
"""

from pipeline.models.registry import REGISTRY
from pipeline.models.spec import (
    Loader,
    ModelSpec,
    Origin,
    Purpose,
    ResolvedModel,
    build_registry,
)
from pipeline.models.store import (
    LoadedModel,
    ModelStore,
    VerifyResult,
    VerifyStatus,
    default_cache_dir,
)
from pipeline.models.trust import TrustedModels

__all__ = [
    "REGISTRY",
    "LoadedModel",
    "Loader",
    "ModelSpec",
    "ModelStore",
    "Origin",
    "Purpose",
    "ResolvedModel",
    "TrustedModels",
    "VerifyResult",
    "VerifyStatus",
    "build_registry",
    "default_cache_dir",
]
