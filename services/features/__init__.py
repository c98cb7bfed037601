"""driftline features."""
