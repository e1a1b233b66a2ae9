"""`make demo` (scripts/demo.sh): a market, three `arceus provide`
processes and a renter on loopback; the renter trains the Fashion-MNIST MLP
across the three through the market. Runs the script itself (install step
skipped, the binary under test, fewer steps than an epoch) and checks: exit 0,
a plan of three stages on three devices, test accuracy >= 80%, a balanced
ledger, the job listed as done, and no process of the demo left running.
The same over TLS (ARCEUS_DEMO_TLS=1), where a client without the CA is
refused by the demo's market while one with it gets through."""

import subprocess
import time

from conftest import _env
from demo_common import ROOT, check_demo, demo_env


def test_demo_trains_across_three_providers_and_balances_the_ledger(arceus_bin, tmp_path):
    env = demo_env(arceus_bin, tmp_path)
    t0 = time.monotonic()
    p = subprocess.run([str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    check_demo(out, tmp_path, took)


def test_demo_refuses_bad_arguments(tmp_path):
    for args, why in ((["--steps", "x"], "--steps expects"), (["--frob"], "usage"),
                      (["--lm", "--data", str(tmp_path / "none.txt")], "no text to train on")):
        p = subprocess.run([str(ROOT / "scripts" / "demo.sh"), *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env=dict(_env(), ARCEUS_DEMO_SKIP_DEPS="1"))
        assert p.returncode == 2 and why in p.stderr, (args, p.stderr)
