"""Tests of the mixing core without ranks: draws, pixel ops, targets, validation, metrics."""
