"""Helpers shared by the tests: rank spawning, independent references, Composer models and Trainers, CUDA
comparisons. No tests live here."""
