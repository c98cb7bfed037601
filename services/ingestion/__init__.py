"""driftline ingestion."""

SERVICE = "ingestion"
