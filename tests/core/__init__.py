"""Core ops without ranks: drawing, pixels (batch and per-sample), targets, metrics and row lookup in one process,
against independent references and the peers' own code."""
