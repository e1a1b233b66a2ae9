#!/usr/bin/env python3
"""Write the seed corpora of the fuzz harnesses (fuzz/corpus/TARGET/): small
valid inputs the fuzzer mutates from. Run from the repository root:
/usr/bin/python3 fuzz/make_seeds.py. The files are committed; rerun after a
format changes."""

import gzip
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from pbwire import field_bytes, field_f32, field_varint, varint  # noqa: E402


def write(target, name, data):
    d = ROOT / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ---- model specs -------------------------------------------------------------
for cfg in sorted((REPO / "configs").glob("*.json")):
    write("spec", cfg.stem, cfg.read_bytes())
write("spec", "gpt-with-vocab", json.dumps({
    "type": "gpt", "vocab_size": 5, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8,
    "dropout": 0.1, "vocab": [10, 32, 97, 98, 99]}).encode())
write("spec", "mlp-gelu", json.dumps({
    "type": "mlp", "inputs": 4, "hidden": [3, 3, 2], "classes": 2, "activation": "gelu",
    "dropout": 0.0}).encode())

# ---- frames (proto/arceus.proto Frame); byte 0 is the harness's slice length --
def frame(kind, step=0, mb=0, nmb=0, rows=0, dtype=0, shape=(), scalars=(), targets=b"",
          payload=b"", more=()):
    m = field_varint(1, kind) + field_varint(2, step) + field_varint(3, mb) + field_varint(4, nmb) + field_varint(5, rows)
    m += field_varint(6, dtype)
    if shape:
        m += field_bytes(7, b"".join(varint(d) for d in shape))
    if scalars:
        m += field_bytes(8, b"".join(struct.pack("<d", x) for x in scalars))
    if targets:
        m += field_bytes(9, targets)
    for f in more:
        m += field_bytes(15, f)
    if payload:
        m += field_bytes(10, payload)
    return m


act = frame(1, step=3, mb=1, nmb=2, rows=2, dtype=0, shape=(2, 3),
            targets=struct.pack("<2i", 1, 0), payload=struct.pack("<6f", *range(6)))
grad = frame(2, step=3, mb=1, nmb=2, rows=2, dtype=0, shape=(2, 3), scalars=(0.5,),
             payload=struct.pack("<6f", *range(6)))
write("frame", "act-one-slice", b"\0" + act)
write("frame", "act-7-byte-slices", b"\x07" + act)
write("frame", "grad-with-loss", b"\x05" + grad)
write("frame", "sync", b"\0" + frame(9, step=5))
write("frame", "step-scalars", b"\x03" + frame(4, step=1, scalars=(1e-3, 1.0)))
write("frame", "coalesced", b"\x0b" + frame(1, step=1, mb=0, nmb=2, rows=2, dtype=1, shape=(2,),
                                            payload=struct.pack("<2i", 4, 5),
                                            more=[grad, frame(9, step=2)]))
write("frame", "norm-f64", b"\0" + frame(3, dtype=2, shape=(2,), payload=struct.pack("<2d", 1, 2)))
# compressed tensors (dtype 4 bf16, 5 int8: a float32 scale per block of 256, the
# scales first): an int8 activation of 2 x 300 values (3 blocks), a bf16 gradient,
# a tensor-parallel bf16 reply, and a probe's burst frame
q8 = struct.pack("<3f", 0.5, 0.25, 0.0) + bytes((i * 7) % 255 - 127 & 0xff for i in range(600))
write("frame", "act-int8", b"\x09" + frame(1, step=4, mb=0, nmb=2, rows=2, dtype=5, shape=(2, 300),
                                           targets=struct.pack("<2i", 1, 0), payload=q8))
write("frame", "grad-bf16", b"\x05" + frame(2, step=4, mb=1, nmb=2, rows=1, dtype=4, shape=(1, 256),
                                            scalars=(0.5,), payload=struct.pack("<256H", *([0x3f80] * 256))))
write("frame", "tp-bf16", b"\0" + frame(12, step=1, mb=1, rows=1, dtype=4, shape=(256,), scalars=(1,),
                                        payload=struct.pack("<256H", *range(256))))
write("frame", "probe-data", b"\0" + frame(13, dtype=3, shape=(16,), scalars=(4, 1, 4), payload=bytes(16)))

# ---- safetensors -------------------------------------------------------------
def safetensors(tensors, meta=None):
    header, data = {}, b""
    if meta:
        header["__metadata__"] = meta
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


write("safetensors", "two-f32", safetensors({
    "fc.0.weight": ("F32", (2, 3), struct.pack("<6f", *range(6))),
    "fc.0.bias": ("F32", (2,), struct.pack("<2f", 1, 2))}))
write("safetensors", "with-metadata", safetensors({
    "w": ("F32", (1,), struct.pack("<f", 1.5)),
    "step": ("I64", (1,), struct.pack("<q", 7)),
    "ids": ("I32", (3,), struct.pack("<3i", 1, 2, 3)),
    "empty": ("F32", (0, 4), b"")}, meta={"opt_step": "7", "format": "pt"}))
write("safetensors", "no-tensors", safetensors({}, meta={"k": "v"}))

