"""Adapters at the edge: Label Studio's REST API, Redis, RQ. Services receive these as arguments."""
