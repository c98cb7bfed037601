"""What the prediction service does, as plain functions on one `Predictor` (the routes only call these).

A prediction: grab the serving (model, version) pair once -> one Redis round trip for the entity
state through `FeatureStore.vector` (the same `FeatureSet.vector` the features service uses, so
what is served is what is learned) -> score with the champion -> answer with that version.

With an `event_id`, the request joins the learning loop: the vector (`fv`) and the prediction
(`p.champion`) are written to the event's snapshot hash with the snapshot TTL, exactly as the
features service and the learner write them, so a later label for that id is learned from what
was served; and the Prediction is logged to `predictions` (source "prediction") in the background.

Such requests do NOT update the entity's state. The `events` topic is the single writer of entity
state: the features service folds each event in once, in partition order, with offsets that make
redelivery idempotent. A second writer here would count an event twice when the application also
publishes it (as it must, for the learner to see it), would race the features service on the same
hash without any order, and would make state depend on which replica answered. Applications that
want an event to count publish it to `events` (or POST /v1/events) as usual.

Admin actions (rollback, promote) write the registry role, swap this worker at once, and publish
`model.swaps` so every other replica and worker follows.

It must never load a model on the request path, never wait for Kafka to answer a request, and
never turn client input into a 5xx.

    p = Predictor(settings); p.start()
    p.predict(PredictRequest(entity_id="meter-7", fields={"price": 0.3}))
    # {'event_id': '...', 'prediction': '1', 'proba': {...}, 'model_version': 1}
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from typing import Any

import redis.asyncio

from ..features.definitions import load_feature_set
from ..features.store import FeatureStore, FieldNames
from ..ingestion.validate import check_fields
from ..learner.spec import parse_model
from ..shared import kafka, metrics, redis_clients
from ..shared.codec import get_codec
from ..shared.keys import Keys
from ..shared.registry import VERSIONS_LISTED, ModelRegistry, PrunedArtifact, TamperedArtifact, UnknownVersion
from ..shared.settings import Settings
from ..shared.swaps import make_champion, position_of, publish_swap, rollback_target
from ..shared.topics import Topics
from .canary import Canary
from .follower import ModelFollower
from .logger import PredictionLog
from .models import ModelHolder
from .replica import Replica
from .reads import CoalescedReads
from .schemas import PredictRequest

log = logging.getLogger(__name__)
SERVICE = "prediction"
ROLE = "champion"


class NotReady(RuntimeError):
    """No model to answer with yet, or the feature store does not answer (503)."""


class FieldsRefused(ValueError):
    """Request fields that break the field limits ingestion applies too (422, with the reason)."""

    def __init__(self, reason: str, detail: str, index: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.index = index


class AdminError(RuntimeError):
    """An admin request that cannot be done as asked; `status` is the HTTP status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Predictor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.learner.model_name
        self.keys = Keys(settings.namespace)
        self.topics = Topics(settings.namespace)
        self.codec = get_codec()
        # Short timeouts: a Redis that stalls must turn into a quick 503, not a pile of hung requests.
        self.redis = redis_clients.connect(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0,
                                           health_check_interval=30)
        # /v1/predict reads with the asyncio client on the event loop: a sync client on the thread
        # pool costs two thread hops and GIL hand-overs per request (p99 x10 under 16 connections).
        self.aredis: redis.asyncio.Redis | None = None
        self.state_reads: CoalescedReads | None = None
        self.feature_set = load_feature_set(settings.features.set)
        self.store = FeatureStore(self.redis, self.keys, self.feature_set, settings.features.snapshot_ttl_s,
                                  service=SERVICE)
        self.limits = settings.ingestion  # the same field limits as ingestion
        self.names = FieldNames(self.redis, self.keys, self.model_name, settings.features.max_feature_names)
        self.registry = ModelRegistry(self.redis, self.keys, self.model_name,
                                      settings.model_key.get_secret_value().encode())
        self.holder = ModelHolder(self.model_name)
        self.plog = PredictionLog(settings)
        self._swap_producer = kafka.producer(settings, **{"message.timeout.ms": 10_000, "logger": log})
        self._predictions = metrics.PREDICTIONS.labels(SERVICE, self.model_name, ROLE)
        self.canary = Canary(settings, self.redis, self.registry, self.model_name)  # canary.py: A-B routing
        # follower.py: the served models learn what the learner learns, in its order
        self.follower = ModelFollower(settings, self.holder, self.registry, self.canary)
        self._read_seconds = metrics.REDIS_SECONDS.labels(SERVICE, "read_state")

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        # Made here, inside the server's event loop (its connections belong to that loop).
        self.aredis = redis_clients.connect_async(self.settings.redis_url, socket_timeout=2.0,
                                                  socket_connect_timeout=1.0, health_check_interval=30)
        self.state_reads = CoalescedReads(self.aredis)  # concurrent requests share a round trip
        # The modules a model of the configured spec is made of, imported before /health answers
        # (river's submodules pull in scipy: ~0.7 s of CPU): else the first model's load pays for
        # them beside the first events, and service_app's gc.freeze() would not cover them.
        try:
            parse_model(self.settings.learner.model)
        except Exception as exc:  # a warm-up only: the learner refuses a bad spec; what it registers still loads
            log.warning("could not import the modules of the configured model: %s", exc)
        try:
            self.follower.sync_now()
        except redis_clients.UNAVAILABLE as exc:  # the follower retries; /ready says why meanwhile
            log.warning("could not read the registry at start (%s); will follow it", exc)
        self.plog.start()
        self.follower.start()
        self.canary.start()
        # driftline_model_ready must be true for Prometheus even when nobody probes /ready
        # (compose health-checks /health); refresh it off the request path.
        self._ready_stop = threading.Event()
        threading.Thread(target=self._refresh_ready, name="ready-gauge", daemon=True).start()

    def _refresh_ready(self, every_s: float = 2.0) -> None:
        while not self._ready_stop.wait(every_s):
            try:
                self.readiness()
            except Exception:  # the gauge is best effort; /ready answers for itself
                log.debug("readiness refresh failed", exc_info=True)
            try:
                self.canary.refresh()  # the share and the challenger, as every replica sees them
            except Exception:
                log.warning("canary refresh failed; routing as before", exc_info=True)

    def stop(self) -> None:
        if hasattr(self, "_ready_stop"):
            self._ready_stop.set()
        self.follower.stop()
        self.canary.stop()
        self.plog.stop()
        self._swap_producer.flush(5)
        self.redis.close()
        if self.aredis is not None:
            try:  # stop runs in the server's loop (lifespan): close its async connections there
                import asyncio

                asyncio.get_running_loop().create_task(self.aredis.aclose())
            except RuntimeError:
                pass
            self.aredis = None

    # -- predictions --------------------------------------------------------------------------
    def serving(self) -> Replica:
        served = self.holder.current  # read once: this request's model and version, whatever swaps next
        if served is None:
            raise NotReady(f"no model to serve yet: the registry has no champion for model {self.model_name!r}")
        return served

    def check(self, reqs: list[PredictRequest], batch: bool = False) -> None:
        """Ingestion's field rules (count, names, allow-list); a request that joins the learning
        loop (an event_id: its vector may be learned from) may not bring the model more field
        names than features.max_feature_names."""
        for index, req in enumerate(reqs):
            problem = check_fields(req.fields, self.limits)
            if problem:
                raise FieldsRefused(problem.reason, problem.detail, index if batch else None)
        joining = {name for req in reqs if req.event_id is not None for name in req.fields}
        if joining:
            try:
                refused = self.names.admit(joining)
            except redis_clients.UNAVAILABLE as exc:
                raise NotReady(f"feature store (Redis) does not answer: {exc}") from None
            if refused:
                raise FieldsRefused("too_many_feature_names",
                                    f"the model already has {self.names.limit} distinct field names "
                                    f"(features.max_feature_names); new: {sorted(refused)[:5]}")

    def predict(self, req: PredictRequest) -> dict[str, Any]:
        self.check([req])
        served = self.serving()
        ts = req.ts if req.ts is not None else time.time()
        try:
            x = self.store.vector(req.entity_id, req.fields, ts)
        except redis_clients.UNAVAILABLE as exc:
            raise NotReady(f"feature store (Redis) does not answer: {exc}") from None
        answer = self._answer(served, req, x, ts)
        if req.event_id is not None:
            self._join_learning_loop([(req, x, ts, answer)], served)
        return answer

    async def apredict(self, req: PredictRequest) -> dict[str, Any]:
        """`predict` on the event loop: the same steps, the Redis round trips awaited (asyncio
        client), the model scored inline (a thread would not run it any sooner under the GIL)."""
        self.check([req])  # FieldNames caches admitted names: Redis only for a name never seen
        served = self.serving()
        ts = req.ts if req.ts is not None else time.time()
        try:
            x = await self._avector(req.entity_id, req.fields, ts)
        except redis_clients.UNAVAILABLE as exc:
            raise NotReady(f"feature store (Redis) does not answer: {exc}") from None
        answer = self._answer(served, req, x, ts)
        if req.event_id is not None:
            records, pipe = self._queue_join([(req, x, ts, answer)], served, self.aredis.pipeline(transaction=False))
            try:
                started = time.perf_counter()
                written = await pipe.execute()
                metrics.REDIS_SECONDS.labels(SERVICE, "write_snapshots").observe(time.perf_counter() - started)
            except redis_clients.UNAVAILABLE as exc:
                raise NotReady(f"feature store (Redis) does not answer: {exc}") from None
            self._log_new(records, written)
        return answer

    async def _avector(self, entity_id: str, fields: dict[str, float], ts: float) -> dict[str, float]:
        keys = self.store.state_keys(entity_id, fields)  # its entity's, and each key entity's it names
        if not keys:
            return self.feature_set.vector({}, fields, ts)
        if self.state_reads is None:
            raise NotReady("the prediction service is not started")
        started = time.perf_counter()
        if len(keys) == 1:
            replies = [await self.state_reads.read(keys[0])]
        else:
            replies = await asyncio.gather(*(self.state_reads.read(key) for key in keys))
        self._read_seconds.observe(time.perf_counter() - started)
        return self.store.vector_from(replies, fields, ts)

    def predict_batch(self, reqs: list[PredictRequest]) -> tuple[list[dict[str, Any]], int]:
        """Every item scored by the same champion (or, when the canary routes its entity there, the
        same challenger); entity states in one round trip."""
        self.check(reqs, batch=True)
        served = self.serving()
        now = time.time()
        fs = self.feature_set
        named = [fs.key_values(r.fields) for r in reqs]
        try:
            read = self.store.read_batch([r.entity_id for r in reqs], (),
                                         keyed=[kv for names in named for kv in names.items()])
        except redis_clients.UNAVAILABLE as exc:
            raise NotReady(f"feature store (Redis) does not answer: {exc}") from None
        answers, joined = [], []
        for req, names in zip(reqs, named):
            ts = req.ts if req.ts is not None else now
            x = fs.vector(read.states[req.entity_id], req.fields, ts,
                          keyed={k: read.keyed[(k, v)] for k, v in names.items()})
            answer = self._answer(served, req, x, ts)
            answers.append(answer)
            if req.event_id is not None:
                joined.append((req, x, ts, answer))
        if joined:
            self._join_learning_loop(joined, served)
        return answers, served.version

    def _answer(self, champion: Replica, req: PredictRequest, x: dict[str, float], ts: float) -> dict[str, Any]:
        started = time.perf_counter()
        arm, served = self.canary.pick(req.entity_id, champion)
        prediction, proba = served.score(x)
        event_id = req.event_id or secrets.token_hex(16)  # 128 random bits, as uuid4's hex but without building a UUID
        self.canary.answered(arm, event_id, prediction, time.perf_counter() - started)
        if arm == ROLE:
            self._predictions.inc()
        else:
            metrics.PREDICTIONS.labels(SERVICE, self.model_name, arm).inc()
        return {"event_id": event_id, "prediction": prediction, "proba": proba, "model_version": served.version,
                "arm": arm}

    def _join_learning_loop(self, joined: list, served: Replica) -> None:
        """Keep each event's vector and prediction for its label (one round trip), then log the
        predictions in the background."""
        records, pipe = self._queue_join(joined, served, self.redis.pipeline(transaction=False))
        try:
            written = self.store.execute(pipe, "write_snapshots")
        except redis_clients.UNAVAILABLE as exc:
            raise NotReady(f"feature store (Redis) does not answer: {exc}") from None
        self._log_new(records, written)

    def _queue_join(self, joined: list, served: Replica, pipe) -> tuple[list[dict], Any]:
        """Queue the snapshot writes of these requests on `pipe` (sync or asyncio); their
        Prediction records."""
        now_ms = int(time.time() * 1000)
        vectors, records = [], []
        for req, x, ts, answer in joined:
            vectors.append({"event_id": req.event_id, "entity_id": req.entity_id, "ts": ts, "features": x,
                            "feature_set": self.feature_set.name, "published_ms": now_ms})
            records.append({"event_id": req.event_id, "entity_id": req.entity_id, "ts": ts,
                            "model": self.model_name, "model_version": answer["model_version"], "role": answer["arm"],
                            "y_pred": answer["prediction"], "proba": answer["proba"], "source": SERVICE,
                            "published_ms": now_ms})
        # Only where the event has no snapshot yet: an unauthenticated request must not replace
        # the vector of a real event (or of an earlier request) before its label comes.
        for v, r in zip(vectors, records):
            self.store.snapshots.queue_new(pipe, v["event_id"], self.codec.encode("FeatureVector", v),
                                           {r["role"]: self.codec.encode("Prediction", r)})
        return records, pipe

    def _log_new(self, records: list[dict], written: list) -> None:
        for record, new in zip(records, written):
            if new:  # an event that had a snapshot keeps it, and its prediction is not logged again
                self.plog.log(record, key=record["entity_id"])

    # -- readiness ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if self.holder.current is None:
            reasons.append(f"no model loaded: the registry has no (loadable) champion for {self.model_name!r}")
        try:
            self.redis.ping()
        except redis_clients.UNAVAILABLE as exc:
            reasons.append(f"redis does not answer: {exc}")
        try:
            self.plog.producer.list_topics(self.topics.predictions, timeout=1.0)
        except Exception as exc:  # KafkaException, or a timeout
            reasons.append(f"kafka does not answer: {exc}")
        else:
            if not self.follower.assigned:
                reasons.append("not following model.swaps / model.updates yet")
        ready = not reasons
        metrics.MODEL_READY.labels(SERVICE).set(1 if ready else 0)
        return ready, reasons

    # -- the registry view and admin actions --------------------------------------------------
    def models(self, digest: bool = False, limit: int = VERSIONS_LISTED) -> dict[str, Any]:
        """The registry's view (its newest `limit` versions) and this worker's; with `digest`, each
        served model's content hash (a pickle of the model: for a large forest, a noticeable pause
        of this worker)."""
        served = self.holder.current
        replicas = self.follower.freshness()
        if digest:
            for role, holder in self.follower.holders.items():
                if role in replicas and holder.current is not None:
                    replicas[role]["digest"] = holder.current.digest()
        versions, total = self.registry.listing(limit)
        return {
            "model": self.model_name,
            "champion": self.registry.champion(),
            "challenger": self.registry.challenger(),
            "serving": served.version if served else None,
            "serving_revision": served.revision if served else None,
            "serving_examples_seen": served.examples if served else None,
            "replicas": replicas,
            "refused": {str(v): why for v, why in dict(self.holder.refused).items()},  # a copy: the follower adds
            "versions": versions,
            "versions_total": total,
            "canary": self.canary.state(),
        }

    def rollback(self, version: int | None) -> dict[str, Any]:
        """Make `version` (default: `swaps.rollback_target`, the version the champion replaced) the champion."""
        if version is None:
            champion = self.registry.champion()
            if champion is None:
                raise AdminError(409, "there is no champion to roll back from")
            version = rollback_target(self.registry)
            if version is None:
                raise AdminError(409, f"champion version {champion} has no parent to roll back to; name a version")
        return self._make_champion(version, "rollback")

    def promote(self, version: int) -> dict[str, Any]:
        return self._make_champion(version, "manual")

    def _make_champion(self, version: int, reason: str) -> dict[str, Any]:
        try:
            from_version = make_champion(self.registry, version)
        except PrunedArtifact as exc:
            raise AdminError(409, f"model {self.model_name!r}: {exc}") from None
        except UnknownVersion:
            raise AdminError(404, f"model {self.model_name!r} has no version {version}") from None
        except TamperedArtifact as exc:
            raise AdminError(409, f"version {version} is refused: {exc}") from None
        self.follower.sync_now()  # this worker at once; the others by model.swaps
        published = publish_swap(self._swap_producer, self.topics, model=self.model_name, from_version=from_version,
                                 to_version=version, reason=reason, position=position_of(self.registry, from_version),
                                 service=SERVICE)
        return {"model": self.model_name, "from_version": from_version, "to_version": version,
                "reason": reason, "published": published}

    # -- canary (canary.py) --------------------------------------------------------------------
    def canary_share(self, share: float) -> dict[str, Any]:
        if share > 0 and self.registry.challenger() is None:
            raise AdminError(409, f"model {self.model_name!r} has no challenger to route to")
        self.canary.set_share(share)
        self.follower.sync_now()  # this worker routes to the challenger at once; the others within seconds
        return self.canary.state()

    def canary_promote(self) -> dict[str, Any]:
        """The canary's challenger becomes the champion (the one swap path); routing ends."""
        challenger = self.registry.challenger()
        if challenger is None:
            raise AdminError(409, f"model {self.model_name!r} has no challenger to promote")
        swapped = self._make_champion(challenger, "manual")
        self.canary.set_share(0.0)
        return swapped

    def canary_rollback(self) -> dict[str, Any]:
        """Stop routing to the challenger (it keeps shadowing in the learner)."""
        version = self.canary.holder.current.version if self.canary.holder.current else None
        if version is not None:
            self.registry.annotate(version, canary_rolled_back="admin", canary_rolled_back_at=time.time())
        self.canary.set_share(0.0, "admin")
        return self.canary.state()
