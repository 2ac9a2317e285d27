"""Pushing to a registry: the distribution API client, credentials, and one push."""
