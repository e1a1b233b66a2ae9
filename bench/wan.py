#!/usr/bin/python3
"""Training over emulated home links (docs/DESIGN.md, "Slow links").

gpt-5m, batch 16 in 8 micro-batches, 1F1B, two workers with one thread each
(stages 0-3 and 4-7 by hand, so every row runs the same split). Each worker
sits behind bench/wan_relay, so the driver's link to stage 0 and the link
between the stages are both emulated; in one run:

  unshaped            the workers on loopback, --compress none (the baseline)
  20 Mbit/s none      20 Mbit/s each way, 20 ms one way (40 ms round trip)
  20 Mbit/s auto      the same, --compress auto (the default)
  20 Mbit/s int8      the same, --compress int8
  100 Mbit/s none     100 Mbit/s each way, 25 ms one way (50 ms round trip)
  100 Mbit/s auto

The baseline runs first and last (their mean is the reference). Each row:
steady tokens/s (after --warmup steps), the codec the plan chose for
the link between the stages, and that link's frame bytes per step as counted
(--log) and as the plan predicted. Targets: 20 Mbit/s auto >= 0.8x unshaped;
int8 moves >= 3.5x fewer bytes per step than none over the emulated links,
counted within 5% of the prediction. Prints the load average: the machine is
shared, so only figures of one run compare.

Usage: /usr/bin/python3 bench/wan.py --arceus BIN [--relay BIN] [--steps N] [--text PATH]
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

AUTO_TARGET = 0.8
INT8_FEWER = 3.5
PREDICTION_TOLERANCE = 0.05
PLAN = "0-3,4-7"


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def verdict(ok):
    return "PASS" if ok else "FAIL"


def listening(p, what):
    for line in p.stdout:
        m = re.search(r"listening on (\S+:\d+)", line)
        if m:
            return m.group(1)
    raise SystemExit(f"{what} did not start")


def start_worker(binary):
    p = subprocess.Popen([binary, "worker", "--listen", "127.0.0.1:0", "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p, listening(p, "arceus worker")


def start_relay(relay, to, delay_ms, mbit):
    p = subprocess.Popen([relay, "--listen", "127.0.0.1:0", "--to", to, "--delay-ms", str(delay_ms),
                          "--rate-mbit", str(mbit)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p, listening(p, "wan_relay")


def train(binary, text, steps, log, workers, compress):
    cmd = [binary, "train", "--model", "configs/gpt-5m.json", "--data", text, "--steps", str(steps),
           "--batch", "16", "--micro-batches", "8", "--schedule", "1f1b", "--eval-every", "0",
           "--eval-batches", "1", "--threads", "1", "--workers", ",".join(workers), "--plan", PLAN,
           "--compress", compress, "--log", log]
    out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        print(out.stdout[-3000:])
        raise SystemExit("arceus train failed")
    return out.stdout


def measure(log, stdout, warmup):
    rows = [json.loads(l) for l in open(log) if l.strip()]
    steps = [r for r in rows if "loss" in r and "val_loss" not in r]
    a, b = [r for r in steps if r["step"] > warmup][0], steps[-1]
    rate = (b["step"] - a["step"]) * 16 * 128 / (b["elapsed_s"] - a["elapsed_s"])
    # bytes: the steady steps but the last (the driver sends each batch during
    # the step before it, so the last step's window sends none: the same
    # number of steps and batches)
    steady = [r for r in steps if r["step"] > warmup][:-1]
    nlinks = len(steady[0]["links"])
    # per link: [down, down as float32, up, up as float32] bytes, steady steps' mean
    links = [[sum(r["links"][e][k] for r in steady) / len(steady) for k in range(4)] for e in range(nlinks)]
    predicted, codecs, figures = [], [], []
    for m in re.finditer(r"link (\S+) -> (\S+) \((\w+)\): .*?predicted ([\d.]+) MB, ([\d.]+) MB", stdout):
        codecs.append(m.group(3))
        predicted.append((float(m.group(4)) * 1e6, float(m.group(5)) * 1e6))
    for m in re.finditer(r"^(\S+) -> (\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(none|bf16|int8)\s", stdout, re.M):
        figures.append((float(m.group(3)), float(m.group(4)), float(m.group(5))))
    flight = re.search(r"^0\s+\S+\s+.*?\s(\d+(?: \(\+\d+\))?)\s*$", stdout, re.M)
    return {"tokens_per_s": rate, "links": links, "predicted": predicted, "codecs": codecs,
            "measured_links": figures, "stage0_in_flight": flight.group(1) if flight else "?"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arceus", required=True)
    ap.add_argument("--relay", default=os.path.join(REPO, "build", "release", "bench", "wan_relay"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--text", default=os.environ.get("ARCEUS_TEXT",
                    os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")))
    args = ap.parse_args()
    if not os.access(args.relay, os.X_OK):
        raise SystemExit(f"{args.relay} is not built (make build/release/bench/wan_relay)")
    tmp = tempfile.mkdtemp()
    print("load average %s at the start" % load_average())
    workers = [start_worker(args.arceus) for _ in range(2)]
    procs = [p for p, _ in workers]
    results = {}

    def row(name, addrs, compress):
        log = os.path.join(tmp, name.replace(" ", "_").replace("/", "") + ".jsonl")
        out = train(args.arceus, args.text, args.steps, log, addrs, compress)
        results[name] = measure(log, out, args.warmup)
        r = results[name]
        link = r["links"][-1]
        fig = r["measured_links"][-1] if r["measured_links"] else None
        print("%-18s %8.0f tokens/s   link 0->1 %-4s %7.3f MB/step (float32 %7.3f)%s   stage 0 in flight %s"
              % (name, r["tokens_per_s"], r["codecs"][-1] if r["codecs"] else "?", (link[0] + link[2]) / 1e6,
                 (link[1] + link[3]) / 1e6,
                 "   measured %.2f/%.2f MB/s, RTT %.1f ms" % fig if fig else "", r["stage0_in_flight"]), flush=True)

    try:
        plain = [a for _, a in workers]
        # the baseline before and after the shaped rows: how much the
        # machine's load moved during the run shows between the two
        row("unshaped", plain, "none")
        for mbit, one_way, names in ((20, 20, ("none", "auto", "int8")), (100, 25, ("none", "auto"))):
            relays = [start_relay(args.relay, a, one_way, mbit) for a in plain]
            procs += [p for p, _ in relays]
            for compress in names:
                row("%d Mbit/s %s" % (mbit, compress), [a for _, a in relays], compress)
            for p, _ in relays:
                p.terminate()
                p.wait(timeout=30)
        row("unshaped again", plain, "none")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)

    print("load average %s at the end (this machine is shared: figures drift with it)" % load_average())
    base = (results["unshaped"]["tokens_per_s"] + results["unshaped again"]["tokens_per_s"]) / 2
    ratio = results["20 Mbit/s auto"]["tokens_per_s"] / base
    ok_speed = ratio >= AUTO_TARGET
    print("20 Mbit/s auto: %.2fx the unshaped tokens/s (required >= %.1fx): %s; none: %.2fx"
          % (ratio, AUTO_TARGET, verdict(ok_speed), results["20 Mbit/s none"]["tokens_per_s"] / base))
    print("100 Mbit/s auto: %.2fx; none: %.2fx" % (results["100 Mbit/s auto"]["tokens_per_s"] / base,
                                                   results["100 Mbit/s none"]["tokens_per_s"] / base))

    def wan_bytes(name):  # both emulated links, both directions, per step
        return sum(l[0] + l[2] for l in results[name]["links"])

    fewer = wan_bytes("20 Mbit/s none") / wan_bytes("20 Mbit/s int8")
    ok_fewer = fewer >= INT8_FEWER
    print("int8 moves %.2fx fewer bytes per step than none over the emulated links (required >= %.1fx): %s"
          % (fewer, INT8_FEWER, verdict(ok_fewer)))
    # counted against predicted: each link's bytes per step, both ways (the
    # summary prints the prediction to 100 bytes)
    ok_pred = True
    for name in ("20 Mbit/s none", "20 Mbit/s int8", "20 Mbit/s auto"):
        r = results[name]
        for e, (link, (pd, pu)) in enumerate(zip(r["links"], r["predicted"])):
            got, want = link[0] + link[2], pd + pu
            err = abs(got - want) / want
            ok = err <= PREDICTION_TOLERANCE or abs(got - want) <= 200
            ok_pred &= ok
            print("  %-15s link %d: counted %.4f / %.4f MB down / up per step, predicted %.4f / %.4f (%.2f%%): %s"
                  % (name, e, link[0] / 1e6, link[2] / 1e6, pd / 1e6, pu / 1e6, 100 * err, verdict(ok)))
    print(json.dumps({"unshaped": base, "rows": {k: v["tokens_per_s"] for k, v in results.items()},
                      "auto_ratio": ratio, "int8_fewer": fewer, "load": load_average(),
                      "pass": ok_speed and ok_fewer and ok_pred}))


if __name__ == "__main__":
    main()
