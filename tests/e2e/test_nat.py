"""Providers behind home routers, for real: network namespaces with NAT.

scripts/nat-scene.sh builds the scene (tests and `scripts/demo.sh --nat`
share it): the market and its relay in a "public" namespace, three providers
each behind its own NAT (a private LAN address nobody outside can route to,
outgoing connections masqueraded, every new incoming connection dropped),
the renter behind another NAT, and one provider with a public address.

First run: the three NATed providers register, the market cannot dial them
(the test shows that a dial of a provider's private address, and of its
router's public one, fails), they keep a connection to the relay and are
listed "relayed"; the renter trains the Fashion-MNIST MLP across the three
through the market and the relay to the usual accuracy (>= 80% after 200
steps, as `make demo`), and the ledger sums to zero. Second run: one NATed
provider leaves and the public one joins, at stage 0: the renter dials it
directly, the NATed stage after it dials it back directly, and only the
edge between the two NATed stages goes through the relay.

Needs root, ip netns and nftables: skipped with the reason otherwise.
The namespaces are removed however the test ends (the fixture's teardown,
after every process in them has been stopped).
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, wait_for
from test_market_train import ledger_total

ROOT = Path(__file__).resolve().parents[2]
SCENE = ROOT / "scripts" / "nat-scene.sh"
STEPS = 200


def scene_check():
    if not SCENE.exists():
        return "scripts/nat-scene.sh is missing"
    p = subprocess.run(["bash", str(SCENE), "check"], capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or "nat-scene.sh check failed")


@pytest.fixture
def scene():
    why = scene_check()
    if why:
        pytest.skip(f"the NAT scene cannot be played here: {why}")
    prefix = "arct" + format(os.getpid() % 36 ** 6, "x")[:8]
    p = subprocess.run(["bash", str(SCENE), "up", prefix], capture_output=True, text=True)
    try:
        assert p.returncode == 0, p.stderr
        yield dict(line.split("=", 1) for line in p.stdout.split())
    finally:
        d = subprocess.run(["bash", str(SCENE), "down", prefix], capture_output=True, text=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}\n{d.stderr}"


def in_ns(procs, arceus_bin, ns, name, *args):
    return procs.spawn(name, ["ip", "netns", "exec", ns, arceus_bin, *[str(a) for a in args]])


def run_in(ns, arceus_bin, *args, timeout=300):
    return subprocess.run(["ip", "netns", "exec", ns, str(arceus_bin), *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=timeout)


def dial(ns, host, port, timeout=2):
    """A TCP dial from namespace ns: 'connected' or the error's name."""
    code = ("import socket\n"
            f"try:\n    socket.create_connection(('{host}', {port}), timeout={timeout}); print('connected')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    return subprocess.run(["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", code], capture_output=True,
                          text=True, timeout=timeout + 20).stdout.strip()


def provider_in(procs, arceus_bin, ns, market, token, listen, *extra, name):
    p = in_ns(procs, arceus_bin, ns, name, "provide", "--market", market, "--token", token, "--listen", listen,
              "--max-threads", "1", "--heartbeat", "1", *extra)
    m = p.wait_stdout(r"^arceus provide: provider (\d+) serving on (\S+) ")
    p.id, p.addr = int(m.group(1)), m.group(2)
    return p


def reach(arceus_bin, ns, market, token):
    p = run_in(ns, arceus_bin, "providers", "--market", market, "--token", token)
    return {int(m.group(1)): (m.group(2), m.group(3))
            for m in re.finditer(r"^(\d+)\s+\S+\s+(\S+)\s.*?\s(direct|relayed|unreachable|unchecked)\s", p.stdout,
                                 re.M)}


