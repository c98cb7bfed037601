"""`driftline bench soak`: the five services at a steady rate for a long while (20 minutes by
default), sampling every service's memory (RSS, from /proc) and consumer lag (its /metrics)
every few seconds; writes `reports/bench/soak.json` and the curves in `soak.png`.

The rate must be one the pipeline sustains on the machine (the lag then stays flat): the question
is whether memory levels off, not how fast it goes. The stream is river's SEA (variant 0, no
drift) over 1,000 entities, so the feature state and the snapshots reach their steady size.

    driftline bench soak                         # 20 minutes at 100 ev/s
    driftline bench soak --minutes 5 --rate 200
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx

from .. import serve
from ..infra import stack
from ..replay.datasets import Dataset
from ..replay.publish import replay
from ..shared import kafka
from ..shared.settings import Ports, Settings
from .pipeline import BenchStack, console

DEFAULT_MINUTES, DEFAULT_RATE, SAMPLE_S, ENTITIES = 20.0, 100.0, 5.0, 1000


def sea_rows(n: int) -> Dataset:
    def rows():
        import itertools

        from river.datasets import synth

        for i, (x, y) in enumerate(itertools.islice(synth.SEA(variant=0, seed=42), n)):
            yield {str(k): float(v) for k, v in x.items()}, str(int(y)), f"e{i % ENTITIES}"

    return Dataset("soak-sea", rows, n, (), 0, f"river SEA variant 0 over {ENTITIES} entities")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def lag_of(url: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("driftline_consumer_lag{"))


class SoakStack(BenchStack):
    def start(self, model: str, features: str) -> Settings:  # all five services, not the pipeline's three
        settings = self.settings.model_copy(update={
            "namespace": f"soak-{uuid.uuid4().hex[:6]}",
            "ports": Ports(**{name: stack.free_port() for name in Ports.model_fields}),
        })
        kafka.ensure_topics(settings)
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {"DRIFTLINE_LEARNER__MODEL": model, "DRIFTLINE_FEATURES__SET": features}
        self.started = {name: serve.start_service(name, env=env, log_path=logs / f"{name}.log", settings=settings)
                        for name in serve.SERVICES}
        self.procs.extend(self.started.values())
        with console.status("starting the five services"):
            serve.wait_healthy(serve.SERVICES, timeout=180, procs=self.started, settings=settings)
        return settings


def run(out_dir: Path, quick: bool, minutes: float | None = None, rate: float | None = None) -> dict:
    minutes = minutes if minutes is not None else (1.0 if quick else DEFAULT_MINUTES)
    rate = rate or DEFAULT_RATE
    samples: list[dict] = []
    with SoakStack() as st:
        from ..shared.settings import DEFAULT_MODEL

        settings = st.start(DEFAULT_MODEL, "default")
        urls = {name: f"http://{settings.host}:{settings.port_of(name)}" for name in serve.SERVICES}
        halt = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while True:
                row = {"t_s": round(time.monotonic() - t0, 1)}
                for name, proc in st.started.items():
                    row[name] = {"rss_mb": rss_mb(proc.pid), "lag": lag_of(urls[name])}
                samples.append(row)
                if halt.wait(SAMPLE_S):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            report = replay(settings, sea_rows(int(rate * minutes * 60)), rate=rate, label_delay=100,
                            model=DEFAULT_MODEL, features="default", report_dir=None, stall_timeout_s=120,
                            console=console)
            time.sleep(SAMPLE_S)  # one sample after the stream ends
        finally:
            halt.set()
            sampler.join(10)
    result = summarize(samples, minutes, rate, report)
    plot(samples, result, out_dir / "soak.png")
    return result


def summarize(samples: list[dict], minutes: float, rate: float, report: dict) -> dict:
    """Per service: RSS at start (after warm-up: the first sample past 10% of the run), at the
    middle and at the end, and the growth over the second half (levelled off = close to 0)."""
    services = [k for k in samples[0] if k != "t_s"] if samples else []
    out: dict = {"minutes": minutes, "rate_eps": rate, "sample_every_s": SAMPLE_S, "samples": samples,
                 "examples_learned": report.get("examples_learned"), "events_sent": report.get("events_sent"),
                 "throughput_events_per_s": report.get("throughput_events_per_s"), "services": {}}
    n = len(samples)
    for name in services:
        rss = [s[name]["rss_mb"] for s in samples if s[name]["rss_mb"] is not None]
        lag = [s[name]["lag"] for s in samples if s[name]["lag"] is not None]
        if not rss:
            continue
        warm, mid = rss[min(len(rss) - 1, n // 10)], rss[len(rss) // 2]
        out["services"][name] = {
            "rss_mb_after_warmup": round(warm, 1), "rss_mb_middle": round(mid, 1), "rss_mb_end": round(rss[-1], 1),
            "rss_mb_max": round(max(rss), 1), "rss_growth_second_half_mb": round(rss[-1] - mid, 1),
            "lag_max": max(lag) if lag else None, "lag_end": lag[-1] if lag else None,
        }
    return out


def plot(samples: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    minutes = [s["t_s"] / 60 for s in samples]
    for name in result["services"]:
        ax1.plot(minutes, [s[name]["rss_mb"] for s in samples], label=name)
        ax2.plot(minutes, [s[name]["lag"] for s in samples], label=name)
    ax1.set_xlabel("minutes")
    ax1.set_ylabel("RSS (MB)")
    ax1.set_title(f"memory at {result['rate_eps']:.0f} ev/s for {result['minutes']:g} min", fontsize=10)
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("messages")
    ax2.set_title("consumer lag", fontsize=10)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
