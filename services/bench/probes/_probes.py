"""What several probes share: another git revision's code imported beside this tree's,
redis-server's own CPU time, the feature store's writes and reads of payments batches on a
Redis of the probe's own, variants run in alternating rounds, and one ASGI request in process.

    theirs = import_revision("9ec9331", "features.definitions")   # that revision's module
    fs, batches = payments_batches(500, 20_000)
    with redis_of_its_own() as url: ...
    print_store_rounds(alternate({"a": run_a, "b": run_b}, rounds=8))
    status = await asgi_request(app, "/v1/predict", "POST", b'{"entity_id": "e", "fields": {}}')
"""
import atexit
import importlib
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]


def import_revision(rev: str, module: str) -> ModuleType:
    """`services.<module>` as it is at git revision `rev`, imported as `theirs.<module>` (`git
    archive` of `services` and `schemas` into a temporary folder, removed at exit). Both versions
    share this tree's Prometheus registry: the metrics would register twice otherwise."""
    where = Path(tempfile.mkdtemp(prefix="revision-"))
    atexit.register(shutil.rmtree, where, True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "services", "schemas"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    (where / "services").rename(where / "theirs")
    sys.path.insert(0, str(where))
    sys.modules["theirs.shared.metrics"] = importlib.import_module("driftline.shared.metrics")
    return importlib.import_module(f"theirs.{module}")


def redis_cpu_s(client) -> float:
    """CPU seconds redis-server has used (INFO cpu), whoever asked."""
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def payments_batches(batch: int, events: int, definitions: ModuleType | None = None) -> tuple:
    """The payments feature set and `events` of its data set in batches of `batch`: per batch (card
    states, merchant states, labels) as the features service would write them. `definitions`:
    another revision's `features.definitions` (`import_revision`), for that revision's store: a
    store encodes only the window series of its own revision's classes."""
    from driftline.replay.payments import endless

    if definitions is None:
        from driftline.features import definitions
    fs = definitions.load_feature_set(str(ROOT / "services" / "features" / "payments.toml"))
    batches, cards, merchants = [], {}, {}
    stream = list(islice(endless(1.7e9), events))
    for at in range(0, events, batch):
        card_states, merchant_states, labels = {}, {}, {}
        for entity, fields, ts in stream[at:at + batch]:
            fs.apply_event(card_states.setdefault(entity, cards.setdefault(entity, {})), fields, ts)
            merchant = str(fields["merchant"])
            fs.apply_keyed("merchant", merchant_states.setdefault(merchant, merchants.setdefault(merchant, {})),
                           fields, ts, entity)
            labels[entity] = (str(int(fields["amount"] > 50)), ts)
        batches.append((card_states, merchant_states, labels))
    return fs, batches


@contextmanager
def redis_of_its_own() -> Iterator[str]:
    """A redis-server on a free port in a temporary home (the stack's settings), stopped at the end;
    yields its URL."""
    from driftline.infra import stack
    from driftline.shared.settings import Settings

    home = Path(tempfile.mkdtemp())
    server = stack.Redis(Settings(redis_url=f"redis://127.0.0.1:{stack.free_port()}/0", home=home))
    server.start()
    try:
        stack.wait_ready(server, 20)
        yield server.settings.redis_url
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def store_round(store, client, batches: list, events: int) -> tuple[float, float, float, float]:
    """Every batch written (states and labels, then the key entities' compare-and-set) and read
    back through `store`: this client's and redis-server's CPU µs per event, (write, read, redis
    write, redis read). An older revision's store that queues one command per label or per key
    entity is driven that way."""
    client.flushall()
    cpu = {"write": 0.0, "read": 0.0, "redis write": 0.0, "redis read": 0.0}
    for card_states, merchant_states, labels in batches:
        t, r = time.process_time(), redis_cpu_s(client)
        pipe = client.pipeline(transaction=False)
        store.queue_states(pipe, {e: dict(s) for e, s in card_states.items()})
        if hasattr(store, "queue_labels"):
            store.queue_labels(pipe, labels)
        else:  # one script call per label
            for entity, (label, ts) in labels.items():
                store.queue_label(pipe, entity, label, ts)
        pipe.execute()
        pipe = client.pipeline(transaction=False)
        try:
            store.queue_keyed(pipe, "merchant", {m: dict(s) for m, s in merchant_states.items()}, 7200)
        except TypeError:  # one compare-and-set call per key entity
            for m, s in merchant_states.items():
                store.queue_keyed(pipe, "merchant", m, dict(s), 7200)
        pipe.execute()
        t2, r2 = time.process_time(), redis_cpu_s(client)
        store.read_batch(list(card_states), [], keyed=[("merchant", m) for m in merchant_states])
        cpu["write"] += t2 - t
        cpu["redis write"] += r2 - r
        cpu["read"] += time.process_time() - t2
        cpu["redis read"] += redis_cpu_s(client) - r2
    return tuple(v / events * 1e6 for v in cpu.values())


def alternate(variants: dict, rounds: int) -> dict[str, list]:
    """Each variant's results over `rounds` rounds, the order of the variants reversed every other
    round (a host that speeds up or slows down favours neither)."""
    runs: dict[str, list] = {name: [] for name in variants}
    order = list(variants.items())
    for k in range(rounds):
        for name, run in order if k % 2 else order[::-1]:
            runs[name].append(run())
    return runs


def print_store_rounds(runs: dict[str, list]) -> None:
    """The medians of `store_round`'s figures, per variant."""
    for name, values in runs.items():
        medians = [round(statistics.median(v[i] for v in values), 2) for i in range(4)]
        print(f"{name}: µs per event, client write {medians[0]} read {medians[1]}, "
              f"redis-server write {medians[2]} read {medians[3]}")


async def asgi_request(app, path: str, method: str = "GET", body: bytes = b"") -> int:
    """One request to an ASGI app in this process, no sockets: its status code (the answer's
    body is dropped). The body comes in one message; a second receive hears a disconnect."""
    headers = [(b"host", b"x")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])
    status = []

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]
