"""Data loaders: real corpora that ship inside PyPI packages, and ViQuAE (hub or local copy)."""
