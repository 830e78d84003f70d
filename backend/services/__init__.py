"""Use cases (predict, train, rerank), composed from the scoring core, the ML code and the adapters."""
