"""What several probes share: another git revision's code imported beside this tree's, and
redis-server's own CPU time.

    theirs = import_revision("9ec9331", "features.definitions")   # that revision's module
"""
import atexit
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
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
