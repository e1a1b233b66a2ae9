#!/usr/bin/python3
"""How well `arceus provide --cpu-limit PCT` holds a provider that has work.

Usage: /usr/bin/python3 bench/cpu_limit.py --arceus PATH_TO_BINARY [--limit 40] [--seconds 20]

One market on loopback; then, one after the other in the same run, two
providers, each serving a renter that keeps it busy:
  * the baseline: `arceus provide` with no limit;
  * the limited:  `arceus provide --cpu-limit PCT`.
Each provider uses every core (--max-threads 0). Its renter is `arceus train
--market ... --devices 1` on the Fashion-MNIST MLP (configs/mlp-fashion.json)
at --batch (1024) with one thread of its own, so the provider holds the whole
model and computes every step. Once the renter's log shows its first steps,
the provider's process tree (it and every process below it, such as the
duty-cycling helper: utime + stime of /proc/PID/stat, plus the children it
has already reaped) is sampled every second for --seconds of wall time.

Prints for each: the share of the machine it used (CPU seconds / (wall
seconds x online CPUs)), the lowest and highest one-second share, the
renter's steps per second, and for the limited one which mechanism held it
(the provider says: its cgroup's cpu.max, or duty-cycling) and the share
against the limit; the load average before and after, and one JSON line.
Exits non-zero if a process fails, not if the limit is missed: it measures.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
TOKEN_RE = re.compile(r"^token: ([0-9a-f]{64})$", re.M)
MARKET_READY = re.compile(r"^arceus market: listening on (127\.0\.0\.1:\d+)$", re.M)
PROVIDER_READY = re.compile(r"^arceus provide: provider (\d+) serving on ", re.M)
TICK = os.sysconf("SC_CLK_TCK")
CPUS = os.sysconf("SC_NPROCESSORS_ONLN")


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Proc:
    """A process in the background, its output in files (never a pipe that
    could fill up and stop it)."""

    def __init__(self, folder, name, argv):
        self.name = name
        self.stdout, self.stderr = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.stdout, "w") as o, open(self.stderr, "w") as e:
            self.p = subprocess.Popen([str(a) for a in argv], stdout=o, stderr=e, stdin=subprocess.DEVNULL)
        self.pid = self.p.pid

    def out(self):
        return self.stdout.read_text(errors="replace")

    def err(self):
        return self.stderr.read_text(errors="replace")

    def wait_stdout(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.out())
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{self.name} did not print {pattern.pattern!r} (exit {self.p.poll()}):\n"
                         f"{self.out()[-2000:]}\n{self.err()[-2000:]}")

    def stop(self, timeout=30):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


def tree_cpu_s(root):
    """CPU seconds of root and of every process below it now (each one's
    utime + stime covers all its threads), plus root's reaped children's
    (cutime + cstime): a child that ended meanwhile still counts."""
    stats, children = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid, ppid = int(d), int(fields[1])
        stats[pid] = fields
        children.setdefault(ppid, []).append(pid)
    if root not in stats:
        return None
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        f = stats[pid]
        ticks += int(f[11]) + int(f[12])  # utime stime (fields 14, 15)
        if pid == root:
            ticks += int(f[13]) + int(f[14])  # cutime cstime
        todo += children.get(pid, [])
    return ticks / TICK


def steps_logged(log):
    try:
        return sum(1 for line in log.read_text().splitlines() if '"loss"' in line)
    except OSError:
        return 0


def add_account(arceus, db, name, credits):
    p = subprocess.run([arceus, "market", "add-account", name, "--db", db, "--credits", str(credits)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"add-account {name} failed: {p.stderr[-2000:]}")
    return TOKEN_RE.search(p.stdout).group(1)


def phase(args, folder, market, db, label, limit):
    owner = add_account(args.arceus, db, f"owner-{label}", 0)
    renter = add_account(args.arceus, db, f"renter-{label}", 1000000)
    extra = ["--cpu-limit", limit] if limit < 100 else []
    prov = Proc(folder, f"provide-{label}",
                [args.arceus, "provide", "--market", market, "--token", owner, "--max-threads", 0,
                 "--when", "always", "--on-battery", "yes", "--heartbeat", 1, "--grace", 1, *extra])
    train = None
    try:
        prov.wait_stdout(PROVIDER_READY, 120)
        out = prov.out()
        mechanism = ("cgroup cpu.max" if "by its cgroup" in out else
                     "duty-cycling" if "by duty-cycling" in out else "none")
        said = next((line for line in out.splitlines() if "CPU held to" in line), "")
        log = folder / f"train-{label}.jsonl"
        train = Proc(folder, f"train-{label}",
                     [args.arceus, "train", "--model", REPO / "configs/mlp-fashion.json", "--data", args.data,
                      "--batch", args.batch, "--steps", 1000000, "--eval-every", 0, "--threads", 1,
                      "--market", market, "--token", renter, "--devices", 1, "--log", log, "--quiet"])
        deadline = time.monotonic() + 180
        while steps_logged(log) < 3:
            if train.p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{label}: the renter did not start training (exit {train.p.poll()}):\n"
                                 f"{train.err()[-3000:]}")
            time.sleep(0.2)
        load_before = load_average()
        t0, c0, s0 = time.monotonic(), tree_cpu_s(prov.pid), steps_logged(log)
        shares, last_t, last_c = [], t0, c0
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1.0)
            t, c = time.monotonic(), tree_cpu_s(prov.pid)
            if c is None or train.p.poll() is not None:
                raise SystemExit(f"{label}: the provider or the renter stopped during the measure:\n"
                                 f"{prov.err()[-2000:]}\n{train.err()[-2000:]}")
            shares.append((c - last_c) / (t - last_t) / CPUS)
            last_t, last_c = t, c
        wall, cpu, steps = last_t - t0, last_c - c0, steps_logged(log) - s0
        return {"label": label, "limit_pct": limit, "mechanism": mechanism, "provider_said": said,
                "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cpus": CPUS,
                "share_pct": round(100 * cpu / wall / CPUS, 1),
                "min_1s_pct": round(100 * min(shares), 1), "max_1s_pct": round(100 * max(shares), 1),
                "steps_per_s": round(steps / wall, 2), "load_before": load_before, "load_after": load_average()}
    finally:
        if train is not None:
            train.stop()
        rc = prov.stop(60)
        if rc != 0:
            print(f"warning: provider {label} exited {rc}: {prov.err()[-1000:]}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arceus", required=True, help="the arceus binary (a release build)")
    ap.add_argument("--limit", type=int, default=40, help="--cpu-limit of the limited provider (1..99)")
    ap.add_argument("--seconds", type=float, default=20, help="wall seconds sampled per provider")
    ap.add_argument("--batch", type=int, default=1024, help="the renter's batch")
    ap.add_argument("--data", default=str(FASHION), help="Fashion-MNIST IDX folder")
    args = ap.parse_args()
    if not 1 <= args.limit < 100:
        ap.error("--limit must be 1..99")
    args.arceus = str(Path(args.arceus).resolve())
    print(f"cpu_limit bench: {CPUS} online CPUs, load average {load_average()}, "
          f"{args.seconds:g} s sampled per provider, renter at batch {args.batch}")
    with tempfile.TemporaryDirectory(prefix="arceus-cpu-limit-") as tmp:
        folder = Path(tmp)
        db = folder / "market.db"
        market = Proc(folder, "market", [args.arceus, "market", "--listen", "127.0.0.1:0", "--db", db])
        try:
            addr = market.wait_stdout(MARKET_READY, 60).group(1)
            results = [phase(args, folder, addr, db, "baseline", 100),
                       phase(args, folder, addr, db, "limited", args.limit)]
        finally:
            market.stop()
    print(f"\n{'provider':<10}{'limit':>7}{'machine share':>15}{'1-s min..max':>15}{'CPU s':>8}{'wall s':>8}"
          f"{'steps/s':>9}  load avg (before)")
    for r in results:
        lim = f"{r['limit_pct']}%" if r["limit_pct"] < 100 else "none"
        print(f"{r['label']:<10}{lim:>7}{r['share_pct']:>14.1f}%{r['min_1s_pct']:>7.1f}..{r['max_1s_pct']:<6.1f}"
              f"{r['cpu_s']:>8.2f}{r['wall_s']:>8.2f}{r['steps_per_s']:>9.2f}  {r['load_before']}")
    base, lim = results
    print(f"\nlimited provider: {lim['share_pct']:.1f}% of the machine against a limit of {lim['limit_pct']}% "
          f"({lim['share_pct'] - lim['limit_pct']:+.1f} points), held by {lim['mechanism']}")
    print(f"  it said: {lim['provider_said'].removeprefix('arceus provide: ')}")
    print(f"baseline (no limit): {base['share_pct']:.1f}% of the machine; the limit cost the renter "
          f"{100 * (1 - lim['steps_per_s'] / base['steps_per_s']) if base['steps_per_s'] else float('nan'):.0f}% "
          f"of its steps/s")
    print(f"load average at the end: {load_average()}")
    print(json.dumps({"bench": "cpu_limit", "results": results}))


if __name__ == "__main__":
    main()
