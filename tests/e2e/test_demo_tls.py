"""`make demo` over TLS (ARCEUS_DEMO_TLS=1): the demo's market refuses a client
without the CA, one with it gets through, and the demo trains and balances
its ledger as in test_demo.py."""

import re
import subprocess
import time

from conftest import _env
from demo_common import ROOT, check_demo, demo_env


TLS_STEPS = 60


def test_demo_over_tls_refuses_a_client_without_the_ca(arceus_bin, procs, tmp_path):
    # (fewer steps: the plain demo above checks what training reaches)
    env = demo_env(arceus_bin, tmp_path, steps=TLS_STEPS, ARCEUS_DEMO_TLS="1")
    t0 = time.monotonic()
    # in the background (stopped by the `procs` fixture if the test ends first)
    demo = procs.spawn("demo", [ROOT / "scripts" / "demo.sh"], env=env, cwd=ROOT)
    # while the demo runs: its market, and the CA in its temporary folder
    market = None
    deadline = time.monotonic() + 120
    while market is None and time.monotonic() < deadline and demo.running():
        m = re.search(r"market listening on (127\.0\.0\.1:\d+)", demo.out())
        market = m and m.group(1)
        time.sleep(0.05)
    assert market, demo.out() + demo.err()
    cas = list(tmp_path.glob("arceus-demo.*/tls/ca.pem"))
    assert len(cas) == 1, cas
    (tmp_path / "ca.pem").write_bytes(cas[0].read_bytes())
    # without the CA: refused (the TLS handshake fails), and told why
    plain = subprocess.run([str(arceus_bin), "providers", "--market", market, "--token", "0" * 64],
                           env=_env(), capture_output=True, text=True, timeout=60)
    # with it: through to the market, which refuses the made-up token
    with_ca = subprocess.run([str(arceus_bin), "providers", "--market", market, "--token", "0" * 64,
                              "--tls-ca", str(tmp_path / "ca.pem")],
                             env=_env(), capture_output=True, text=True, timeout=60)
    rc = demo.wait(timeout=240)
    took = time.monotonic() - t0
    out = demo.out() + demo.err()
    assert rc == 0, out[-6000:]
    assert plain.returncode != 0, plain.stdout + plain.stderr
    assert "unreachable" in plain.stderr and "--tls-ca" in plain.stderr, plain.stderr
    assert with_ca.returncode != 0 and "unreachable" not in with_ca.stderr, with_ca.stderr
    assert "token" in with_ca.stderr.lower(), with_ca.stderr
    assert "TLS: a CA and a server certificate" in out, out
    assert re.search(r"market listening on \S+ \(pid \d+, database .*\), TLS$", out, re.M), out
    check_demo(out, tmp_path, took, steps=TLS_STEPS, min_accuracy=60.0)
