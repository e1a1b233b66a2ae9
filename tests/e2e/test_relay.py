"""The relay (docs/DESIGN.md, "The relay") on loopback: no root needed.

A provider the market cannot dial is simulated by advertising 127.0.0.2:P
while its worker listens on 127.0.0.1:P only: the market's direct Hello is
refused, the provider keeps a control connection to the relay, and the
market then lists and leases it as relayed. (tests/e2e/test_nat.py plays the
real scene, with network namespaces and NAT.)

The relay's own door is tried first with a provider written here from the
wire description alone (net/relay.h): circuits splice bytes both ways, and
requests without a valid pass, over a limit or for an absent provider are
refused and counted; a host that keeps failing is blocked. Then arceus
providers behind the relay: listed "relayed", trained on through the relay
(the driver's channel and stage 0's to stage 1), over TLS end to end; a
relay killed and restarted mid-run: the run recovers through it and ends
with the weights of an undisturbed run.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_for, query
from test_market_train import ledger_total

MICRO = 1_000_000


# ---------------------------------------------------------------------------
# The wire, as a stranger would write it from net/relay.h
# ---------------------------------------------------------------------------

def make_secret(path):
    path.write_bytes(os.urandom(48))
    path.chmod(0o600)
    return hashlib.sha256(path.read_bytes()).digest()


def mac(key, context, msg):
    return hmac.new(key, (context + msg).encode(), hashlib.sha256).hexdigest()


PASS_CONTEXT = "arceus relay pass v1\n"
CREDENTIAL_CONTEXT = "arceus relay provider v1\n"


def make_pass(key, provider, lease, expiry):
    user = f"{provider}.{lease}.{expiry}"
    return user + ":" + mac(key, PASS_CONTEXT, user)


def credential(key, provider, address):
    return mac(key, CREDENTIAL_CONTEXT, f"{provider}\n{address}")


def split_addr(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def read_until(sock, marker, limit=8192, timeout=10):
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    return data


def circuit(relay, target, pw=None, timeout=10):
    """A CONNECT through the relay: (status code, socket)."""
    s = socket.create_connection(split_addr(relay), timeout=timeout)
    auth = ""
    if pw is not None:
        auth = "Proxy-Authorization: Basic " + base64.b64encode(pw.encode()).decode() + "\r\n"
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
    head = read_until(s, b"\r\n\r\n", timeout=timeout)
    m = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return (int(m.group(1)) if m else None), s


class FakeProvider:
    """A provider's control connection to the relay; every circuit it is
    asked for is dialled back and echoes what it receives."""

    def __init__(self, relay, key, pid, address, cred=None):
        self.relay, self.pid, self.address = relay, pid, address
        self.ctl = socket.create_connection(split_addr(relay), timeout=10)
        cred = cred or credential(key, pid, address)
        self.ctl.sendall(f"ARCEUS-RELAY 1 CONTROL {pid} {address} {cred}\n".encode())
        self.answer = read_until(self.ctl, b"\n").decode(errors="replace")
        self.dials = 0
        self.lines = []  # what the relay said after OK
        self.stop = False
        self.socks = []
        if self.answer.startswith("OK"):
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        buf = b""
        try:
            self.ctl.settimeout(0.5)
        except OSError:  # closed already
            return
        last_ping = time.monotonic()
        while not self.stop:
            if time.monotonic() - last_ping > 2:
                try:
                    self.ctl.sendall(b"PING\n")
                except OSError:
                    return
                last_ping = time.monotonic()
            try:
                chunk = self.ctl.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.append(line.decode(errors="replace"))
                if line.startswith(b"DIAL "):
                    _, cid, nonce = line.decode().split()
                    self.dials += 1
                    d = socket.create_connection(split_addr(self.relay), timeout=10)
                    d.sendall(f"ARCEUS-RELAY 1 DATA {cid} {nonce}\n".encode())
                    self.socks.append(d)
                    threading.Thread(target=self._echo, args=(d,), daemon=True).start()

    @staticmethod
    def _echo(d):
        try:
            while True:
                b = d.recv(65536)
                if not b:
                    d.shutdown(socket.SHUT_WR)
                    return
                d.sendall(b)
        except OSError:
            return

    def close(self):
        self.stop = True
        for s in [self.ctl] + self.socks:
            try:
                s.close()
            except OSError:
                pass


RELAY_READY = re.compile(r"^arceus relay: listening on (\S+:\d+)$", re.M)


def start_relay(procs, secret, *extra, listen="127.0.0.1:0", name="relay"):
    r = procs.start(name, "relay", "--listen", listen, "--secret", secret, *extra)
    r.addr = r.wait_stdout(RELAY_READY).group(1)
    return r


def relay_counts(relay_proc):
    """The counts of the relay's last stats line (stdout at exit, or log)."""
    text = relay_proc.out() + relay_proc.err()
    lines = re.findall(r"(\d+) providers? attached, (\d+) circuits? open \((\d+) opened.*?(\d+) circuit "
                       r"requests? refused \((\d+) without a valid pass, (\d+) for absent providers, (\d+) over "
                       r"limits, (\d+) not dialled back, (\d+) malformed\), (\d+) control", text)
    assert lines, text[-2000:]
    keys = ("providers", "open", "opened", "refused", "pass", "absent", "limit", "timeout", "malformed",
            "controls_refused")
    return dict(zip(keys, map(int, lines[-1])))


