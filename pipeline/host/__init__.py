"""What the pipeline needs from the host: live processes, the cgroup freezer, durable file writes, test failpoints."""
