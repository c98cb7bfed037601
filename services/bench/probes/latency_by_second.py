"""Latency by second of the stream: python lat2.py [rate] [seconds]"""
import sys, time
import numpy as np
from pathlib import Path
from driftline.bench import pipeline as P
rate = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 15
orig_close = P.PredictionSink.close
captured = {}
def close(self):
    captured["pub"], captured["lat"] = list(self.published_ms), list(self.latencies_ms)
    orig_close(self)
P.PredictionSink.close = close
with P.BenchStack(Path("/tmp/tp")) as b:
    b.replay(P.DEFAULT_MODEL, "raw", limit=5000, label_delay=100)  # warm the broker a little
    out = b.latency(rate, secs)
pub, lat = np.array(captured["pub"]), np.array(captured["lat"])
t = (pub - pub.min()) / 1000
for s in range(int(secs) + 1):
    m = (t >= s) & (t < s + 1)
    if m.any():
        print(f"second {s:2d}: n {m.sum():5d} p50 {np.percentile(lat[m], 50):7.1f} p95 {np.percentile(lat[m], 95):7.1f} max {lat[m].max():7.1f}")
print(out.get("latency_ms"), out.get("steady_latency_ms"))
