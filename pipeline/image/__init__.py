"""Image formats: the config, Dockerfile changes, references, docker's manifest.json, the OCI layout, the archive."""
