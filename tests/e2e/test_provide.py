"""`arceus provide`: a real `arceus market` over a SQLite file in tmp_path,
accounts made with `arceus market add-account`, and real `arceus provide`
processes on 127.0.0.1 (port 0).

Every process writes its stdout and stderr to files in tmp_path (polled, so
no test can hang on a pipe) and is stopped in teardown: SIGTERM, exit 0
expected (unless the test killed it on purpose), no sanitizer report (the
`procs` fixture of conftest.py).
"""

import os
import re
import signal
import socket
import time

import pytest

from conftest import wait_for

MLP_RUN = ("--steps", "6", "--batch", "32", "--micro-batches", "4", "--eval-every", "3",
           "--threads", "1")


def provider_rows(run_arceus, market, token, all_=False):
    """`arceus providers` as {id: [columns...]}."""
    args = ["providers", "--market", market.addr, "--token", token] + (["--all"] if all_ else [])
    out = run_arceus(*args, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0].isdigit():
            rows[int(cols[0])] = cols
    return rows


def seen_ago(row):
    """The LAST SEEN column ("3s ago") in seconds."""
    i = [j for j, c in enumerate(row) if c.endswith("s") and c[:-1].isdigit()][-1]
    return int(row[i][:-1])


# ---------------------------------------------------------------------------


