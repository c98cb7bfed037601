"""Drive the Java reference (tests/interop/java: Apache Avro's BinaryMessageEncoder/Decoder and the
Apache Kafka Java client) from the tests.

    java = JavaReference.build()            # once per machine and source version (cached)
    lines = java.run("encode", EVENT, LABEL, "3", "j-", "2", "1.7e9")

The jars come from Maven Central through `mvn dependency:copy-dependencies` (the pom names them);
the one class is compiled with javac. Both land in `~/.cache/driftline/interop-<hash>` keyed by the
hash of the Java sources and the pom, so a change rebuilds and a clean machine builds once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from driftline.shared.codec import SCHEMAS_DIR
from driftline.shared.settings import Settings

PROJECT = Path(__file__).resolve().parent / "interop" / "java"
MAIN = "io.driftline.interop.Interop"


def schema_path(name: str) -> str:
    return str(SCHEMAS_DIR / f"{name}.avsc")


@dataclass
class JavaReference:
    home: Path

    @classmethod
    def build(cls, cache_dir: Path | None = None) -> "JavaReference":
        sources = sorted(PROJECT.rglob("*.java"))
        digest = hashlib.sha256()
        for path in [PROJECT / "pom.xml", *sources]:
            digest.update(path.read_bytes())
        home = (cache_dir or Settings().cache_dir) / f"interop-{digest.hexdigest()[:12]}"
        if (home / "built").exists():
            return cls(home)
        for tool in ("java", "javac", "mvn"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"the Java interop tests need {tool} (a JDK 17 and Maven; .ci/run installs them)")
        home.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="interop-", dir=home.parent))
        for step in (["mvn", "-q", "-B", "-f", str(PROJECT / "pom.xml"), "dependency:copy-dependencies",
                      f"-DoutputDirectory={tmp / 'lib'}"],
                     ["javac", "-d", str(tmp / "classes"), "-cp", str(tmp / "lib" / "*"), *map(str, sources)]):
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"{step[0]} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        (tmp / "built").touch()
        try:
            tmp.rename(home)
        except OSError:  # another session built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(home)

    def run(self, *args: str, stdin: str = "", timeout: float = 180.0) -> list[str]:
        """Run one mode of Interop.java; its stdout lines (a non-zero exit raises with stderr)."""
        classpath = f"{self.home / 'classes'}{os.pathsep}{self.home / 'lib' / '*'}"
        done = subprocess.run(["java", "-cp", classpath, MAIN, *args], input=stdin, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"java {args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return [line for line in done.stdout.splitlines() if line]


def event(prefix: str, i: int, flip_at: int, base_ts: float) -> tuple[dict, dict]:
    """The event and label the Java side generates for index i (Interop.event / Interop.label)."""
    x = ((37 * i) % 100) / 100.0
    positive = (x > 0.5) != (i >= flip_at)
    return ({"event_id": f"{prefix}{i}", "entity_id": f"ent-{i % 5}", "ts": base_ts + i,
             "fields": {"x": x, "y": ((11 * i) % 13) / 13.0}, "published_ms": None},
            {"event_id": f"{prefix}{i}", "label": "1" if positive else "0", "ts": base_ts + i + 0.5})


def parse_record(text: str) -> dict:
    """A GenericRecord's toString (JSON, with bytes as {"bytes": "..."}) as a dict."""
    value = json.loads(text)
    for k, v in value.items():
        if isinstance(v, dict) and set(v) == {"bytes"}:
            value[k] = v["bytes"].encode("latin-1")
    return value


def close(a, b) -> bool:
    """Equal, floats to the last printed digit (Java prints doubles in their shortest form too);
    Avro's toString prints bytes as ISO-8859-1 text."""
    if isinstance(a, bytes) != isinstance(b, bytes):
        a, b = (x.decode("latin-1") if isinstance(x, bytes) else x for x in (a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == b or (a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(a)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


ERROR = re.compile(r"^ERROR (\w+): (.*)$")
