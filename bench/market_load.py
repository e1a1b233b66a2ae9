#!/usr/bin/env python3
"""Load on one market over SQLite: 2,000 simulated providers heartbeating
every 5 s and 100 renters each reporting 10 steps/s (ReportUsage on a real
lease), for --seconds (60). Prints per-RPC p50/p99 latency, the calls
offered and served, errors, the market's memory (RSS, /proc) and database
size, and checks: no errors, p99 at most 100 ms for each RPC, every offered
call served, the ledger sums to zero, every step paid once. Exits 1 when a
check fails (`make bench` fails then).

Then (unless --no-hostile) the same load once more while 300 hostile
connections are held open from as many 127.x.y.z addresses (stalled HTTP/2
calls: HEADERS and never a request, opened again whenever the market ends
one), and 300 slow dashboard sockets (half a request line each): the honest
clients must meet the same targets, and the dashboard must keep answering.

This script sets the market up (accounts, providers registered, a lease per
renter; grpc.aio with hand-encoded protobuf, tests/e2e/pbwire.py) and runs
the attack and the dashboard's reader; the honest load itself comes from
bench/market_loadgen.c (built by `make bench`), one C process on one gRPC
completion queue: a Python event loop on the market's two cores cost half a
core at this rate and its own delays showed up as the market's latency. A
provider waits for its Heartbeat and sleeps to its next beat; a renter
reports its next step when due, like the driver's reporter. The honest
clients share --sources (64) connections, each from a loopback address of
its own (127.30.y.z), so the market sees 64 client hosts, as it would see
many machines, and its limit of 64 calls open per host applies to each of
them, not to the whole load.
"""

import argparse
import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from h2stall import StalledCalls, slow_sockets, source_addresses  # noqa: E402
from pbwire import acquire, decode, field_bytes, field_double, field_varint  # noqa: E402

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

PROVIDERS_PER_ACCOUNT = 16  # the market's default limit of providers per account
TOKEN_RE = re.compile(r"^token: ([0-9a-f]{64})$", re.M)


def profile(gflops=150.0, mem=8 << 30, cores=2, price=500000):
    return field_double(1, gflops) + field_varint(2, mem) + field_varint(3, cores) + field_varint(4, price)


def add_account(arceus, db, name, credits):
    p = subprocess.run([arceus, "market", "add-account", name, "--db", db, "--credits", str(credits)],
                       capture_output=True, text=True, check=True)
    return TOKEN_RE.search(p.stdout).group(1)


