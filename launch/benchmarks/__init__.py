"""Benchmarks: each module times one part of dist_cutmix against the alternatives, round robin, and prints ratios."""
