"""The emulated WAN link itself (bench/wan_relay.c), before anything is
measured through it: a round trip within 2 ms of the two one-way delays
(never under them),
and a bulk transfer within 5% of the rate cap, in each direction (the two
directions are set differently, so a relay that mixed them up fails)."""

import socket
import statistics
import threading
import time

DELAY_MS, UP_DELAY_MS = 20, 10
DOWN_MBIT, UP_MBIT = 20, 8


def connect_through(relay_addr):
    """A listener, a client connected to it through the relay, the server end."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    target = "127.0.0.1:%d" % lst.getsockname()[1]
    return lst, target


def pair(procs, **link):
    lst, target = connect_through(None)
    r = procs.relay(target, **link)
    host, port = r.addr.rsplit(":", 1)
    c = socket.create_connection((host, int(port)))
    s, _ = lst.accept()
    lst.close()
    for sock in (c, s):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s


def recv_exactly(sock, n):
    got = b""
    while len(got) < n:
        b = sock.recv(n - len(got))
        assert b, "the relay closed the connection"
        got += b
    return got


def throughput(src, dst, seconds):
    """Bytes/s from src to dst, timed at the receiver from the first byte to
    the last of a transfer the cap makes last about `seconds`."""
    total = int(seconds * DOWN_MBIT * 1e6 / 8)  # sized for the faster direction
    chunk = b"x" * 65536

    def send():
        left = total
        while left > 0:
            n = src.send(chunk[:min(left, len(chunk))])
            left -= n

    t = threading.Thread(target=send)
    t.start()
    first = dst.recv(65536)
    t0 = time.monotonic()
    got = 0  # bytes after the first read: they all arrived after t0
    while len(first) + got < total:
        b = dst.recv(1 << 20)
        assert b
        got += len(b)
    t1 = time.monotonic()
    t.join()
    return got / (t1 - t0)


def test_round_trip_and_rate_match_the_settings(procs):
    c, s = pair(procs, delay_ms=DELAY_MS, rate_mbit=DOWN_MBIT, up_delay_ms=UP_DELAY_MS,
                up_rate_mbit=UP_MBIT)
    try:
        rtts = []
        for _ in range(15):
            t0 = time.monotonic()
            c.sendall(b"p" * 64)
            recv_exactly(s, 64)
            s.sendall(b"q" * 64)
            recv_exactly(c, 64)
            rtts.append((time.monotonic() - t0) * 1e3)
        # the link's round trip is the fastest sample: on a busy machine the
        # scheduler only ever adds to it (the median is checked loosely)
        want = DELAY_MS + UP_DELAY_MS
        rtt = min(rtts)
        assert want - 0.1 <= rtt <= want + 2.0, f"round trip {rtt:.2f} ms (samples {rtts}), set {want} ms"
        assert statistics.median(rtts) <= want + 10, rtts

        down = throughput(c, s, 1.5) * 8 / 1e6
        assert abs(down - DOWN_MBIT) <= 0.05 * DOWN_MBIT, f"down {down:.2f} Mbit/s, cap {DOWN_MBIT}"
        # the up direction carries the same bytes at its lower cap
        up = throughput(s, c, 1.5 * UP_MBIT / DOWN_MBIT) * 8 / 1e6
        assert abs(up - UP_MBIT) <= 0.05 * UP_MBIT, f"up {up:.2f} Mbit/s, cap {UP_MBIT}"
    finally:
        c.close()
        s.close()


def test_connections_share_the_link_and_close_cleanly(procs):
    """Two connections through one relay share its rate (one home link), and
    a closed end reaches the other side as an end of stream."""
    lst, target = connect_through(None)
    r = procs.relay(target, delay_ms=5, rate_mbit=DOWN_MBIT)
    host, port = r.addr.rsplit(":", 1)
    clients = [socket.create_connection((host, int(port))) for _ in range(2)]
    servers = [lst.accept()[0] for _ in range(2)]
    lst.close()
    total = int(0.6 * DOWN_MBIT * 1e6 / 8)  # 1.2 s at the cap for both together
    done = []

    def sink(sock):
        got = 0
        while got < total:
            b = sock.recv(1 << 20)
            assert b
            got += len(b)
        done.append(time.monotonic())

    threads = [threading.Thread(target=sink, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    for c in clients:
        threading.Thread(target=c.sendall, args=(b"y" * total,)).start()
    for t in threads:
        t.join(30)
    both = max(done) - t0
    rate = 2 * total * 8 / 1e6 / both
    assert rate <= DOWN_MBIT * 1.05, f"two connections moved {rate:.1f} Mbit/s through a {DOWN_MBIT} Mbit/s link"
    for c, s in zip(clients, servers):
        c.close()
        assert s.recv(10) == b"", "the close did not reach the other side"
        s.close()
