"""Stalled gRPC calls and slow sockets from many loopback addresses, for the
lock-out tests (tests/e2e/test_lockout.py) and the market load bench
(bench/market_load.py), and oversized messages that cost the sender no
memory (tests/e2e/test_worker_security.py). Plain Python: no HTTP/2 library
is needed.

All of 127.0.0.0/8 is loopback on Linux: each socket binds its own
127.x.y.z before it connects, so the server sees many hosts. A stalled call
is hand-made HTTP/2: the connection preface, SETTINGS, and a HEADERS frame
that opens a call, then nothing, not even the request message.
"""

import re
import selectors
import socket
import struct
import threading
import time

# ---------------------------------------------------------------------------
# Hand-made HTTP/2 (RFC 9113; HPACK literals without Huffman, RFC 7541)
# ---------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def h2_frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_len(n):
    """An HPACK integer with a 7-bit prefix (the H bit 0: no Huffman)."""
    if n < 127:
        return bytes([n])
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def hpack_literal(name, value):
    """Literal header field without indexing, new name."""
    name, value = name.encode(), value.encode()
    return b"\x00" + hpack_len(len(name)) + name + hpack_len(len(value)) + value


def grpc_headers(path, authority):
    return b"".join(hpack_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers")))


def source_addresses(n, second_octet):
    """n loopback addresses 127.<second_octet>.y.z, none of them 127.0.0.1."""
    return [f"127.{second_octet}.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


class StalledCalls:
    """One connection per source address, each holding one gRPC call whose
    request never comes. A background thread reads what the server sends:
    when it ends a stream (trailers with END_STREAM, or RST_STREAM), the
    call is counted as ended and another is opened on the connection;
    SETTINGS and PINGs are acknowledged, like any client."""

    def __init__(self, addr, path, sources):
        host, port = addr.rsplit(":", 1)
        self.target = (host, int(port))
        self.path, self.authority = path, addr
        self.ended = 0          # streams the server ended
        self.reopen = []        # (when, socket): a new stalled call to open
        self.refused_connect = 0
        self.sel = selectors.DefaultSelector()
        self.conns = {}
        self.stop = threading.Event()
        for src in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((src, 0))
            s.settimeout(5)
            try:
                s.connect(self.target)
            except OSError:
                self.refused_connect += 1
                s.close()
                continue
            s.sendall(PREFACE + h2_frame(SETTINGS, 0, 0))
            self.conns[s] = {"next": 1, "buf": b"", "ended": set()}
            self._open_stream(s)
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open_stream(self, s):
        st = self.conns[s]
        sid = st["next"]
        st["next"] += 2
        payload = grpc_headers(self.path, self.authority)
        try:
            s.sendall(h2_frame(HEADERS, END_HEADERS, sid, payload))  # and no DATA: the call stalls
        except OSError:
            pass

    def _frames(self, s):
        st = self.conns[s]
        buf = st["buf"]
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = buf[9:9 + n]
            buf = buf[9 + n:]
            yield kind, flags, sid, payload
        st["buf"] = buf

    def _run(self):
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.2):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the server closed the connection
                    self.sel.unregister(s)
                    continue
                self.conns[s]["buf"] += data
                for kind, flags, sid, payload in list(self._frames(s)):
                    try:
                        if kind == SETTINGS and not flags & ACK:
                            s.sendall(h2_frame(SETTINGS, ACK, 0))
                        elif kind == PING and not flags & ACK:
                            s.sendall(h2_frame(PING, ACK, 0, payload))
                        elif sid and (kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM)):
                            # trailers are often followed by RST_STREAM: count a stream once
                            if sid in self.conns[s]["ended"]:
                                continue
                            self.conns[s]["ended"].add(sid)
                            self.ended += 1
                            self.reopen.append((time.monotonic() + 0.5, s))  # hold the attack
                    except OSError:
                        pass
            now = time.monotonic()
            due = [s for t, s in self.reopen if t <= now]
            self.reopen = [(t, s) for t, s in self.reopen if t > now]
            for s in due:
                self._open_stream(s)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for s in self.conns:
            s.close()
        self.sel.close()



