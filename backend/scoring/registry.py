"""Query strategies by name: the one place that maps a configured string to a strategy object."""

from __future__ import annotations

import inspect

from backend.scoring.base import Strategy
from backend.scoring.hybrid import Hybrid
from backend.scoring.names import DEFAULT_STRATEGY, STRATEGY_NAMES
from backend.scoring.strategies import (
    Badge,
    Bald,
    Cluster,
    Coreset,
    DensityWeighted,
    EntropySampling,
    ErrorPrediction,
    ExpectedGradientLength,
    LeastConfidence,
    MarginSampling,
    RandomSampling,
    VoteEntropy,
)

STRATEGIES: dict[str, type] = {
    cls.name: cls
    for cls in (
        RandomSampling,
        LeastConfidence,
        MarginSampling,
        EntropySampling,
        VoteEntropy,
        Bald,
        Badge,
        Coreset,
        Cluster,
        DensityWeighted,
        ErrorPrediction,
        ExpectedGradientLength,
        Hybrid,
    )
}
"""Strategy classes keyed by their `name`, the names of `backend.scoring.names.STRATEGY_NAMES`."""

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "STRATEGY_NAMES", "get_strategy"]


def get_strategy(name: str, **params) -> Strategy:
    """The strategy called `name`, built with `params`.

    Raises:
        ValueError: `name` is not registered (the message lists the known names), a parameter is not one the
            strategy takes (the message names it and lists those it takes), or a value is out of range.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; known strategies: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no parameters"
        raise ValueError(
            f"Strategy {name!r} got unknown parameter(s) {', '.join(map(repr, unknown))}; it takes {takes}"
        )
    return cls(**params)
