"""Helpers the tests share: storage builders, fixtures and the end-to-end image archive check; no tests."""