# ---------------------------------------------------------------------------
# The relay alone
# ---------------------------------------------------------------------------

def test_relay_splices_circuits_and_refuses_what_has_no_valid_pass(procs, tmp_path):
    key = make_secret(tmp_path / "relay.key")
    relay = start_relay(procs, tmp_path / "relay.key", "--max-per-provider", "2")
    target = "10.9.8.7:7001"
    p = FakeProvider(relay.addr, key, 17, target)
    assert p.answer.startswith("OK"), p.answer
    later = int(time.time()) + 600

    # a valid pass: a circuit that carries bytes both ways, byte for byte
    code, s = circuit(relay.addr, target, make_pass(key, 17, 5, later))
    assert code == 200
    payload = os.urandom(3 << 20)
    got = bytearray()

    def reader():
        s.settimeout(20)
        while len(got) < len(payload):
            b = s.recv(1 << 16)
            if not b:
                break
            got.extend(b)
    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    t.join(30)
    assert bytes(got) == payload
    # a second circuit fits the limit of two; a third does not
    code2, s2 = circuit(relay.addr, target, make_pass(key, 17, 5, later))
    code3, s3 = circuit(relay.addr, target, make_pass(key, 17, 5, later))
    assert (code2, code3) == (200, 429)
    for x in (s, s2, s3):
        x.close()

    # refused, each with its reason: no pass, a forged one, an expired one, one
    # for another target, one for a provider that is not attached, garbage
    other = os.urandom(32)
    cases = [(None, target, 407), (make_pass(other, 17, 5, later), target, 403),
             (make_pass(key, 17, 5, int(time.time()) - 1), target, 403),
             (make_pass(key, 17, 5, later), "10.9.8.7:7002", 403),
             (make_pass(key, 18, 5, later), target, 404)]
    for pw, tgt, want in cases:
        code, x = circuit(relay.addr, tgt, pw)
        x.close()
        assert code == want, (pw, tgt, code)
        if want == 403:
            time.sleep(0)  # (the fifth failure from a host blocks it: see below)
    # the host has had four failures without a valid pass (407 and three 403):
    # one more, and even a valid pass is refused for a while
    code, x = circuit(relay.addr, target, "1.2.3:" + "0" * 64)
    x.close()
    assert code == 403
    code, x = circuit(relay.addr, target, make_pass(key, 17, 5, later))
    x.close()
    assert code == 429
    # garbage and a silent client are closed without a circuit
    with socket.create_connection(split_addr(relay.addr), timeout=10) as g:
        g.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert read_until(g, b"\n") == b""
    assert p.dials == 2  # only the two circuits that opened asked the provider to dial
    p.close()
    relay.stop()
    c = relay_counts(relay)
    assert c["opened"] == 2 and c["limit"] >= 2 and c["pass"] >= 5 and c["absent"] == 1, c
    assert c["refused"] == c["pass"] + c["absent"] + c["limit"] + c["timeout"] + c["malformed"], c


