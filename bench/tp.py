#!/usr/bin/python3
"""Tensor-parallel benchmark, gpt-5m, batch 16 in 8 micro-batches:

(a) the bytes a group of two `arceus worker --threads 1` processes moves per
    training step (plan "0-7@0+1": every layer on the group, the second
    worker holding half of every block's heads and MLP units), as counted by
    the leader's links (frame bytes, both directions), against the planner's
    prediction: PASS within 10%. Where the kernel lets it (unshare -rn), the
    run has a network namespace of its own, and the bytes its loopback
    interface carried (TCP/IP, HTTP/2 and gRPC framing included; the whole
    run, setup and the final evaluation too) are printed beside them.
(b) the step time of that group against one worker process with one thread
    (same batch), after warm-up steps: the speed-up, whatever it is, with the
    machine's load average (a shared machine slows both runs unevenly).

Usage: /usr/bin/python3 bench/tp.py --arceus BIN [--steps N] [--warmup N] [--text PATH]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from pipeline import start_worker, train  # noqa: E402  (same workers, same training command)

BATCH, MICRO = 16, 8


def step_seconds(log, warmup):
    """Mean wall time of the steps after the first `warmup`."""
    rows = [json.loads(l) for l in open(log) if l.strip()]
    steps = [r for r in rows if "loss" in r and "val_loss" not in r]
    a = [r for r in steps if r["step"] == warmup][0]
    b = steps[-1]
    return (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])


def loopback_bytes():
    """Bytes sent through lo (each byte is received once by it too)."""
    for line in open("/proc/net/dev"):
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return None


def run_on_workers(args, n, extra, log):
    workers = [start_worker(args.arceus) for _ in range(n)]
    try:
        lo0 = loopback_bytes()
        out = train(args.arceus, args.text, args.steps, log,
                    ["--threads", "1", "--workers", ",".join(a for _, a in workers)] + extra)
        lo1 = loopback_bytes()
    finally:
        for p, _ in workers:
            p.terminate()
            p.wait(timeout=30)
    return out, (lo1 - lo0 if lo0 is not None and lo1 is not None else None)


def load():
    return "load average %.2f, %.2f, %.2f on %d cores" % (*os.getloadavg(), os.cpu_count())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arceus", required=True)
    ap.add_argument("--steps", type=int, default=23)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--text", default=os.environ.get("ARCEUS_TEXT",
                    os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")))
    ap.add_argument("--own-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.arceus = os.path.abspath(args.arceus)
    args.text = os.path.abspath(args.text)
    if not args.own_netns and shutil.which("unshare") and \
            subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        # the same benchmark in a network namespace of its own: its loopback
        # carries only this run's traffic
        os.execvp("unshare", ["unshare", "-rn", sys.executable, os.path.abspath(__file__),
                              "--own-netns", *sys.argv[1:]])
    own_lo = args.own_netns and subprocess.run(["ip", "link", "set", "lo", "up"]).returncode == 0
    if args.own_netns and not own_lo:
        raise SystemExit("cannot bring up lo in the benchmark's network namespace")

    tmp = tempfile.mkdtemp()
    load_before = load()
    one, _ = run_on_workers(args, 1, [], os.path.join(tmp, "one.jsonl"))
    t1 = step_seconds(os.path.join(tmp, "one.jsonl"), args.warmup)
    two, lo = run_on_workers(args, 2, ["--plan", "0-7@0+1"], os.path.join(tmp, "two.jsonl"))
    t2 = step_seconds(os.path.join(tmp, "two.jsonl"), args.warmup)
    load_after = load()

    m = re.search(r"tensor-parallel traffic: ([\d.]+) MB per step \(predicted ([\d.]+) MB\)", two)
    if not m:
        print(two[-3000:])
        raise SystemExit("the driver printed no tensor-parallel traffic")
    measured, predicted = float(m.group(1)), float(m.group(2))
    ratio = measured / predicted
    print("gpt-5m, batch %d in %d micro-batches, %d steps (timed after %d)" % (BATCH, MICRO, args.steps,
                                                                             args.warmup))
    print("(a) group of 2 workers, plan 0-7@0+1: %.3f MB per step counted by the leader's links, "
          "%.3f MB predicted: ratio %.4f  %s (within 10%%)" % (measured, predicted, ratio,
                                                               "PASS" if abs(ratio - 1) <= 0.10 else "FAIL"))
    if lo is not None and own_lo:
        print("    loopback of the run's own network namespace: %.3f MB per step, %.3f of the prediction (the "
              "whole run / %d steps, with TCP/IP, HTTP/2, gRPC framing, setup and the final evaluation)"
              % (lo / args.steps / 1e6, lo / args.steps / 1e6 / predicted, args.steps))
    else:
        print("    (no network namespace of its own: loopback bytes not measured)")
    print("(b) one worker, 1 thread:          %.3f s per step" % t1)
    print("    group of 2 workers, 1 thread:  %.3f s per step" % t2)
    print("    speed-up %.2fx (ideal 2x, less the group's transfers and the unsplit layers)" % (t1 / t2))
    print("    %s before, %s after" % (load_before, load_after))
    print(json.dumps({"traffic_mb": measured, "predicted_mb": predicted, "ratio": ratio,
                      "loopback_mb_per_step": lo / args.steps / 1e6 if lo is not None and own_lo else None,
                      "one_s": t1, "two_s": t2, "speedup": t1 / t2}))
    if abs(ratio - 1) > 0.10:
        raise SystemExit("FAIL: measured traffic is %.1f%% off the prediction" % (100 * abs(ratio - 1)))


if __name__ == "__main__":
    main()
