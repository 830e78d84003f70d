"""The transformer encoder, the classifier heads, and their versioned artifacts."""