def test_relay_control_connections_need_the_markets_credential(procs, tmp_path):
    key = make_secret(tmp_path / "relay.key")
    relay = start_relay(procs, tmp_path / "relay.key")
    forged = FakeProvider(relay.addr, key, 5, "10.0.0.5:7001", cred="0" * 64)
    assert forged.answer.startswith("NO "), forged.answer
    other = FakeProvider(relay.addr, key, 5, "10.0.0.6:7001", cred=credential(key, 5, "10.0.0.5:7001"))
    assert other.answer.startswith("NO "), other.answer  # a credential is for its own address
    for line in (b"ARCEUS-RELAY 1 CONTROL x y z\n", b"ARCEUS-RELAY 1 NONSENSE\n", b"ARCEUS-RELAY 1 CONTROL " +
                 b"9" * 600 + b"\n", b"ARCEUS-RELAY 1 DATA 1 " + b"0" * 32 + b"\n"):
        with socket.create_connection(split_addr(relay.addr), timeout=10) as s:
            s.sendall(line)
            assert not read_until(s, b"\n").startswith(b"OK"), line
    good = FakeProvider(relay.addr, key, 5, "10.0.0.5:7001")
    assert good.answer.startswith("OK"), good.answer
    # the same provider again (it reconnected): the newer connection wins
    again = FakeProvider(relay.addr, key, 5, "10.0.0.5:7001")
    assert again.answer.startswith("OK")
    wait_for("the older connection to be told", lambda: any(x.startswith("NO replaced") for x in good.lines), 10)
    for x in (forged, other, good, again):
        x.close()
    relay.stop()
    c = relay_counts(relay)
    assert c["controls_refused"] >= 3, c


# ---------------------------------------------------------------------------
# Providers behind the relay, through the market
# ---------------------------------------------------------------------------

MARKET_RELAY = re.compile(r"^arceus market: relay (?:on|at) (\S+:\d+)$", re.M)


def unreachable_provider(procs, market, token, *extra, name="provide"):
    """`arceus provide` whose advertised address (127.0.0.2:P) nobody can
    dial: its worker listens on 127.0.0.1:P."""
    port = free_port()
    return procs.provider(market, token, "--listen", f"127.0.0.1:{port}", "--advertise", f"127.0.0.2:{port}",
                          *extra, name=name)


def reach_of(run_arceus, market, token):
    out = run_arceus("providers", "--market", market.addr, "--token", token, "--all", check=True).stdout
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d+)\s.*?\s(direct|relayed|unreachable|unchecked)\s",
                                                            out, re.M)}


