"""Tests that the scripts under launch/ run and report what they should (never their timings)."""
