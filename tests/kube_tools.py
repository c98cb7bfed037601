"""kustomize and kubeconform for tests/test_deploy_kubernetes.py, and the Kubernetes JSON schemas
kubeconform checks against, all from package registries this machine reaches.

- kustomize and kubeconform: `go install` from the Go module proxy into ~/.cache/driftline/bin
  (once; ~2 minutes of compiling each on a 2-core machine).
- The schemas: kubeconform fetches them from GitHub by default, which cannot be reached here.
  PyPI's kubernetes-validate (Apache-2.0) ships the same OpenAPI-derived schemas, one file per
  kind beside a shared `_definitions.json`; kubeconform wants each kind's file whole
  ("standalone"), so each kind the manifests use is written out with the definitions it needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from podman_stack import CACHE

BIN = CACHE / "bin"
TOOLS = {  # binary -> Go module@version (the newest that builds with the machine's Go 1.26)
    "kubeconform": "github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0",
    "kustomize": "sigs.k8s.io/kustomize/kustomize/v5@v5.7.1",
}
SCHEMA_PACKAGE = "kubernetes-validate==1.37.0"
SCHEMAS = CACHE / "kubernetes-json-schema"
_DEFINITIONS_REF = "/api/_definitions.json#/$defs/"


def tool(name: str) -> str:
    """The path of `name`, built from the Go module proxy when it is not in the cache yet."""
    exe = BIN / name
    if not exe.exists():
        go = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")
        assert go, "Go missing: kustomize and kubeconform are built with `go install`"
        env = {**os.environ, "GOBIN": str(BIN), "GOFLAGS": "-buildvcs=false"}
        result = subprocess.run([go, "install", TOOLS[name]], env=env, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"go install {TOOLS[name]} failed:\n{result.stderr[-3000:]}"
    return str(exe)


def _wheel() -> Path:
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob("kubernetes_validate-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), SCHEMA_PACKAGE], check=True,
                       capture_output=True, timeout=600)
        found = sorted(wheels.glob("kubernetes_validate-*.whl"))
    return found[-1]


def _closure(node, definitions: dict, out: dict) -> None:
    """Every definition `node` refers to, transitively, into `out`."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name not in out:
                out[name] = definitions[name]
                _closure(definitions[name], definitions, out)
        for value in node.values():
            _closure(value, definitions, out)
    elif isinstance(node, list):
        for value in node:
            _closure(value, definitions, out)


def schema_location(version: str, kinds: set[str]) -> str:
    """A kubeconform -schema-location template with standalone strict schemas of Kubernetes
    `version` ("1.30.0") for these kinds (file names as kubeconform builds them: deployment-apps-v1)."""
    folder = SCHEMAS / f"v{version}-standalone-strict"
    missing = {kind for kind in kinds if not (folder / f"{kind}.json").exists()}
    if missing:
        source = f"kubernetes_validate/kubernetes-json-schema/v{version}-local-strict/"
        with zipfile.ZipFile(_wheel()) as wheel:
            text = wheel.read(source + "_definitions.json").decode().replace(_DEFINITIONS_REF, "#/$defs/")
            definitions = json.loads(text)["$defs"]
            folder.mkdir(parents=True, exist_ok=True)
            for kind in missing:
                schema = json.loads(wheel.read(f"{source}{kind}.json").decode().replace(_DEFINITIONS_REF, "#/$defs/"))
                schema.pop("$id", None)  # its refs are to this document now
                needed: dict = {}
                _closure(schema, definitions, needed)
                schema["$defs"] = needed
                (folder / f"{kind}.json").write_text(json.dumps(schema))
    return str(SCHEMAS / "{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}" /
               "{{ .ResourceKind }}{{ .KindSuffix }}.json")


def schema_file_name(doc: dict) -> str:
    """The file kubeconform looks for a manifest in: Deployment apps/v1 -> deployment-apps-v1.

        >>> schema_file_name({"apiVersion": "apps/v1", "kind": "Deployment"}), schema_file_name({"apiVersion": "v1", "kind": "Service"})
        ('deployment-apps-v1', 'service-v1')
    """
    group, _, version = doc["apiVersion"].rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return re.sub(r"[^a-z0-9]", "", doc["kind"].lower()) + suffix
