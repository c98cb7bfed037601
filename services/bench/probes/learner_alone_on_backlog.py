"""The learner alone on a full backlog (features + labels.valid filled while it is SIGSTOPped):
python learner_alone_on_backlog.py [rows] [profile 0/1]. Prints its CPU share and outcomes every
0.5 s, then its rate and CPU µs per event, in all and per thread (Python's, librdkafka's rdk:*);
with 1, py-spy's collapsed stacks in /tmp/alone.txt; with DUMP=1, py-spy dumps of its threads
whenever it is under 40% busy (where it waits).

2026-12-06, 30,000 raw Elec2 rows, LR: ~5,000 events/s while it had work (~90% of a core, then
idle once all was learned), 179 µs of CPU per event: 172 in the Python thread, 6 in librdkafka's."""
import os, signal, sys, threading, time, uuid
from pathlib import Path
from driftline import serve
from driftline.bench import pipeline as P
from driftline.bench.predict import profile
from driftline.replay.publish import replay
from driftline.replay.datasets import load
from driftline.shared import kafka
from driftline.shared.settings import Ports
from driftline.shared.topics import Topics
from driftline.infra import stack
rows = int(sys.argv[1]) if len(sys.argv) > 1 else 30000
prof = len(sys.argv) > 2 and sys.argv[2] == "1"
with P.BenchStack(Path("/tmp/tp")) as b:
    s = b.settings.model_copy(update={"namespace": f"alone-{uuid.uuid4().hex[:6]}",
                                       "ports": Ports(**{n: stack.free_port() for n in Ports.model_fields})})
    kafka.ensure_topics(s)
    env = {"DRIFTLINE_LEARNER__MODEL": P.MODELS["logreg"], "DRIFTLINE_FEATURES__SET": "raw",
           "DRIFTLINE_LEARNER__LEASE_TTL_S": "120"}
    logs = b.home / "logs"; logs.mkdir(parents=True, exist_ok=True)
    started = {n: serve.start_service(n, env=env, log_path=logs / f"{n}.log", settings=s) for n in P.HOT_PATH}
    b.procs.extend(started.values())
    serve.wait_healthy(P.HOT_PATH, timeout=180, procs=started, settings=s)
    time.sleep(2)
    lp = started["learner"].pid
    os.kill(lp, signal.SIGSTOP)
    out = {}
    th = threading.Thread(target=lambda: out.update(r=replay(s, load("elec2"), limit=rows, label_delay=P.THROUGHPUT_DELAY,
                           model=P.MODELS["logreg"], features="raw", report_dir=None, stall_timeout_s=300, console=P.console)))
    th.start()
    t = Topics(s.namespace); c = kafka.consumer(s, "alone-probe")
    def total(topic):
        return sum(c.get_watermark_offsets(tp, timeout=5, cached=False)[1] for tp in kafka.partitions_of(s, topic))
    while total(t.features) < rows or total(t.labels_valid) < rows:
        time.sleep(0.5)
    time.sleep(1)
    spy = profile(lp, Path("/tmp/alone.txt"), seconds=120, fmt="raw") if prof else None
    def threads(pid):  # thread name -> CPU seconds (librdkafka's threads are rdk:*)
        out = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            stat = (task / "stat").read_text()
            name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out
    threads0 = threads(lp)
    cpu0 = P.cpu_seconds(lp); t0 = time.time()
    os.kill(lp, signal.SIGCONT)
    prev, last = cpu0, time.time()
    while th.is_alive():
        th.join(0.5)
        now_cpu = P.cpu_seconds(lp); now = time.time()
        print(f"t={now-t0:5.1f} learner cpu {100*(now_cpu-prev)/(now-last):3.0f}% outcomes {total(t.outcomes)}", flush=True)
        busy = (now_cpu - prev) / (now - last)
        prev, last = now_cpu, now
        if os.environ.get("DUMP") and now - t0 > 4 and busy < 0.4 and th.is_alive():  # where it waits
            import subprocess
            for _ in range(3):
                print(subprocess.run(["py-spy", "dump", "--pid", str(lp)], capture_output=True, text=True).stdout[-3000:], flush=True)
                time.sleep(0.15)
    dt = time.time() - t0; cpu = P.cpu_seconds(lp) - cpu0
    by_thread = threads(lp)
    print("CPU us/event by thread:", {n: round((c - threads0.get(n, 0.0)) * 1e6 / rows)
                                       for n, c in sorted(by_thread.items(), key=lambda kv: -kv[1])
                                       if c - threads0.get(n, 0.0) > 0.01})
    if spy: spy.send_signal(signal.SIGINT); spy.wait(30)
    print(f"learner alone: {rows/dt:.0f} ev/s over {dt:.2f} s (incl. replay's wait), CPU {cpu*1e6/rows:.0f} us/ev, acc {out['r']['prequential']['accuracy']:.4f}")
