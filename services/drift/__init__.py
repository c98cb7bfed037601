"""driftline drift."""
