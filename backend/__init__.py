"""Active-learning ML backend for Label Studio: predictions, uncertainty scores and task ranking."""

__version__ = "0.1.0"
