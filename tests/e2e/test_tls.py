"""TLS: --tls-cert/--tls-key on the market and the workers,
--tls-ca on their clients. Certificates come from scripts/make-tls-cert.sh
(a self-signed CA and a server certificate for localhost and 127.0.0.1);
every server is a real process on 127.0.0.1, port 0.
"""

import socket
import subprocess
import time

import pytest

from conftest import REPO
MLP_RUN = ("--steps", "4", "--batch", "32", "--micro-batches", "2", "--eval-every", "2",
           "--threads", "1")


def make_certs(dest):
    p = subprocess.run(["bash", str(REPO / "scripts" / "make-tls-cert.sh"), str(dest)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for f in ("ca.pem", "server.pem", "server-key.pem"):
        assert (dest / f).is_file(), f
    return dest


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA and certificate: the wrong CA for `certs`."""
    return make_certs(tmp_path_factory.mktemp("tls-other"))


def server_tls(c):
    return ("--tls-cert", c / "server.pem", "--tls-key", c / "server-key.pem")


@pytest.fixture
def tls_market(add_account, market, certs, tmp_path):
    """A market serving TLS only (stopped and checked by the `procs` fixture), and an account's token."""
    db = tmp_path / "market.db"
    token = add_account(db, "alice", "10")
    return market(db, *server_tls(certs)), token


def test_market_with_tls_serves_clients_with_the_ca_only(run_arceus, tls_market, certs,
                                                        other_certs):
    market, token = tls_market
    ok = run_arceus("providers", "--market", market.addr, "--token", token,
                    "--tls-ca", certs / "ca.pem", check=True)
    assert "no providers online" in ok.stdout
    # (dialling localhost:PORT works too, but resolving a name makes gRPC's
    # c-ares resolver leak 10 bytes under LeakSanitizer, so it is not run here)
    run_arceus("ledger", "--market", market.addr, "--token", token,
               "--tls-ca", certs / "ca.pem", check=True)

    plain = run_arceus("providers", "--market", market.addr, "--token", token, timeout=60)
    assert plain.returncode == 1
    assert market.addr in plain.stderr and "--tls-ca" in plain.stderr, plain.stderr
    assert "no providers" not in plain.stdout

    wrong = run_arceus("providers", "--market", market.addr, "--token", token,
                       "--tls-ca", other_certs / "ca.pem", timeout=60)
    assert wrong.returncode == 1
    assert market.addr in wrong.stderr and "TLS" in wrong.stderr, wrong.stderr


def test_tls_server_survives_plaintext_and_garbage_clients(run_arceus, tls_market, certs):
    market, token = tls_market
    for _ in range(3):
        p = run_arceus("providers", "--market", market.addr, "--token", token, timeout=60)
        assert p.returncode == 1
    # a raw TCP client that speaks neither TLS nor HTTP/2, then hangs up
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b""):
        with socket.create_connection(("127.0.0.1", market.port), timeout=10) as s:
            s.sendall(junk)
            time.sleep(0.1)
    assert market.proc.poll() is None, "the market died"
    ok = run_arceus("providers", "--market", market.addr, "--token", token,
                    "--tls-ca", certs / "ca.pem", check=True)
    assert "no providers online" in ok.stdout


def test_tls_files_are_checked_up_front(run_arceus, certs, tmp_path, small_mlp_spec):
    bad = tmp_path / "not.pem"
    bad.write_text("hello\n")
    cases = [
        (("worker", "--listen", "127.0.0.1:0", "--tls-cert", certs / "server.pem"),
         "--tls-cert and --tls-key go together"),
        (("worker", "--listen", "127.0.0.1:0", "--tls-cert", tmp_path / "missing.pem",
          "--tls-key", certs / "server-key.pem"), "missing.pem"),
        (("worker", "--listen", "127.0.0.1:0", "--tls-cert", certs / "server.pem",
          "--tls-key", bad), "not a PEM file"),
        (("train", "--model", small_mlp_spec, "--tls-ca", bad), "not a PEM file"),
        (("providers", "--market", "127.0.0.1:1", "--token", "t", "--tls-ca",
          certs / "server-key.pem"), "not a PEM file"),
    ]
    for args, msg in cases:
        p = run_arceus(*args, timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert msg in p.stderr, (args, p.stderr)


def test_train_over_tls_workers_equals_plaintext_run(run_arceus, worker, certs, tmp_path,
                                                    small_mlp_spec, small_fashion):
    args = ("--model", small_mlp_spec, "--data", small_fashion, *MLP_RUN, "--plan", "0-1,2-2")
    plain = [worker() for _ in range(2)]
    run_arceus("train", *args, "--workers", ",".join(w.addr for w in plain),
               "--out", tmp_path / "plain", check=True)

    ca = ("--tls-ca", certs / "ca.pem")
    tls = [worker(*server_tls(certs), *ca) for _ in range(2)]
    workers = ",".join(w.addr for w in tls)
    p = run_arceus("train", *args, "--workers", workers, *ca, "--out", tmp_path / "tls",
                   check=True)
    assert tls[1].addr in p.stdout
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "tls" / name).read_bytes(), name

    # without the CA the driver is refused, and says by which worker
    p = run_arceus("train", *args, "--workers", workers, "--out", tmp_path / "no-ca", timeout=120)
    assert p.returncode == 1, p.stderr
    assert tls[0].addr in p.stderr and "--tls-ca" in p.stderr, p.stderr
    # and the workers still serve a driver that has it
    run_arceus("train", *args, "--workers", workers, *ca, "--out", tmp_path / "again", check=True)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "tls" / "model.safetensors").read_bytes()
