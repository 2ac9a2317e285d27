"""Batch snapshots: which containers to snapshot, the catalog of records, and retention."""
