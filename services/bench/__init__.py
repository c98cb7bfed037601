"""driftline bench."""
