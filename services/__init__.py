"""driftline: real-time online machine learning as event-driven services.

One sub-package per service (ingestion, features, learner, drift, prediction), `shared` for the
contracts every service imports (settings, topics, Avro codec, Redis keys, metrics), `infra` for
the local Kafka and Redis, `replay` and `bench` for the commands that drive the whole loop.
"""

__version__ = "0.2.0"  # 0.2: the Avro fingerprint in the spec's byte order (README, "Upgrading from 0.1")
