"""driftline infra."""