# ---- IDX ---------------------------------------------------------------------
def idx(dims, payload):
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


images = idx((2, 2, 3), bytes(range(12)))
labels = idx((4,), bytes([0, 1, 2, 9]))
write("idx", "images-raw", images)
write("idx", "labels-raw", labels)
write("idx", "images-gz", gzip.compress(images, mtime=0))
write("idx", "labels-gz", gzip.compress(labels, mtime=0))

# ---- Load requests (proto/arceus.proto LoadRequest) ----------------------------
def load(spec, first, last, rows=4, mbs=2, schedule=1, index=0, count=1, nxt="", sgd=False):
    opt = field_varint(1, 1 if sgd else 0) + field_f32(2, 0.9) + field_f32(3, 0.99) + field_f32(4, 1e-8) + field_f32(5, 0.1)
    m = (field_bytes(1, spec) + field_varint(2, first) + field_varint(3, last) + field_varint(4, rows) +
         field_varint(5, mbs) + field_varint(6, schedule) + field_varint(7, index) + field_varint(8, count) +
         field_varint(9, 7) + field_bytes(10, opt))
    if nxt:
        m += field_bytes(11, nxt)
    return m


mlp = json.dumps({"type": "mlp", "inputs": 8, "hidden": [6], "classes": 3, "activation": "relu",
                  "dropout": 0.0})
gpt = json.dumps({"type": "gpt", "vocab_size": 5, "block_size": 8, "n_layer": 2, "n_head": 2,
                  "n_embd": 8, "dropout": 0.0, "vocab": [10, 32, 97, 98, 99]})
write("load", "mlp-whole", load(mlp, 0, 2))
write("load", "mlp-first-of-two", load(mlp, 0, 1, count=2, nxt="127.0.0.1:5002", sgd=True))
write("load", "gpt-middle", load(gpt, 1, 3, index=1, count=3, nxt="127.0.0.1:5003", schedule=0))
write("load", "gpt-last", load(gpt, 3, 4, index=2, count=3))


def share(address, h0, h1, u0, u1):
    return (field_bytes(1, address) + field_varint(2, h0) + field_varint(3, h1) + field_varint(4, u0) +
            field_varint(5, u1))


# tensor-parallel roles: a group's leader (its own share first) and a rank
write("load", "gpt-tp-leader", load(gpt, 0, 2) + field_bytes(14, share("", 0, 1, 0, 16)) +
      field_bytes(14, share("127.0.0.1:5002", 1, 2, 16, 32)))
write("load", "gpt-tp-rank", load(gpt, 1, 3, index=1, count=3, nxt="") +
      field_bytes(15, share("", 1, 2, 16, 32)))

# ---- sessions (fuzz_session.c): byte 0 picks Pipe (0), Save (1) or Restore (2) --
SESSION = "0123456789abcdef" * 4  # the harness's stage session
write("session", "pipe-first-frame", bytes([0, 7]) + frame(9, step=5) + field_bytes(16, SESSION))
write("session", "pipe-wrong-session", bytes([0, 3]) + field_varint(1, 1) +
      field_bytes(16, SESSION[:-1] + "0") + field_bytes(10, b"\0" * 8))
write("session", "save", bytes([1]) + field_bytes(1, SESSION))
write("session", "restore-first-chunk", bytes([2]) + field_bytes(1, b"\0" * 16) + field_bytes(2, SESSION))
write("session", "restore-empty-chunk", bytes([2]) + field_bytes(2, SESSION))
# Load with the successor's session, and a leader with its member's
write("load", "mlp-first-with-next-session", load(mlp, 0, 1, count=2, nxt="127.0.0.1:5002") +
      field_bytes(16, SESSION))
write("load", "gpt-tp-leader-sessions", load(gpt, 0, 2) + field_bytes(14, share("", 0, 1, 0, 16)) +
      field_bytes(14, share("127.0.0.1:5002", 1, 2, 16, 32) + field_bytes(7, SESSION)))


# ---- audit material (fuzz_audit.c): the 75-parameter MLP 8-6-3 as one stage --
def material(step, mbs, rows=4, update=True, params=75):
    out = struct.pack("<IIqqiiiffI", 0x4d415241, 0, step, params, len(mbs), step, int(update), 1e-3, 1.0, 0)
    out += struct.pack(f"<{3 * params}f", *[(i % 17) / 17.0 - 0.5 for i in range(3 * params)])
    for i, (act_rows, targets, grad, loss) in enumerate(mbs):
        act = struct.pack(f"<{act_rows * 8}f", *[((i + j) % 9) / 9.0 for j in range(act_rows * 8)])
        tg = struct.pack(f"<{len(targets)}i", *targets)
        out += struct.pack("<iQQQd", act_rows, len(act), len(targets), len(grad), loss) + act + tg + grad
    return out


write("audit", "two-micro-batches", material(3, [(4, [0, 1, 2, 0], b"", 0.0), (4, [2, 2, 1, 0], b"", 0.0)]))
write("audit", "one-row-no-update", material(0, [(1, [1], b"", 0.0)], update=False))

