"""Helpers the tests import or run as scripts (not tests themselves)."""