def test_provider_registers_its_measured_profile(run_arceus, add_account, market, provider, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    renter = add_account(db, "bob")
    market = market(db)
    p = provider(market, alice, "--max-mem", "512M", "--price", "2.5")
    assert re.search(r"^arceus provide: running at nice (\d+)", p.out(), re.M), p.out()
    # the whole process runs at low priority (threads inherit it)
    assert os.getpriority(os.PRIO_PROCESS, p.proc.pid) >= 10
    assert p.gflops > 0 and p.gib == 0.5 and p.price == "2.500000"
    # the worker really listens where the provider says
    socket.create_connection(("127.0.0.1", int(p.addr.split(":")[1])), timeout=5).close()

    rows = provider_rows(run_arceus, market, renter)
    assert list(rows) == [p.id], rows
    row = rows[p.id]
    # ID ACCOUNT ADDRESS GFLOP/S OBSERVED MEMORY(2 cols) CORES CREDITS/TFLOP RELIABILITY LAST SEEN
    assert row[1:5] == ["alice", p.addr, f"{p.gflops:.1f}", f"{p.gflops:.1f}"], row
    assert row[5:7] == ["512", "MiB"], row
    assert row[7] == "1", row            # --max-threads 1: one core offered
    assert row[8] == "2.500000", row

    # without --max-mem the advertised memory is what is free, no more
    q = provider(market, alice, "--max-mem", "64T", name="provide-big")
    free_kb = int(re.search(r"^MemAvailable:\s+(\d+) kB", open("/proc/meminfo").read(), re.M).group(1))
    assert 0 < q.gib <= free_kb / 2**20 * 1.25 + 0.1, (q.gib, free_kb)
    assert set(provider_rows(run_arceus, market, renter)) == {p.id, q.id}


@pytest.mark.parametrize("size", ["4X", "G", "0", "-1M", "1.5G", "9999999T"])
def test_bad_max_mem_is_a_clear_usage_error(run_arceus, size):
    p = run_arceus("provide", "--market", "127.0.0.1:1", "--token", "x", "--max-mem", size)
    assert p.returncode == 2
    assert "--max-mem expects a size like 512M, 4G" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_bad_token_cannot_register(run_arceus, add_account, market, provider, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    market = market(db)
    for token, why in (("0" * 64, "unknown account token"), ("not-a-token", "malformed account token")):
        p = run_arceus("provide", "--market", market.addr, "--token", token, "--max-threads", "1",
                       timeout=60)
        assert p.returncode == 1, (p.stdout, p.stderr)
        errors = [line for line in p.stderr.splitlines() if "error" in line]
        assert len(errors) == 1, p.stderr
        assert "refused to register" in errors[0] and why in errors[0], p.stderr
        assert "serving on" not in p.stdout
    assert provider_rows(run_arceus, market, alice, all_=True) == {}


def test_two_providers_train_through_the_market_equal_single_process(run_arceus, add_account, market, provider,
                                                                     tmp_path, small_mlp_spec, small_fashion):
    """Providers host only what they are leased for: a renter trains on them
    through the market (the lease token opens their workers), and the result
    equals a single-process run byte for byte."""
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    carol = add_account(db, "carol")
    renter = add_account(db, "renter", "1000")
    market = market(db)
    p1 = provider(market, alice, name="provide-1")
    p2 = provider(market, carol, name="provide-2")
    rows = provider_rows(run_arceus, market, alice)
    addrs = [rows[p1.id][2], rows[p2.id][2]]
    assert addrs == [p1.addr, p2.addr]

    args = ("--model", small_mlp_spec, "--data", small_fashion, *MLP_RUN)
    run_arceus("train", *args, "--out", tmp_path / "one", check=True)
    p = run_arceus("train", *args, "--market", market.addr, "--token", renter, "--devices", "2",
                   "--out", tmp_path / "two", check=True)
    assert f"provider {p1.id} (alice)" in p.stdout and f"provider {p2.id} (carol)" in p.stdout, p.stdout
    assert re.search(r"lease \d+ released: job \d+ done", p.stdout), p.stdout
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    for q in (p1, p2):
        assert "refused" not in q.err(), q.err()


def test_provider_refuses_a_plain_workers_run(run_arceus, add_account, market, provider, tmp_path, small_mlp_spec,
                                              small_fashion):
    """`arceus train --workers ADDR` straight at a provider carries no lease
    token: the provider's worker refuses the Load and the driver says why."""
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    market = market(db)
    p = provider(market, alice)
    r = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", "2",
                   "--batch", "32", "--eval-every", "0", "--threads", "1", "--workers", p.addr,
                   "--out", tmp_path / "ckpt")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Load needs the lease token" in r.stderr, r.stderr
    assert "arceus train --market" in r.stderr, r.stderr
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    # the provider is unharmed and still serving
    assert p.proc.poll() is None
    assert p.id in provider_rows(run_arceus, market, alice)


def test_provider_reregisters_after_market_restart(run_arceus, add_account, market, provider, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    first = market(db, "--offline-after", "2")
    p = provider(first, alice)
    assert p.id in provider_rows(run_arceus, first, alice)

    first.stop(signal.SIGKILL)
    wait_for("the provider to notice the outage", lambda: "market unreachable" in p.err(), 10)
    time.sleep(1.5)  # a few failed heartbeats: still one warning for the whole outage
    # the worker keeps serving meanwhile
    socket.create_connection(("127.0.0.1", int(p.addr.split(":")[1])), timeout=5).close()
    assert p.proc.poll() is None

    restarted = market(db, "--offline-after", "2", listen=first.addr, name="market-2")
    assert restarted.addr == first.addr
    wait_for("the provider to register again", lambda: "registered again" in p.err(), 10)

    def online_and_fresh():
        row = provider_rows(run_arceus, restarted, alice).get(p.id)
        return row is not None and seen_ago(row) <= 2

    wait_for("the provider to be online again", online_and_fresh, 10)
    # stays online over several sweeps of the restarted market
    time.sleep(3)
    assert p.id in provider_rows(run_arceus, restarted, alice)
    err = p.err()
    assert err.count("market unreachable") == 1, err
    assert err.count("registered again") == 1, err


def test_sigterm_stops_cleanly_and_provider_goes_offline(run_arceus, add_account, market, provider, tmp_path):
    db = tmp_path / "market.db"
    alice = add_account(db, "alice")
    market = market(db, "--offline-after", "2")
    p = provider(market, alice)
    assert p.id in provider_rows(run_arceus, market, alice)

    t0 = time.monotonic()
    assert p.stop(signal.SIGTERM, timeout=20) == 0, p.err()
    assert time.monotonic() - t0 < 10
    assert "SIGTERM, shutting down" in p.err()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(p.addr.split(":")[1])), timeout=2).close()

    # offline after --offline-after (2 s) plus up to two sweep periods
    wait_for("the provider to go offline",
             lambda: p.id not in provider_rows(run_arceus, market, alice), 10)
    row = provider_rows(run_arceus, market, alice, all_=True)[p.id]
    assert "(offline)" in row, row
