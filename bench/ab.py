#!/usr/bin/python3
"""A/B: two arceus binaries (or two option sets) trained alternately on the same model,
so that load from other work on a shared machine falls on both.

Usage: /usr/bin/python3 bench/ab.py --a BIN_A --b BIN_B [--model configs/gpt-5m.json]
           [--batch 16] [--steps 12] [--warmup 2] [--threads 2] [--rounds 4]
           [--a-args "..."] [--b-args "..."]

Each round runs A then B (B then A in odd rounds); each run's figure is the median
of its steps' step_s after the warm-up, and the CPU time the whole run took per
step (with one thread, the steadier figure when other work takes turns on the
cores). Prints every run, the load average, and the median over rounds of B's
time over A's (below 1: B is faster).
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run(binary, args, model, data, batch, steps, warmup, threads):
    with tempfile.TemporaryDirectory(prefix="arceus-ab-") as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [binary, "train", "--model", model, "--steps", str(steps), "--batch", str(batch),
               "--threads", str(threads), "--eval-every", "0", "--eval-batches", "1", "--quiet",
               "--log", log] + (["--data", data] if data else []) + args
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
        cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / steps
        rows = [json.loads(line) for line in open(log) if line.strip()]
    steps = [r for r in rows if "loss" in r and "val_loss" not in r]
    dts = [r["step_s"] for r in steps if "step_s" in r and r["step"] > warmup]
    if not dts:  # a binary from before step_s: the gaps between steps
        dts = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:]) if a["step"] >= warmup]
    return statistics.median(dts), cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--a-args", default="")
    ap.add_argument("--b-args", default="")
    ap.add_argument("--model", default="configs/gpt-5m.json")
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    with open(os.path.join(REPO, args.model) if not os.path.isabs(args.model) else args.model) as f:
        spec = json.load(f)
    data = args.data if spec["type"] == "gpt" else None
    per_step = args.batch * (spec["block_size"] if spec["type"] == "gpt" else 1)
    ratios, cpu_ratios = [], []
    print(f"load average at start: {load_average()}")
    for rnd in range(args.rounds):
        res = {}
        order = ("a", "b") if rnd % 2 == 0 else ("b", "a")
        for side in order:
            binary = os.path.abspath(getattr(args, side))
            extra = shlex.split(getattr(args, side + "_args"))
            res[side] = run(binary, extra, args.model, data, args.batch, args.steps, args.warmup, args.threads)
        (ta, ca), (tb, cb) = res["a"], res["b"]
        ratios.append(tb / ta)
        cpu_ratios.append(cb / ca)
        print(f"round {rnd + 1}: A {1e3 * ta:.1f} ms/step ({per_step / ta:,.0f}/s, CPU {1e3 * ca:.0f} ms/step), "
              f"B {1e3 * tb:.1f} ms/step ({per_step / tb:,.0f}/s, CPU {1e3 * cb:.0f} ms/step), "
              f"B/A {ratios[-1]:.3f}, CPU B/A {cpu_ratios[-1]:.3f}  (load {load_average()})", flush=True)
    print(f"B/A time, median of {len(ratios)} rounds: {statistics.median(ratios):.3f} "
          f"(B is {1 / statistics.median(ratios):.2f}x A's speed); CPU time per step (whole run, "
          f"start-up included) B/A {statistics.median(cpu_ratios):.3f}")


if __name__ == "__main__":
    main()