def test_providers_behind_the_relay_are_listed_relayed_and_trained_on(
        run_arceus, procs, add_account, tmp_path, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    tokens = [add_account(db, n) for n in ("ada", "grace", "linus")]
    market = procs.market(db, "--relay", "127.0.0.1:0", "--offline-after", "3600", "--http", "127.0.0.1:0")
    relay_addr = market.wait_stdout(MARKET_RELAY).group(1)
    hidden = [unreachable_provider(procs, market, t, "--price", "1", name=f"hidden{i}")
              for i, t in enumerate(tokens[:2])]
    # one the market dials: priced highest, so it holds the last stage
    direct = procs.provider(market, tokens[2], "--price", "2", name="direct")
    for p in hidden:
        p.wait_stdout(r"keeping a connection to its relay " + re.escape(relay_addr))
    wait_for("both hidden providers relayed",
             lambda: [reach_of(run_arceus, market, renter).get(p.id) for p in hidden] == ["relayed"] * 2, 60)
    assert reach_of(run_arceus, market, renter)[direct.id] == "direct"
    for p in hidden:
        p.wait_stdout(r"reaches this worker through its relay")

    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", 40, "--batch", 64,
                   "--eval-every", 0, "--plan", "0,1,2", "--threads", 1,
                   "--market", market.addr, "--token", renter, "--devices", 3)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for i, h in enumerate(hidden):
        assert re.search(rf"provider {h.id} \(\w+\) at 127\.0\.0\.2:\d+ through relay {re.escape(relay_addr)}", out), out
    # each edge into a hidden provider goes through the relay, unless the
    # stage before it is the one the market dials (the hidden one then dials
    # it back); the edge into that one is direct
    edges = re.findall(r"^edge (?:driver|stage \d) -> stage (\d) \((\S+)\): (relayed|direct|reversed)", out, re.M)
    assert len(edges) == 3, out
    for i, (_, addr, kind) in enumerate(edges):
        before_direct = i > 0 and not edges[i - 1][1].startswith("127.0.0.2:")
        want = "direct" if not addr.startswith("127.0.0.2:") else "reversed" if before_direct else "relayed"
        assert kind == want, (i, out)
    stage_edges = ["relayed" if kind == "relayed" else "direct" for _, _, kind in edges]
    acc = float(re.search(r"^test accuracy ([\d.]+)%", out, re.M).group(1))
    assert acc >= 50.0, out
    assert ledger_total(db) == 0
    assert query(db, "SELECT spent FROM jobs")[0][0] > 0
    # the dashboard shows each provider's reach and each stage's edge
    ps = {x["id"]: x["reach"] for x in api(market.url, "/api/providers", renter)["providers"]}
    assert ps == {hidden[0].id: "relayed", hidden[1].id: "relayed", direct.id: "direct"}, ps
    job = api(market.url, "/api/jobs/1", renter)
    assert [s["members"][0]["edge"] for s in job["plan"]["stages"]] == stage_edges, job["plan"]


def api(url, path, token):
    req = urllib.request.Request(url.rstrip("/") + path)
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------
# A relay that dies mid-run
# ---------------------------------------------------------------------------

RESTART_STEPS, EVERY = 300, 20
TRAIN = ["--batch", "32", "--micro-batches", "2", "--eval-every", "0", "--threads", "1", "--seed", "7"]


def steps_logged(log):
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if '"loss"' in line)


def test_a_run_through_a_relay_that_restarts_recovers_with_the_same_weights(
        run_arceus, procs, add_account, tmp_path, small_fashion, small_mlp_spec):
    # the run as it would go undisturbed, in one process
    ref = tmp_path / "ref"
    run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", RESTART_STEPS, *TRAIN,
               "--out", ref, check=True)
    secret = tmp_path / "relay.key"
    make_secret(secret)
    relay_addr = f"127.0.0.1:{free_port()}"
    relay = start_relay(procs, secret, listen=relay_addr)
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    market = procs.market(db, "--relay-at", relay_addr, "--relay-secret", secret, "--offline-after", "3600")
    hidden = [unreachable_provider(procs, market, add_account(db, f"p{i}"), name=f"hidden{i}") for i in range(3)]
    wait_for("the providers relayed",
             lambda: sorted(reach_of(run_arceus, market, renter).values()) == ["relayed"] * 3, 60)

    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    train = procs.start("train", "train", "--model", small_mlp_spec, "--data", small_fashion, "--steps",
                        RESTART_STEPS, *TRAIN, "--plan", "0,1,2", "--checkpoint-every", EVERY, "--stage-timeout", "2",
                        "--market", market.addr, "--token", renter, "--devices", 3, "--out", out, "--log", log)
    wait_for("the run to pass its third checkpoint", lambda: steps_logged(log) >= 3 * EVERY + 5 or not train.running(),
             240)
    assert train.running(), train.err()[-3000:]
    relay.kill(signal.SIGKILL)
    time.sleep(2)
    relay = start_relay(procs, secret, listen=relay_addr, name="relay-again")
    rc = train.wait(300)
    stdout, err = train.out(), train.err()
    assert rc == 0, err[-3000:]
    assert "released: job 1 done" in stdout, stdout[-3000:]
    # the same providers, reached through the relay once it was back: nobody
    # was replaced or blamed for the relay's absence
    assert "restored every stage" in stdout, stdout[-3000:]
    assert "replaces it" not in stdout and "no free provider" not in stdout, stdout[-3000:]
    assert query(db, "SELECT COUNT(*) FROM lease_replacements")[0][0] == 0
    assert [r for (r,) in query(db, "SELECT reliability FROM providers")] == [1.0] * 3
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert ledger_total(db) == 0
    usage = query(db, "SELECT step, stage FROM usage ORDER BY step, stage")
    assert usage == [(s, st) for s in range(RESTART_STEPS) for st in range(3)]
    for p in hidden:
        wait_for(f"{p.name} to reattach", lambda p=p: p.err().count("attached as provider") >= 2, 30)