class Stats:
    def __init__(self):
        self.lat = {}
        self.errors = {}
        self.first_error = {}

    def ok(self, rpc, dt):
        self.lat.setdefault(rpc, []).append(dt)

    def err(self, rpc, e):
        self.errors[rpc] = self.errors.get(rpc, 0) + 1
        self.first_error.setdefault(rpc, repr(e)[:300])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def rss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid):
    """CPU time (user + system, every thread) a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def fsync_ms(folder, n=50):
    """What one synchronous write costs in the database's folder: SQLite
    (synchronous=FULL) syncs its log at every commit, and the market commits
    its Heartbeats and ReportUsages in groups, a sync per group."""
    path = Path(folder) / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        return (time.perf_counter() - t0) / n * 1e3
    finally:
        os.close(fd)
        path.unlink()


def db_bytes(db, suffix=""):
    return os.path.getsize(db + suffix) if os.path.exists(db + suffix) else 0


class Market:
    def __init__(self, arceus, db):
        # The simulated providers have no workers: the market must not dial
        # them (--reach-timeout 0), and their addresses are loopback ones
        # anyway, so nothing here can reach beyond this machine. On a busy
        # machine the setup (2,000 registrations, then a beat each, then the
        # leases) takes longer than the default 15 s of silence after which a
        # provider is offline: 60 s here (the providers beat every 5 s).
        self.proc = subprocess.Popen([arceus, "market", "--listen", "127.0.0.1:0", "--db", db,
                                      "--http", "127.0.0.1:0", "--reach-timeout", "0", "--offline-after", "60"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addr = self.http_port = None
        for _ in range(2):
            line = self.proc.stdout.readline()
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            self.addr = m.group(1) if m else self.addr
            m = re.search(r"dashboard on http://127\.0\.0\.1:(\d+)/", line)
            self.http_port = int(m.group(1)) if m else self.http_port
        if not self.addr or not self.http_port:
            self.proc.kill()
            raise SystemExit(f"market did not start: {self.proc.communicate()[1][-2000:]}")
        # the market's stderr is drained (an attack makes it log)
        self.log = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def setup(ch, arceus, db, n_providers, n_renters):
    """Accounts, providers registered, and one single-device lease per renter."""
    n_owner_accounts = (n_providers + PROVIDERS_PER_ACCOUNT - 1) // PROVIDERS_PER_ACCOUNT
    owners = [add_account(arceus, db, f"owner{i}", 0) for i in range(n_owner_accounts)]
    renters = [add_account(arceus, db, f"renter{i}", 100000) for i in range(n_renters)]
    register = ch.unary_unary("/arceus.Market/RegisterProvider")
    # 16 at once: the market counts a call against its host (64 at most)
    # until its status is out, a little after this client has its answer
    sem = asyncio.Semaphore(16)

    async def reg(i):
        async with sem:
            tok = owners[i // PROVIDERS_PER_ACCOUNT]
            r = decode(await register(field_bytes(1, tok) + field_bytes(2, f"127.{1 + i // 250}.{i % 250}.1:7001") +
                                      field_bytes(3, profile()), timeout=30))
            return tok, r[1][0]

    providers = await asyncio.gather(*(reg(i) for i in range(n_providers)))
    # registering takes longer than the market's offline limit: one beat each first
    hb = ch.unary_unary("/arceus.Market/Heartbeat")

    async def beat(tok, pid):
        async with sem:
            await hb(field_bytes(1, tok) + field_varint(2, pid), timeout=30)

    await asyncio.gather(*(beat(tok, pid) for tok, pid in providers))
    lease = ch.unary_unary("/arceus.Market/AcquireLease")
    leases = []
    for tok in renters:
        r = decode(await lease(acquire(tok, devices=1, est_steps=1000), timeout=30))
        leases.append((r[1][0], r[3][0].decode(), decode(r[5][0])[1][0]))
    return providers, leases


def dashboard_get(port):
    import socket
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        return data.startswith(b"HTTP/1.1 200"), time.perf_counter() - t0
    except OSError:
        return False, time.perf_counter() - t0


async def dashboard_loop(port, end, stats):
    while time.monotonic() < end:
        ok, dt = await asyncio.to_thread(dashboard_get, port)
        if ok:
            stats.ok("dashboard GET", dt)
        else:
            stats.err("dashboard GET", "no 200")
        await asyncio.sleep(1.0)


async def run_load(market, providers, leases, seconds, paid, sources, loadgen):
    """The honest load for `seconds`: market_loadgen makes the calls; the
    dashboard is read once a second and the market's RSS sampled meanwhile.
    Returns (stats, the generator's report, RSS samples); paid is updated
    with each lease's next step."""
    stats = Stats()
    clients = [f"H {tok} {pid}" for tok, pid in providers]
    clients += [f"R {lt} {pid} {paid.get(lt, 0)}" for _, lt, pid in leases]
    proc = await asyncio.create_subprocess_exec(
        loadgen, "--target", market.addr, "--seconds", str(seconds), "--sources", str(sources),
        "--source-net", "30", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    end = time.monotonic() + seconds
    rss = []

    async def sample():
        while time.monotonic() < end:
            rss.append(rss_kb(market.proc.pid))
            await asyncio.sleep(1.0)

    cpu0 = cpu_s(market.proc.pid)
    (out, err), _, _ = await asyncio.gather(proc.communicate(("\n".join(clients) + "\n").encode()),
                                            dashboard_loop(market.http_port, end, stats), sample())
    if proc.returncode != 0:
        raise SystemExit(f"market_loadgen failed ({proc.returncode}): {err.decode()[-2000:]}")
    gen = json.loads(out)
    gen["market_cpu_s"] = cpu_s(market.proc.pid) - cpu0
    for (_, lt, _), step in zip(leases, gen["steps"]):
        paid[lt] = step
    return stats, gen, rss


def check_books(db, leases, paid):
    con = sqlite3.connect(db)
    try:
        total, = con.execute("SELECT COALESCE(SUM(amount), 0) FROM ledger").fetchone()
        # every (job, step, stage) paid once: one usage row each, and one
        # transfer of two legs (renter -> provider) for each
        dup, = con.execute("SELECT COUNT(*) FROM (SELECT job_id, step, COUNT(DISTINCT transfer_id) n FROM ledger "
                           "WHERE reason = 'usage' GROUP BY job_id, step HAVING n != 1)").fetchone()
        steps = dict(con.execute("SELECT job_id, COUNT(*) FROM usage GROUP BY job_id").fetchall())
    finally:
        con.close()
    missing = sum(1 for job, lt, _ in leases if steps.get(job, 0) != paid.get(lt, 0))
    return total, dup, missing, sum(paid.values())


def report(title, stats, gen, rss, db, books, args, load_before):
    print(f"\n== {title} ==")
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"{'rpc':<14}{'offered':>9}{'served':>9}{'per s':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    ok = True
    worst_p99 = 0.0
    offered = served = 0
    for k in gen["kinds"]:
        offered += k["offered"]
        served += k["calls"]
        worst_p99 = max(worst_p99, k["p99_ms"])
        ok &= k["errors"] == 0 and k["calls"] >= k["offered"] and 0 <= k["p99_ms"] <= args.p99_ms
        print(f"{k['rpc']:<14}{k['offered']:>9}{k['calls']:>9}{k['calls'] / gen['seconds']:>8.1f}"
              f"{k['p50_ms']:>9.2f}{k['p99_ms']:>9.2f}{k['max_ms']:>9.2f}{k['errors']:>8}")
        if k["first_error"]:
            print(f"  first {k['rpc']} error: {k['first_error']}")
    xs = stats.lat.get("dashboard GET", [])
    print(f"{'dashboard GET':<14}{'':>9}{len(xs):>9}{len(xs) / gen['seconds']:>8.1f}{pct(xs, 0.5) * 1e3:>9.2f}"
          f"{pct(xs, 0.99) * 1e3:>9.2f}{(max(xs) * 1e3 if xs else float('nan')):>9.2f}"
          f"{stats.errors.get('dashboard GET', 0):>8}")
    errors = sum(k["errors"] for k in gen["kinds"]) + sum(stats.errors.values())
    lag = max(k["lag_p99_ms"] for k in gen["kinds"])
    print(f"served {served} of {offered} calls offered in {gen['seconds']:.0f} s ({served / gen['seconds']:.1f}/s); "
          f"the load generator used {gen['cpu_s']:.1f} s of CPU and started its calls at most "
          f"{lag:.1f} ms late (p99)")
    if lag > 10:
        print(f"  (the generator itself started calls {lag:.0f} ms late: this machine is busy, and its "
              f"scheduling delays are in the latencies above)")
    print(f"the market used {gen['market_cpu_s']:.1f} s of CPU ({gen['market_cpu_s'] / gen['elapsed'] * 100:.0f}% "
          f"of a core, {gen['market_cpu_s'] / max(served, 1) * 1e6:.0f} us per call served)")
    print(f"market RSS: max {max(rss or [0]) / 1024:.1f} MiB, at the end {(rss or [0])[-1] / 1024:.1f} MiB; "
          f"database {db_bytes(db) / 2**20:.1f} MiB, its WAL {db_bytes(db, '-wal') / 2**20:.1f} MiB")
    total, dup, missing, steps = books
    print(f"ledger sum {total}; steps paid {steps}; (job, step) paid other than once: {dup}; "
          f"jobs whose paid steps differ from the reports: {missing}")
    ok &= errors == 0 and total == 0 and dup == 0 and missing == 0
    print("check:", "PASS" if ok else "FAIL",
          f"(errors {errors}, worst p99 {worst_p99:.1f} ms <= {args.p99_ms:.0f}, served {served} of {offered}, "
          f"ledger sum {total}, duplicates {dup}, mismatched jobs {missing})")
    return ok


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arceus", default=str(REPO / "bin" / "arceus"))
    ap.add_argument("--loadgen", default=str(REPO / "build" / "release" / "bench" / "market_loadgen"),
                    help="the load generator (make build/release/bench/market_loadgen)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--providers", type=int, default=2000)
    ap.add_argument("--renters", type=int, default=100)
    ap.add_argument("--hostile", type=int, default=300, help="hostile connections in the second run")
    ap.add_argument("--no-hostile", action="store_true", help="run the load once, without the attack")
    ap.add_argument("--sources", type=int, default=64,
                    help="client hosts (loopback addresses, a connection each) the honest clients are spread over")
    ap.add_argument("--p99-ms", type=float, default=100.0)
    ap.add_argument("--db-dir", default=None,
                    help="folder for the database (default: the system's temporary folder; /dev/shm "
                         "takes the disk's fsync out of the figures)")
    args = ap.parse_args()
    if not os.access(args.loadgen, os.X_OK):
        raise SystemExit(f"{args.loadgen} is missing: make build/release/bench/market_loadgen")
    with tempfile.TemporaryDirectory(prefix="market-load-", dir=args.db_dir) as tmp:
        db = str(Path(tmp) / "market.db")
        t0 = time.monotonic()
        add_account(args.arceus, db, "bootstrap", 0)  # creates the database
        market = Market(args.arceus, db)
        ok = True
        try:
            async with aio.insecure_channel(market.addr) as ch:
                providers, leases = await setup(ch, args.arceus, db, args.providers, args.renters)
            print(f"database in {tmp} ({fsync_ms(tmp):.2f} ms per synchronous 4 KiB write there)")
            print(f"market {market.addr}, dashboard :{market.http_port}; {args.providers} providers over "
                  f"{(args.providers + PROVIDERS_PER_ACCOUNT - 1) // PROVIDERS_PER_ACCOUNT} accounts, "
                  f"{args.renters} renters with a lease each, set up in {time.monotonic() - t0:.1f} s; "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            paid = {}
            load = os.getloadavg()[0]
            stats, gen, rss = await run_load(market, providers, leases, args.seconds, paid, args.sources,
                                             args.loadgen)
            ok &= report(f"{args.providers} providers, {args.renters} renters, {args.seconds:.0f} s",
                         stats, gen, rss, db, check_books(db, leases, paid), args, load)
            if not args.no_hostile:
                calls = StalledCalls(market.addr, "/arceus.Market/Heartbeat", source_addresses(args.hostile, 20))
                slow = slow_sockets("127.0.0.1", market.http_port, source_addresses(args.hostile, 21))
                try:
                    time.sleep(1)
                    load = os.getloadavg()[0]
                    stats, gen, rss = await run_load(market, providers, leases, args.seconds, paid, args.sources,
                                                     args.loadgen)
                    ended = calls.ended
                finally:
                    calls.close()
                    for s in slow:
                        s.close()
                ok &= report(f"the same, with {args.hostile} stalled gRPC calls from as many addresses "
                             f"({ended} ended by the market's deadline and opened again) and "
                             f"{args.hostile} slow dashboard sockets",
                             stats, gen, rss, db, check_books(db, leases, paid), args, load)
                print(f"load average now {os.getloadavg()[0]:.1f}")
        finally:
            market.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
