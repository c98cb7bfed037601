"""Every service's /docs opens without internet: a real headless Chromium (Debian's package), with
every host but loopback unresolvable, renders Swagger UI and lists each operation of the service's
OpenAPI document. (With the assets on a CDN, as FastAPI has them by default, the page stays blank.)"""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest
from pipeline import ALL, start_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.e2e
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def rendered(url: str) -> str:
    """The DOM of a page after its scripts ran, as headless Chromium sees it without internet."""
    assert CHROMIUM, "this test needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", OFFLINE,
                           "--virtual-time-budget=15000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    return done.stdout


def test_every_service_docs_page_lists_its_operations_offline(run_service):
    procs = start_pipeline(run_service, ALL)
    for name, proc in procs.items():
        page = httpx.get(proc.url + "/docs", timeout=10).text
        assert "cdn" not in page.lower(), name
        operations = {(method.upper(), path)
                      for path, item in httpx.get(proc.url + "/openapi.json", timeout=10).json()["paths"].items()
                      for method in item}
        dom = rendered(proc.url + "/docs")
        shown = set(re.findall(r'<span class="opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', dom))
        assert operations and operations <= shown, (name, operations - shown)
