"""A container healthcheck that also heals: `python -m driftline.infra.healthcheck URL [N]`.

Docker (compose) restarts a container whose process exits, never one that is merely unhealthy.
This check asks URL (a service's /health); 200 exits 0 and resets the count of failures in a
file under /tmp; anything else exits 1, and the Nth failure in a row (default 3: 30 s at a 10 s
interval) also sends SIGTERM to PID 1, the service, so that the restart policy restarts it, as
`driftline serve all` does on the host. A service waiting for Redis or Kafka answers 200 (see
its /ready), so an outage of a dependency does not make it restart in a loop.

    >>> main(["http://127.0.0.1:9/health", "3"], pid=None, state_dir="/tmp/doctest-hc")   # nothing there
    1
"""

from __future__ import annotations

import os
import signal
import sys
import urllib.request
import zlib
from pathlib import Path


def main(argv: list[str], pid: int | None = 1, state_dir: str = "/tmp") -> int:
    url, limit = argv[0], int(argv[1]) if len(argv) > 1 else 3
    # Each check is a new process: the file's name must not depend on its hash seed (hash() does).
    counter = Path(state_dir) / f"driftline-health-{zlib.crc32(url.encode()):08x}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            ok = response.status == 200
    except Exception:  # 503 raises HTTPError; no answer raises URLError
        ok = False
    if ok:
        counter.unlink(missing_ok=True)
        return 0
    counter.parent.mkdir(parents=True, exist_ok=True)
    failures = int(counter.read_text() or 0) + 1 if counter.exists() else 1
    counter.write_text(str(failures))
    if failures >= limit and pid is not None:
        print(f"{url} unhealthy {failures} times in a row: stopping PID {pid} for a restart", file=sys.stderr)
        counter.unlink(missing_ok=True)
        os.kill(pid, signal.SIGTERM)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
