#!/usr/bin/python3
"""Pipeline benchmark: two worker processes with one thread each
against one process with one thread, gpt-5m, batch 16 in 8 micro-batches,
1F1B; prints the speed-up (ideal 2 x 8/9 = 1.78x) and the measured bubble of
each stage next to the theoretical (S-1)/(M+S-1).

Usage: /usr/bin/python3 bench/pipeline.py --arceus BIN [--steps N] [--text PATH]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))


# The targets.
SPEEDUP_TARGET = 1.6
BUBBLE_MARGIN_PP = 5.0


def verdict(ok):
    return "PASS" if ok else "FAIL"


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def steady_rate(log, warmup):
    rows = [json.loads(l) for l in open(log) if l.strip()]
    steps = [r for r in rows if "loss" in r and "val_loss" not in r]
    a = [r for r in steps if r["step"] > warmup][0]
    b = steps[-1]
    tokens = (b["step"] - a["step"]) * 16 * 128
    return tokens / (b["elapsed_s"] - a["elapsed_s"])


def start_worker(binary):
    p = subprocess.Popen([binary, "worker", "--listen", "127.0.0.1:0", "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        m = re.search(r"listening on (\S+)", line)
        if m:
            return p, m.group(1)
    raise SystemExit("worker did not start")


def train(binary, text, steps, log, extra):
    cmd = [binary, "train", "--model", "configs/gpt-5m.json", "--data", text, "--steps", str(steps),
           "--batch", "16", "--micro-batches", "8", "--schedule", "1f1b", "--eval-every", "0",
           "--eval-batches", "1", "--log", log] + extra
    out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        print(out.stdout[-3000:])
        raise SystemExit("arceus train failed")
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arceus", required=True)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--text", default=os.environ.get("ARCEUS_TEXT",
                    os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    one = train(args.arceus, args.text, args.steps, os.path.join(tmp, "one.jsonl"), ["--threads", "1"])
    r1 = steady_rate(os.path.join(tmp, "one.jsonl"), args.warmup)
    workers = [start_worker(args.arceus) for _ in range(2)]
    try:
        out = train(args.arceus, args.text, args.steps, os.path.join(tmp, "two.jsonl"),
                    ["--threads", "1", "--workers", ",".join(a for _, a in workers)])
    finally:
        for p, _ in workers:
            p.terminate()
            p.wait(timeout=30)
    r2 = steady_rate(os.path.join(tmp, "two.jsonl"), args.warmup)
    print("load average %s (this machine is shared: figures drift with it)" % load_average())
    print("one process, 1 thread:       %7.0f tokens/s" % r1)
    print("two workers, 1 thread each:  %7.0f tokens/s" % r2)
    speedup = r2 / r1
    print("speed-up %.2fx (ideal 1.78x, required >= %.1fx): %s"
          % (speedup, SPEEDUP_TARGET, verdict(speedup >= SPEEDUP_TARGET)))
    stages = []
    for line in out.splitlines():
        if "predicted bubble" in line:
            print(line.strip())
        m = re.search(r"stage (\d+): busy .* bubble ([\d.]+)% \(theory ([\d.]+)%\)", line)
        if m:
            stage, bubble, theory = int(m.group(1)), float(m.group(2)), float(m.group(3))
            ok = bubble <= theory + BUBBLE_MARGIN_PP
            stages.append({"stage": stage, "bubble": bubble, "theory": theory, "pass": ok})
            print("%s; required <= theory + %.0f points: %s"
                  % (line.strip(), BUBBLE_MARGIN_PP, verdict(ok)))
    if not stages:
        raise SystemExit("arceus train printed no measured bubble")
    print(json.dumps({"one": r1, "two": r2, "speedup": speedup, "stages": stages,
                      "pass": speedup >= SPEEDUP_TARGET and all(s["pass"] for s in stages)}))


if __name__ == "__main__":
    main()
