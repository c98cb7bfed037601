"""driftline ingestion."""
