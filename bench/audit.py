#!/usr/bin/python3
"""What audits by replay cost: a model on three worker processes, one stage
each, trained with --audit-rate 0.05 and with --audit-rate 0 (no audits, no
digests) in alternation on the same workers; prints the steady throughput of
each, the slow-down (goal: at most 7%), and the verifier's (the driver's) CPU
seconds per audited stage-step.

Every stage hashes (and keeps a copy of) its whole state, parameters and
moments, at every step, audited or not: the cost per step is proportional to
the parameters, the step's compute to parameters x batch. Two models show
both ends: gpt-5m (2,048 tokens a step: little state per FLOP) and the
Fashion-MNIST MLP at batch 128 (a lot of state per FLOP).

Usage: /usr/bin/python3 bench/audit.py --arceus BIN [--steps N] [--reps R] [--rate P] [--text PATH]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))

SLOWDOWN_GOAL = 0.07


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def start_worker(binary):
    p = subprocess.Popen([binary, "worker", "--listen", "127.0.0.1:0", "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        m = re.search(r"listening on (\S+)", line)
        if m:
            return p, m.group(1)
    raise SystemExit("worker did not start")


MODELS = {
    # name: (arguments, items per step, steps)
    "gpt-5m": (["--model", "configs/gpt-5m.json", "--batch", "16", "--micro-batches", "8", "--plan",
                "0-2,3-5,6-7"], 16 * 128, 24),
    "mlp-fashion": (["--model", "configs/mlp-fashion.json", "--batch", "128", "--micro-batches", "4", "--plan",
                     "0,1,2"], 128, 80),
}


def train(args, model, workers, rate, log):
    extra, items, steps = MODELS[model]
    data = ["--data", args.text] if model.startswith("gpt") else []
    cmd = [args.arceus, "train", *extra, *data, "--steps", str(args.steps or steps), "--eval-every", "0",
           "--eval-batches", "1", "--threads", "1", "--seed", "7",
           "--workers", workers, "--compress", "none", "--checkpoint-every", "0",
           "--audit-rate", str(rate), "--audit-seed", "3", "--log", log, "--quiet"]
    out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        print(out.stdout[-3000:])
        raise SystemExit("arceus train failed")
    rows = [json.loads(line) for line in open(log) if line.strip()]
    steps = [r for r in rows if "loss" in r and "val_loss" not in r]
    a, b = steps[args.warmup], steps[-1]
    rate_sps = (b["step"] - a["step"]) * items / (b["elapsed_s"] - a["elapsed_s"])
    audits = [r for r in rows if r.get("event") == "audits"]
    return rate_sps, audits[0] if audits else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arceus", required=True)
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: per model)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="gpt-5m,mlp-fashion")
    ap.add_argument("--text", default=os.environ.get("ARCEUS_TEXT",
                    os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.05)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    workers = [start_worker(args.arceus) for _ in range(3)]
    addrs = ",".join(a for _, a in workers)
    print(f"audit bench: 3 workers (1 thread each), --audit-rate {args.rate:g} against 0, {args.reps} runs "
          f"each, alternated; load average {load_average()}")
    try:
        for model in args.models.split(","):
            off, on, cpu, audited, failed, skipped = [], [], 0.0, 0, 0, 0
            for rep in range(args.reps):
                # alternated, so that a change of the machine's load falls on both
                r0, _ = train(args, model, addrs, 0, os.path.join(tmp, f"{model}-off{rep}.jsonl"))
                r1, a = train(args, model, addrs, args.rate, os.path.join(tmp, f"{model}-on{rep}.jsonl"))
                off.append(r0)
                on.append(r1)
                cpu += a["verifier_cpu_s"]
                audited += a["passed"] + a["failed"]
                failed += a["failed"]
                skipped += a["skipped"]
            m0, m1 = statistics.median(off), statistics.median(on)
            slow = 1 - m1 / m0
            unit = "tokens" if model.startswith("gpt") else "samples"
            print(f"{model} ({args.steps or MODELS[model][2]} steps a run):")
            print(f"  --audit-rate 0:    {m0:8.1f} {unit}/s (median; runs {', '.join(f'{r:.0f}' for r in off)})")
            print(f"  --audit-rate {args.rate:g}: {m1:8.1f} {unit}/s (median; runs "
                  f"{', '.join(f'{r:.0f}' for r in on)})")
            print(f"  slow-down {100 * slow:.1f}% (goal <= {100 * SLOWDOWN_GOAL:.0f}%): "
                  f"{'PASS' if slow <= SLOWDOWN_GOAL else 'FAIL'}")
            per = cpu / audited if audited else 0.0
            print(f"  verifier: {audited} stage-steps audited ({skipped} drawn but not replayable: a tied "
                  f"weight), {failed} failed, {per * 1000:.2f} ms CPU per audited stage-step")
    finally:
        for p, _ in workers:
            p.terminate()
            p.wait()
    print(f"load average at the end {load_average()}")

if __name__ == "__main__":
    main()
