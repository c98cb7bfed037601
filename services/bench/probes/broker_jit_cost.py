"""The broker's CPU per event over repeated replays, split into its JIT compiler threads, its
request handlers (data-plane), its garbage collector and the rest, with the services' CPU per
event beside it:

    python broker_jit_cost.py RUNS ROWS                                  # the local stack as it is
    JVM_EXTRA=-XX:TieredStopAtLevel=4 python broker_jit_cost.py 8 10000  # with the optimising JIT
    JVM_GC=-XX:+UseG1GC python broker_jit_cost.py 4 10000                # with another collector

(Compare variants in alternating rounds, on a quiet machine.)

2026-12-07, 6 runs of 10,000 rows each way (serve all, the host's speed drifting during the first):
first tier only, request handlers 214 -> 125 µs per event and the compiler 25 -> 3; with the
optimising JIT, handlers 87-119 and the compiler still 28-43 in the last runs: at a like host
speed (the learner at ~215 µs per event) the broker's total was ~150 and ~155-165. The first tier
only stays.
"""
import sys, os, re, collections, json
from pathlib import Path
from driftline.bench import pipeline as P
from driftline.infra import stack
from driftline.replay.publish import replay
from driftline.replay.datasets import load
extra = os.environ.get("JVM_EXTRA", "").split()
gc = os.environ.get("JVM_GC")  # replaces the stack's -XX:+Use...GC
orig = stack.Kafka._java
stack.Kafka._java = lambda self, main, *a: (lambda cmd: [gc if gc and a.startswith("-XX:+Use") and a.endswith("GC") else a for a in cmd[:cmd.index('-cp')]] + extra + cmd[cmd.index('-cp'):])(orig(self, main, *a))
runs = int(sys.argv[1]); rows = int(sys.argv[2])
tck = os.sysconf("SC_CLK_TCK")
def threads(pid):
    out = collections.Counter()
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{t}/stat").read(); name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        except OSError: continue
        f = st.rpartition(")")[2].split()
        out["compiler" if "Compiler" in name else "data-plane" if "data-plane" in name else "gc" if ("GC" in name or "G1" in name or name == "VM Thread") else "other"] += (int(f[11]) + int(f[12])) / tck
    return out
with P.BenchStack(Path("/tmp/tp")) as b:
    for i in range(runs):
        s, pids = b.start(P.MODELS["logreg"], "raw")  # serve all: the supervisor and every service
        kpid = {name: pid for c in stack.components(b.settings) for name, pid in c.pids().items()}["kafka"]
        cb = {n: P.cpu_seconds(p) for n, p in pids.items()}
        before = threads(kpid)
        r = replay(s, load("elec2"), limit=rows, label_delay=P.THROUGHPUT_DELAY, model=P.MODELS["logreg"], features="raw", report_dir=None, stall_timeout_s=120, console=P.console)
        after = threads(kpid)
        cpu = {n: round((P.cpu_seconds(p) - cb[n]) * 1e6 / rows) for n, p in pids.items()}
        b.stop_services()
        print(json.dumps({"run": i, "ev_s": r["throughput_events_per_s"], "broker_us": {k: round((after[k] - before[k]) * 1e6 / rows) for k in after}, "services_us": cpu}), flush=True)
