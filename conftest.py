"""Doctests of the `services/` folder run against the installed `driftline` package.

`services/` *is* the `driftline` package (pyproject's package-dir), so pytest would import
`services/shared/metrics.py` a second time as `services.shared.metrics`, with its own copies of
every module-level object (Prometheus metrics registered twice fail). Each module is imported
once, as `driftline.*`, and given to pytest under the name it looks for.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SERVICES = Path(__file__).resolve().parent / "services"


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".py" and SERVICES in file_path.parents:
        parts = file_path.relative_to(SERVICES.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        for i in range(1, len(parts) + 1):
            alias = ".".join(parts[:i])
            if alias not in sys.modules:
                sys.modules[alias] = importlib.import_module(".".join(("driftline",) + parts[1:i]))
    return None

# Probe scripts (services/bench/probes/): one-off measurements that start their own stack when run;
# never imported by the test run.
collect_ignore = ["services/bench/probes"]
