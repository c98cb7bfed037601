"""The offline store: learned examples in Parquet (store.py), written by a sink that reads `outcomes`
(sink.py), exported from what Kafka retains (export.py), and what is built from it: candidates
trained from history (train.py) and versions rebuilt from their lineage (reproduce.py)."""
