"""`driftline bench doors`: what the client doors' guard costs per request (`DoorGuard.admit`), in
microseconds, in this process: an open door, token lists of 1, 10 and 100 clients, a rate limit,
and an unknown token turned away. Pure CPU: no broker, no Redis, no HTTP.

The prediction route calls the guard once per request, before it reads the body; this is its
whole cost on that path (the HTTP metrics middleware and the route are the serving bench's).
"""

from __future__ import annotations

import secrets
import statistics
import time
from functools import partial
from pathlib import Path

from fastapi import HTTPException
from pydantic import SecretStr

from ..shared.doors import DoorGuard
from ..shared.settings import ClientToken


def _holders(n: int) -> list[ClientToken]:
    return [ClientToken(name=f"client-{i}", token=SecretStr(secrets.token_urlsafe(32))) for i in range(n)]


def _per_call_us(call, n: int, rounds: int = 5) -> float:
    """The median over `rounds` of the mean time of one call, in microseconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            call()
        times.append((time.perf_counter() - started) / n * 1e6)
    return round(statistics.median(times), 3)


def _refused(guard: DoorGuard, header: str):
    def call() -> None:
        try:
            guard.admit(header)
        except HTTPException:
            pass
    return call


def _admitted(guard: DoorGuard, holder: ClientToken):
    return partial(guard.admit, f"Bearer {holder.token.get_secret_value()}")


def run(out_dir: Path | None = None, quick: bool = False) -> dict:
    n = 2_000 if quick else 200_000
    cases = {"open door": partial(DoorGuard("prediction", None, None).admit, None)}
    for size in (1, 10, 100):
        held = _holders(size)
        cases[f"{size} token{'s' if size > 1 else ''}"] = _admitted(DoorGuard("prediction", held, None), held[-1])
    held = _holders(10)
    # a limit never reached: the cost of counting each request
    cases["10 tokens, rate limited"] = _admitted(DoorGuard("prediction", held, f"{10 * n}/second"), held[0])
    cases["unknown token (401)"] = _refused(DoorGuard("prediction", _holders(10), None), "Bearer " + "x" * 43)
    return {"calls_per_round": n, "us_per_request": {name: _per_call_us(call, n) for name, call in cases.items()}}
