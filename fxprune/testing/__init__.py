"""Helpers for tests and sweeps: random gate patterns, the parameter count they imply,
models by name, and the model-zoo equivalence sweep (:mod:`fxprune.testing.zoo`)."""

from .masks import implied_param_count, random_masks

__all__ = ["random_masks", "implied_param_count"]
