"""The names `STRATEGY` and a project's `strategy` may take, importable without numpy or scikit-learn.

`backend.config` checks `STRATEGY` against these, and every process reads the config, the container health check
every 30 seconds among them: importing the strategies themselves would cost each of those 1.4 s of scikit-learn.
`backend.scoring.registry` maps the same names to classes (a test keeps the two in step).
"""

STRATEGY_NAMES: tuple[str, ...] = (
    "random",
    "least_confidence",
    "margin",
    "entropy",
    "vote_entropy",
    "bald",
    "badge",
    "coreset",
    "cluster",
    "density_weighted",
    "error_prediction",
    "expected_gradient_length",
    "hybrid",
)

DEFAULT_STRATEGY = "hybrid"
"""The strategy used when a project configures none."""