def slow_sockets(host, port, sources, per_source=1, sent=b"GET /api/overv"):
    """Sockets that send half an HTTP request line and stop."""
    out = []
    for src in sources:
        for _ in range(per_source):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((src, 0))
            s.settimeout(5)
            try:
                s.connect((host, port))
                s.sendall(sent)
            except OSError:
                pass
            out.append(s)
    return out


def send_oversized(addr, path, size, timeout=120):
    """One gRPC call to `path` whose request message declares `size` bytes
    (zeros) and sends them all, as HTTP/2 flow control allows, from one
    buffer of a frame: the sender holds nothing. Returns what ended the call: "status N"
    (the grpc-status the server sent), "reset", "goaway", "closed" or
    "timeout"."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        s.sendall(PREFACE + h2_frame(SETTINGS, 0, 0) +
                  h2_frame(HEADERS, END_HEADERS, 1, grpc_headers(path, addr)))
        conn_window, stream_window, initial = 65535, 65535, 65535
        left = 5 + size  # the gRPC prefix, then the message
        prefix = b"\0" + struct.pack(">I", size)
        zeros = bytes(16384)
        buf, deadline = b"", time.monotonic() + timeout
        s.setblocking(False)
        while time.monotonic() < deadline:
            # what the server says: windows, settings, pings, the end
            try:
                data = s.recv(1 << 16)
                if not data:
                    return "closed"
                buf += data
            except BlockingIOError:
                pass
            except OSError:
                return "closed"
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = int.from_bytes(buf[:3], "big")
                kind, flags, sid, payload = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]
                buf = buf[9 + n:]
                if kind == SETTINGS and not flags & ACK:
                    for i in range(0, len(payload) - 5, 6):
                        key, value = struct.unpack(">HI", payload[i:i + 6])
                        if key == 4:  # INITIAL_WINDOW_SIZE
                            stream_window += value - initial
                            initial = value
                        elif key == 5:  # MAX_FRAME_SIZE: larger frames, fewer of them
                            zeros = bytes(min(value, 1 << 20))
                    s.settimeout(timeout)
                    s.sendall(h2_frame(SETTINGS, ACK, 0))
                    s.setblocking(False)
                elif kind == PING and not flags & ACK:
                    s.settimeout(timeout)
                    s.sendall(h2_frame(PING, ACK, 0, payload))
                    s.setblocking(False)
                elif kind == WINDOW_UPDATE:
                    inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                    if sid == 0:
                        conn_window += inc
                    else:
                        stream_window += inc
                elif kind == HEADERS and sid == 1 and flags & END_STREAM:
                    m = re.search(rb"grpc-status.(\d+)", payload)
                    return f"status {int(m.group(1))}" if m else "status ?"
                elif kind == RST_STREAM and sid == 1:
                    return "reset"
                elif kind == GOAWAY:
                    return "goaway"
            # as much of the message as the windows allow, in frames as large
            # as the server takes (16 KiB until it says)
            can = min(conn_window, stream_window, left, 16 * len(zeros))
            if can <= 0:
                time.sleep(0.001)
                continue
            frames = []
            sent = 0
            while sent < can:
                n = min(len(zeros), can - sent)
                body = zeros[:n]
                if left == 5 + size and sent == 0:  # the first bytes carry the prefix
                    body = prefix + zeros[:n - 5]
                end = END_STREAM if left - sent - n == 0 else 0
                frames.append(h2_frame(DATA, end, 1, body))
                sent += n
            s.settimeout(timeout)
            try:
                s.sendall(b"".join(frames))
            except OSError:
                return "closed"
            s.setblocking(False)
            conn_window -= sent
            stream_window -= sent
            left -= sent
        return "timeout"
    finally:
        s.close()
