"""Supervision: `driftline serve all` (and `driftline demo`) restart a service whose process exits
or whose /health stays 503, with backoff, and say so.

The Supervisor is tested on small real processes (an HTTP server whose /health answers what a
file says), then `driftline serve all` on the real five services: a service killed with kill -9
comes back by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from driftline.infra import stack
from driftline.serve import Supervisor, pid_file, stop_process
from driftline.shared.settings import settings_env

FAKE = textwrap.dedent("""
    import http.server, pathlib, sys
    status = pathlib.Path(sys.argv[2])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = int(status.read_text() or 200)
            self.send_response(code); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


class Fakes:
    def __init__(self, tmp_path) -> None:
        self.tmp = tmp_path
        self.ports: dict[str, int] = {}
        self.started: list[subprocess.Popen] = []

    def status(self, name: str, code: int) -> None:
        (self.tmp / f"{name}.status").write_text(str(code))

    def start(self, name: str) -> subprocess.Popen:
        self.ports.setdefault(name, stack.free_port())
        if not (self.tmp / f"{name}.status").exists():
            self.status(name, 200)
        proc = subprocess.Popen([sys.executable, "-c", FAKE, str(self.ports[name]), str(self.tmp / f"{name}.status")],
                                start_new_session=True)
        self.started.append(proc)
        deadline = time.monotonic() + 10
        while not stack.port_open("127.0.0.1", self.ports[name]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return proc

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def stop(self) -> None:
        for p in self.started:
            stop_process(p, timeout=5)


@pytest.fixture
def fakes(tmp_path):
    f = Fakes(tmp_path)
    yield f
    f.stop()


def run_until(sup: Supervisor, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        sup.check()
        time.sleep(0.1)


def test_an_exited_service_is_restarted_with_growing_backoff_and_the_log_says_why(fakes):
    said: list[str] = []
    procs = {"a": fakes.start("a"), "b": fakes.start("b")}
    sup = Supervisor(procs, start=fakes.start, url_of=fakes.url, say=said.append, unhealthy_s=1, grace_s=5)
    sup.check()
    assert said == []
    first = procs["a"]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    t0 = time.monotonic()
    run_until(sup, lambda: sup.watched["a"].restarts == 1, 10)
    assert 0.9 <= time.monotonic() - t0 < 5  # the first backoff: 1 s
    assert sup.procs["a"].pid != first.pid and httpx.get(fakes.url("a") + "/health").status_code == 200
    assert "a: its process exited with -9; restarting it in 1 s" in said[0] and "a: restarted (restart 1" in said[1]
    # It dies again at once: the wait doubles.
    os.killpg(sup.procs["a"].pid, signal.SIGKILL)
    sup.procs["a"].wait()
    t0 = time.monotonic()
    run_until(sup, lambda: sup.watched["a"].restarts == 2, 10)
    assert 1.9 <= time.monotonic() - t0 < 6
    assert sup.watched["b"].restarts == 0  # the other one was left alone


def test_a_service_whose_health_stays_503_is_restarted_but_a_short_503_is_tolerated(fakes):
    said: list[str] = []
    procs = {"a": fakes.start("a")}
    sup = Supervisor(procs, start=fakes.start, url_of=fakes.url, say=said.append, unhealthy_s=2, grace_s=5)
    sup.check()
    fakes.status("a", 503)  # a blip shorter than unhealthy_s
    for _ in range(5):
        sup.check()
        time.sleep(0.2)
    fakes.status("a", 200)
    sup.check()
    assert sup.watched["a"].restarts == 0 and said == []
    fakes.status("a", 503)  # now for good: stopped, then restarted (and healthy, the file says 200 again)
    old = sup.procs["a"]
    run_until(sup, lambda: sup.watched["a"].restart_at is not None, 10)
    assert old.poll() is not None and "its /health answered 503 for 2 s" in said[0]
    fakes.status("a", 200)
    run_until(sup, lambda: sup.watched["a"].restarts == 1, 10)
    assert httpx.get(fakes.url("a") + "/health").status_code == 200


@pytest.mark.e2e
def test_serve_all_restarts_a_service_killed_with_kill_9(settings, tmp_path):
    env = {**os.environ, **settings_env(settings)}
    log = open(tmp_path / "serve-all.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "driftline.cli", "serve", "all"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{settings.host}:{settings.port_of('drift')}/health"
    try:
        deadline = time.monotonic() + 180
        while "supervising them" not in (tmp_path / "serve-all.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve-all.log").read_text()
            time.sleep(0.5)
        # Off the critical path at service_nice, its session's scheduling group too; the learner
        # and the prediction service at the default priority.
        for name in ("ingestion", "features", "drift", "offline", "learner", "prediction"):
            pid = int(pid_file(name, settings).read_text())
            wanted = 0 if name in ("learner", "prediction") else settings.service_nice
            assert nice_of(pid) == wanted, name
            assert autogroup_nice(pid) in (wanted, None), name
        first = int(pid_file("drift", settings).read_text())
        os.killpg(first, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, (tmp_path / "serve-all.log").read_text()
            try:
                if int(pid_file("drift", settings).read_text()) != first and httpx.get(url, timeout=1).status_code == 200:
                    break
            except (httpx.HTTPError, ValueError, OSError):
                pass
            time.sleep(0.5)
        text = " ".join((tmp_path / "serve-all.log").read_text().split())
        assert "drift: its process exited with -9; restarting it in 1 s" in text and "drift: restarted" in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.e2e
def test_serve_all_stopped_while_its_services_start_stops_them_too(settings, tmp_path):
    """A SIGTERM before the services are healthy (a service manager, a bench giving up) stops the
    services with `serve all`, instead of ending it alone and leaving them running."""
    from driftline.infra.stack import pid_alive

    names = ("ingestion", "features", "learner", "drift", "prediction", "offline")
    env = {**os.environ, **settings_env(settings)}
    log = open(tmp_path / "serve-all.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "driftline.cli", "serve", "all"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 60
        while len(pids) < len(names):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve-all.log").read_text()
            for name in names:
                try:
                    pids[name] = int(pid_file(name, settings).read_text())
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        assert "supervising them" not in (tmp_path / "serve-all.log").read_text()  # still starting
        os.kill(proc.pid, signal.SIGTERM)  # the supervisor alone: its services are in sessions of their own
        proc.wait(60)
        deadline = time.monotonic() + 5
        while any(pid_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [name for name, pid in pids.items() if pid_alive(pid)], (tmp_path / "serve-all.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids.values():
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)


def nice_of(pid: int) -> int:
    """A process's nice (field 19 of /proc/<pid>/stat)."""
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16])


def autogroup_nice(pid: int | str = "self") -> int | None:
    """The nice of a process's Linux autogroup; None without one: not Linux, autogroups not built
    in, or the init session's root group (its file is empty: e.g. a CI runner started by init)."""
    try:
        return parse_autogroup(open(f"/proc/{pid}/autogroup").read())
    except OSError:
        return None


def parse_autogroup(text: str | None) -> int | None:
    """`/autogroup-4 nice 7` -> 7; an empty file (the root group) or none -> None."""
    return int(text.split()[-1]) if text and text.split() else None


def test_a_service_off_the_critical_path_lowers_its_priority_and_only_its_own_sessions_group():
    code = ("import json, os, sys; from driftline.shared.process import lower_priority; "
            "p = '/proc/self/autogroup'; "
            "print(json.dumps([lower_priority(int(sys.argv[1])), os.nice(0), "
            "open(p).read() if os.path.exists(p) else None]))")
    def run(nice, **kw):
        out = subprocess.run([sys.executable, "-c", code, str(nice)], capture_output=True, text=True, check=True, **kw)
        lowered, now, group = json.loads(out.stdout)
        return [lowered, now, parse_autogroup(group)]
    own_group = os.path.exists("/proc/self/autogroup")
    # a session of its own (what serve all starts): the process and its scheduling group
    assert run(7, start_new_session=True) == [7, 7, 7 if own_group else None]
    # in the caller's session (a terminal's, or init's root group): the process only, never the
    # group it shares
    assert run(7) == [7, 7, autogroup_nice()]
    assert run(0, start_new_session=True)[:2] == [0, 0]


def test_the_compose_healthcheck_stops_the_service_after_n_failures_in_a_row(fakes, tmp_path):
    from driftline.infra.healthcheck import main

    fakes.start("svc")
    url = fakes.url("svc") + "/health"
    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for PID 1
    try:
        check = lambda: main([url, "2"], pid=service.pid, state_dir=str(tmp_path))  # noqa: E731
        fakes.status("svc", 503)
        assert check() == 1 and service.poll() is None
        fakes.status("svc", 200)
        assert check() == 0  # a success resets the count
        fakes.status("svc", 503)
        assert check() == 1 and service.poll() is None
        assert check() == 1
        assert service.wait(5) == -signal.SIGTERM
    finally:
        service.kill()


def test_the_compose_healthcheck_counts_failures_across_its_processes(fakes, tmp_path):
    """Docker runs each check as a new process: the count of failures must carry over."""
    fakes.start("svc")
    fakes.status("svc", 503)
    url = fakes.url("svc") + "/health"
    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for PID 1
    code = ("import sys; from driftline.infra.healthcheck import main; "
            f"sys.exit(main([{url!r}, '2'], pid={service.pid}, state_dir={str(tmp_path)!r}))")
    try:
        assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 1
        assert service.poll() is None
        assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 1
        assert service.wait(5) == -signal.SIGTERM
    finally:
        service.kill()
