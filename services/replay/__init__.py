"""driftline replay."""
