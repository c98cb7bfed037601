"""driftline learner."""
