"""Hand-encoded protobuf for the tests' foreign clients (proto/arceus.proto):
just the wire format, so that a test can also send what protoc never would
(wrong wire types, truncated fields)."""

import struct


def varint(v):
    out = bytearray()
    v &= (1 << 64) - 1
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def field_varint(n, v):
    return varint(n << 3) + varint(v)


def field_bytes(n, b):
    if isinstance(b, str):
        b = b.encode()
    return varint((n << 3) | 2) + varint(len(b)) + b


def field_double(n, x):
    return varint((n << 3) | 1) + struct.pack("<d", x)


def field_f32(n, x):
    return varint((n << 3) | 5) + struct.pack("<f", x)


def decode(buf):
    """Protobuf bytes -> {field: [values]} (varints as int, fixed64 as bytes)."""
    out, i = {}, 0

    def rd():
        nonlocal i
        v, shift = 0, 0
        while True:
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v

    while i < len(buf):
        key = rd()
        f, wt = key >> 3, key & 7
        if wt == 0:
            v = rd()
        elif wt == 1:
            v = buf[i:i + 8]
            i += 8
        elif wt == 2:
            n = rd()
            v = buf[i:i + n]
            i += n
        elif wt == 5:
            v = buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {wt}")
        out.setdefault(f, []).append(v)
    return out


# ---- a few Market requests, field by field --------------------------------

# The model a hand-made lease prices when the test names none: the 8-6-3
# MLP of test_workers.MLP_SPEC (two units), micro-batches of 4 rows, one per
# step, as its load_request loads it.
LEASE_MODEL = ('{"type": "mlp", "inputs": 8, "hidden": [6], "classes": 3, '
               '"activation": "relu", "dropout": 0.0}')


def acquire(token, devices=1, max_credits=0, est_steps=10, spec="mlp", flops=10 ** 9, min_mem=0,
            resume_job=0, kept_steps=0, model=LEASE_MODEL, mb_rows=4, micro_batches=1, schedule=0,
            stage_units=()):
    """AcquireLeaseRequest; model=None sends none (as a driver older than
    plans did)"""
    m = (field_bytes(1, token) + field_varint(2, devices) + field_varint(3, max_credits) +
         field_varint(4, est_steps) + field_bytes(5, spec) + field_varint(6, flops) +
         field_varint(7, min_mem) + field_varint(8, resume_job) + field_varint(9, kept_steps))
    if model is not None:
        m += (field_bytes(10, model) + field_varint(11, mb_rows) + field_varint(12, micro_batches) +
              field_varint(13, schedule))
        for n in stage_units:
            m += field_varint(14, n)
    return m


def usage(lease, step=0, stages=((0, 1, 0),)):
    """ReportUsageRequest: stages as (stage, provider id, FLOPs; 0: the
    lease's plan's)"""
    m = field_bytes(1, lease) + field_varint(2, step)
    for st, pid, fl in stages:
        m += field_bytes(3, field_varint(1, st) + field_varint(2, pid) + field_varint(3, fl))
    return m


def replace(lease, lost_provider_id, kept_steps, reason="lost"):
    """ReplaceProviderRequest"""
    return (field_bytes(1, lease) + field_varint(2, lost_provider_id) + field_varint(3, kept_steps) +
            field_bytes(4, reason))


def hand_over(lease, provider_id, step, min_mem=0):
    """HandOverRequest"""
    return field_bytes(1, lease) + field_varint(2, provider_id) + field_varint(3, step) + field_varint(4, min_mem)
