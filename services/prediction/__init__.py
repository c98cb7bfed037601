"""driftline prediction."""
