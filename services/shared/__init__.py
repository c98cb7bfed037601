"""Contracts shared by every service: settings, topics, Avro codec, Redis keys, metrics.

A service never spells a topic name, a Redis key pattern or a metric name by hand: it imports it
from here.
"""