def test_tls_through_the_relay_is_end_to_end(run_arceus, procs, add_account, tmp_path, small_fashion,
                                             small_mlp_spec):
    """The relay splices ciphertext: the driver checks the provider's own
    certificate for the address it dialled (127.0.0.2), and a client without
    the CA gets nowhere through the relay either."""
    import subprocess
    certs = tmp_path / "tls"
    p = subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "scripts" / "make-tls-cert.sh"),
                        str(certs), "127.0.0.2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    serve = ("--tls-cert", certs / "server.pem", "--tls-key", certs / "server-key.pem")
    ca = ("--tls-ca", certs / "ca.pem")
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    market = procs.market(db, "--relay", "127.0.0.1:0", "--offline-after", "3600", *serve, *ca)
    hidden = [unreachable_provider(procs, market, add_account(db, f"p{i}"), *serve, *ca, name=f"hidden{i}")
              for i in range(2)]

    def relayed():
        out = run_arceus("providers", "--market", market.addr, "--token", renter, *ca, check=True).stdout
        return out.count(" relayed ") == 2
    wait_for("the providers relayed", relayed, 60)
    t = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", 20, "--batch", 64,
                   "--eval-every", 0, "--plan", "0,1-2", "--threads", 1, "--market", market.addr, "--token", renter,
                   "--devices", 2, *ca)
    assert t.returncode == 0, t.stderr[-3000:]
    assert len(re.findall(r"^edge .*: relayed via", t.stdout, re.M)) == 2, t.stdout
    assert ledger_total(db) == 0
    for h in hidden:
        assert "lease of job 1 accepted" in h.err(), h.err()[-2000:]


def test_a_stage_the_market_dials_is_dialled_back_by_its_relayed_next_stage(
        run_arceus, procs, add_account, tmp_path, small_fashion, small_mlp_spec):
    """Direct first: stage 0 can be dialled, stage 1 cannot. Stage 1 dials
    stage 0 back directly (asked through the relay, which carries none of
    it); the driver still reaches stage 1 through the relay."""
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    market = procs.market(db, "--relay", "127.0.0.1:0", "--offline-after", "3600")
    # far cheaper: leased first, so it holds stage 0
    direct = procs.provider(market, add_account(db, "ada"), "--price", "1", name="direct")
    hidden = unreachable_provider(procs, market, add_account(db, "grace"), "--price", "50", name="hidden")
    wait_for("the hidden provider relayed", lambda: reach_of(run_arceus, market, renter).get(hidden.id) == "relayed", 60)
    t = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", 20, "--batch", 64,
                   "--eval-every", 0, "--plan", "0,1-2", "--threads", 1, "--market", market.addr, "--token", renter,
                   "--devices", 2)
    assert t.returncode == 0, t.stderr[-3000:]
    assert re.search(rf"^edge driver -> stage 0 \({re.escape(direct.addr)}\): direct$", t.stdout, re.M), t.stdout
    assert re.search(r"^edge stage 0 -> stage 1 \(127\.0\.0\.2:\d+\): reversed: it dials stage 0 back directly",
                     t.stdout, re.M), t.stdout
    assert "dialled back directly" in direct.err(), direct.err()[-2000:]
    assert "dialled the previous stage at 127.0.0.1:" in hidden.err(), hidden.err()[-2000:]
    assert ledger_total(db) == 0
    market.stop()
    # once per load of the pipeline (a run loads its stages again when the measured links change its plan)
    m = re.search(r"\b(\d+) stages? dialled back directly\n(?!.*dialled back directly)", market.err(), re.S)
    assert m and int(m.group(1)) >= 1, market.err()[-2000:]