def test_providers_behind_nat_train_through_the_relay(scene, procs, arceus_bin, add_account, tmp_path, fashion_dir):
    s = scene
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    names = ["ada", "grace", "linus", "barbara"]
    tokens = {n: add_account(db, n) for n in names}
    pub = s["PUBLIC_IP"]
    market = in_ns(procs, arceus_bin, s["PUB"], "market", "market", "--listen", f"{pub}:7000", "--db", db,
                   "--relay", f"{pub}:7100", "--offline-after", "4")
    market.wait_stdout(r"^arceus market: relay on 10\.77\.0\.1:7100$")
    m = f"{pub}:7000"
    # (priced above the public provider of the second run, which is then leased first)
    hidden = [provider_in(procs, arceus_bin, s[f"P{i}"], m, tokens[names[i - 1]], f"{s[f'P{i}_LAN']}:7001",
                          "--price", "20", name=f"p{i}") for i in (1, 2, 3)]
    for p in hidden:
        p.wait_stdout(r"keeping a connection to its relay 10\.77\.0\.1:7100")
        p.wait_stdout(r"reaches this worker through its relay", timeout=60)
    listed = reach(arceus_bin, s["RENTER"], m, renter)
    assert all(listed[p.id] == (p.addr, "relayed") for p in hidden), listed

    # nobody dials in: the private address does not route, the router drops
    for i in (1, 2, 3):
        private = dial(s["PUB"], s[f"P{i}_LAN"], 7001)
        assert private.startswith("OSError") and "unreachable" in private, private
        # (from behind another NAT the packets die at the internet's edge)
        assert dial(s["RENTER"], s[f"P{i}_LAN"], 7001) != "connected"
        public = dial(s["PUB"], s[f"P{i}_WAN"], 7001)
        assert public.startswith("TimeoutError"), public
    print(f"an inbound dial of provider 1's private address {s['P1_LAN']}:7001: {private}; "
          f"of its router's address {s['P1_WAN']}:7001: {public}")

    # the renter, behind its own NAT, trains across the three
    t = run_in(s["RENTER"], arceus_bin, "train", "--model", CONFIGS / "mlp-fashion.json", "--data", fashion_dir,
               "--steps", STEPS, "--plan", "0,1,2", "--micro-batches", "4", "--threads", "1", "--eval-every", "0",
               "--market", m, "--token", renter, "--devices", "3", "--out", tmp_path / "run1", timeout=600)
    assert t.returncode == 0, t.stderr[-4000:]
    out = t.stdout
    edges = re.findall(r"^edge (?:driver|stage \d) -> stage \d \((\S+)\): (relayed|direct)", out, re.M)
    assert sorted(a for a, _ in edges) == sorted(p.addr for p in hidden), out
    assert all(kind == "relayed" for _, kind in edges), out
    acc = float(re.search(r"^test accuracy ([\d.]+)%", out, re.M).group(1))
    assert acc >= 80.0, out
    assert ledger_total(db) == 0
    print(out[out.index("edge "):].split("batch ")[0] + f"test accuracy {acc}%; ledger sum 0")

    # second run: provider 3 leaves, one with a public address joins
    hidden[2].stop()
    wait_for("provider 3 to go offline", lambda: hidden[2].id not in reach(arceus_bin, s["RENTER"], m, renter), 60)
    direct = provider_in(procs, arceus_bin, s["DIRECT"], m, tokens["barbara"], "0.0.0.0:7001", "--advertise",
                         f"{s['DIRECT_IP']}:7001", "--price", "1", name="direct")
    direct.wait_stdout(r"reaches this worker directly")
    assert reach(arceus_bin, s["RENTER"], m, renter)[direct.id] == (f"{s['DIRECT_IP']}:7001", "direct")
    t = run_in(s["RENTER"], arceus_bin, "train", "--model", CONFIGS / "mlp-fashion.json", "--data", fashion_dir,
               "--steps", 20, "--plan", "0,1,2", "--micro-batches", "4", "--threads", "1", "--eval-every", "0",
               "--market", m, "--token", renter, "--devices", "3", timeout=600)
    assert t.returncode == 0, t.stderr[-4000:]
    # the public one holds stage 0: the renter dials it directly, the stage
    # after it dials it back directly, and only the edge between the two
    # NATed stages goes through the relay
    edges = re.findall(r"^edge (?:driver|stage \d) -> stage \d \((\S+)\): (relayed|direct|reversed)", t.stdout, re.M)
    assert edges[0] == (f"{s['DIRECT_IP']}:7001", "direct"), t.stdout
    assert [kind for _, kind in edges[1:]] == ["reversed", "relayed"], t.stdout
    assert sorted(a for a, _ in edges[1:]) == sorted([hidden[0].addr, hidden[1].addr]), t.stdout
    assert "dialled back directly" in direct.err(), direct.err()[-2000:]
    print("second run:\n" + "\n".join(l for l in t.stdout.splitlines() if l.startswith("edge ")))
    assert ledger_total(db) == 0
    market.stop()
    assert re.search(r"relay: \d+ providers? attached, \d+ circuits? open \(([1-9]\d*) opened", market.err()), \
        market.err()[-2000:]
