"""The recipes a running daemon makes outputs with: its own preset's, and any other preset's a job
was queued under (`scanrestore reprocess --preset`, the review page's "reprocess with another
preset"). Each is built once, with its models verified (every file hashed before its first image)
and their licences checked, exactly as the daemon's own at start."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from daemon.config import Config, model_store
from daemon.processing import recipe_of
from daemon.store import Store
from pipeline.errors import HashMismatchError

__all__ = ["ChainChoice", "RecipeBook", "RecipeError", "prepare_models"]

log = logging.getLogger("scanrestore.recipes")


class RecipeError(Exception):
    """A preset's chain cannot run here (a model missing, altered or under a licence the config
    does not allow); the message names the preset and the model."""


@dataclass(frozen=True)
class ChainChoice:
    """Which chain a worker builds for a task (plain data: it pickles to the worker). `preset`
    is the recipe's (None: the pipeline's stages); `models` maps each model reference to the
    SHA-256 its file must have as it loads."""

    preset: str | None
    models: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A recipe the daemon can run: its hash and what a worker needs to build its chain."""

    sha256: str
    choice: ChainChoice


def prepare_models(config: Config, preset: str | None):
    """The chain of `preset` and its models, each file hashed once and its licence checked."""
    chain = config.chain(preset)
    try:
        models = chain.prepare_models(model_store(config))
    except HashMismatchError as exc:
        raise RecipeError(
            f"{exc}; the file was altered or cut short: fetch or import it again"
        ) from exc
    name = preset or config.pipeline.preset
    chain.check_licences(
        models,
        config.models.allowed_licences,
        path=f"presets.{name}" if name else "pipeline.stages",
    )
    return chain, models


class RecipeBook:
    """The daemon's own recipe and the other presets' it met in the queue, by recipe hash."""

    def __init__(self, config: Config, store: Store, own: Recipe) -> None:
        self.config = config
        self.store = store
        self.own = own
        self._by_sha = {own.sha256: own}
        self._by_preset = {own.choice.preset: own}

    def recipe_for(self, recipe_sha256: str) -> Recipe:
        """The recipe a job queued under `recipe_sha256` is made with: that one, where it names
        a preset of this config and is that preset's current recipe; the preset's current recipe
        where the recorded one is older (the config or code changed since); the daemon's own
        where the recipe names no preset known here. Raises RecipeError where the preset's
        models cannot be used."""
        if recipe_sha256 in self._by_sha:
            return self._by_sha[recipe_sha256]
        recorded = self.store.recipe(recipe_sha256)
        preset = None if recorded is None else recorded.get("preset")
        if recorded is None or (preset is not None and preset not in self.config.presets_all()):
            return self.own
        if preset not in self._by_preset:
            self._by_preset[preset] = self._build(preset)
        return self._by_preset[preset]

    def _build(self, preset: str | None) -> Recipe:
        from pipeline.errors import PipelineError

        try:
            chain, models = prepare_models(self.config, preset)
        except (RecipeError, PipelineError) as exc:
            raise RecipeError(f"preset {preset or '(pipeline stages)'}: {exc}") from exc
        recipe = recipe_of(self.config, chain, preset, models.expected)
        sha = self.store.record_recipe(recipe)
        made = Recipe(sha, ChainChoice(recipe["preset"], dict(recipe["models"])))
        self._by_sha[sha] = made
        log.info("recipe preset=%s recipe=%s models verified", preset, sha[:12])
        return made
