"""The pipeline over gRPC: `arceus worker` processes on 127.0.0.1.

Every worker is started on port 0 (the "listening on" line gives the port)
and is always terminated in teardown (the `procs` fixture of conftest.py). The driver runs with --threads 1 and
the workers with --threads 1, so the runs are bitwise comparable with one
stage in one process.
"""

import re
import signal
import struct
import subprocess
import time

import pytest

from conftest import CONFIGS, REPO, read_log, _env
from pbwire import decode, field_bytes, field_f32, field_varint, varint

grpc = pytest.importorskip("grpc")

PROTOCOL_VERSION = 6


# ---------------------------------------------------------------------------
# Workers (the `workers` fixture of conftest.py starts them)
# ---------------------------------------------------------------------------

def addrs(ws):
    return ",".join(w.addr for w in ws)


def kill_mid_run(cmd, log, victim, lines=3, timeout=120):
    """Start the driver `cmd`, SIGKILL the worker `victim` once the driver's
    --log has `lines` lines (steps under way), and wait for the driver:
    (its exit code, its stderr)."""
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and driver.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= lines:
                break
            time.sleep(0.1)
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        victim.kill()
        _, err = driver.communicate(timeout=timeout)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    return driver.returncode, err


# ---------------------------------------------------------------------------
# Distributed equals single
# ---------------------------------------------------------------------------

# --compress none: float32 on every link, so a pipeline is bitwise one device
# (auto would too on loopback, by its floor; the parity tests say so anyway)
MLP_RUN = ("--steps", "6", "--batch", "32", "--micro-batches", "4", "--eval-every", "3", "--compress", "none")
GPT_RUN = ("--steps", "4", "--batch", "8", "--micro-batches", "4", "--eval-every", "2",
           "--eval-batches", "1", "--compress", "none")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_mlp_three_workers_equal_one_stage(run_arceus, workers, tmp_path, small_mlp_spec,
                                           small_fashion, schedule):
    args = ("--model", small_mlp_spec, "--data", small_fashion, *MLP_RUN, "--schedule", schedule,
            "--threads", "1")
    run_arceus("train", *args, "--out", tmp_path / "one", check=True)
    ws = workers(3)
    p = run_arceus("train", *args, "--workers", addrs(ws), "--plan", "0-0,1-1,2-2",
                   "--out", tmp_path / "three", check=True)
    # the printed plan: stage 2 holds layer 2 on the third worker
    assert re.search(r"^2\s+%s\s+linear 2\b" % re.escape(ws[2].addr), p.stdout, re.M), p.stdout
    assert "predicted bubble" in p.stdout
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpt_three_workers_equal_one_stage(run_arceus, workers, tmp_path, corpus, schedule):
    args = ("--model", CONFIGS / "gpt-tiny.json", "--data", corpus, *GPT_RUN, "--schedule", schedule,
            "--threads", "1")
    run_arceus("train", *args, "--out", tmp_path / "one", check=True)
    ws = workers(3)
    # a pipeline by hand: the planner may put blocks on a tensor-parallel
    # group, which matches one device within 1e-5, not bit for bit
    run_arceus("train", *args, "--workers", addrs(ws), "--plan", "0-1,2-2,3-3", "--out", tmp_path / "three",
               check=True)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


def test_resume_over_workers_equals_uninterrupted(run_arceus, workers, tmp_path, small_mlp_spec,
                                                  small_fashion):
    """Save (checkpoint at --stop-after) and Restore (--resume) through the workers."""
    args = ("--data", small_fashion, "--steps", "6", "--batch", "32", "--micro-batches", "2",
            "--eval-every", "0", "--threads", "1", "--compress", "none")
    run_arceus("train", "--model", small_mlp_spec, *args, "--out", tmp_path / "one", check=True)
    ws = workers(3)
    run_arceus("train", "--model", small_mlp_spec, *args, "--workers", addrs(ws), "--stop-after", "3",
               "--out", tmp_path / "split", check=True)
    # fresh workers: the state comes back only through Restore
    ws2 = workers(2)
    run_arceus("train", "--resume", tmp_path / "split", *args, "--workers", addrs(ws2), check=True)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "split" / name).read_bytes(), name


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------

def test_worker_killed_mid_run_names_the_stage(arceus_bin, workers, tmp_path, small_mlp_spec,
                                               small_fashion):
    ws = workers(3)
    out = tmp_path / "ckpt"
    log = tmp_path / "log.jsonl"
    cmd = [str(arceus_bin), "train", "--model", str(small_mlp_spec), "--data", str(small_fashion),
           "--steps", "100000", "--batch", "32", "--micro-batches", "4", "--eval-every", "0",
           "--threads", "1", "--workers", addrs(ws), "--plan", "0-0,1-1,2-2", "--out", str(out),
           "--log", str(log)]
    returncode, err = kill_mid_run(cmd, log, ws[1])
    assert returncode > 0, err[-3000:]
    assert f"stage 1 ({ws[1].addr}) disconnected" in err, err[-3000:]
    assert not (out / "state.json").exists(), "a checkpoint was written for a failed run"
    # the surviving workers are still healthy and exit 0 on SIGTERM (teardown)


def test_unreachable_worker_is_named(run_arceus, small_mlp_spec, small_fashion):
    p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", "1",
                   "--workers", "127.0.0.1:1,127.0.0.1:2", timeout=120)
    assert p.returncode != 0
    assert "worker 0 (127.0.0.1:1)" in p.stderr, p.stderr


def test_sigterm_stops_a_worker_cleanly(workers):
    w, = workers(1)
    assert w.stop(signal.SIGTERM) == 0, w.stderr
    assert "shutting down" in w.stderr


def test_sigint_stops_a_worker_cleanly(workers):
    w, = workers(1)
    assert w.stop(signal.SIGINT) == 0, w.stderr


# ---------------------------------------------------------------------------
# A foreign client: python grpcio with hand-encoded protobuf
# ---------------------------------------------------------------------------

def hello_request(version=PROTOCOL_VERSION):
    return field_varint(1, version) + field_bytes(2, "pytest") + field_bytes(3, "")


MLP_SPEC = ('{"type": "mlp", "inputs": 8, "hidden": [6], "classes": 3, '
            '"activation": "relu", "dropout": 0.0}')


def load_request(spec=MLP_SPEC, first=0, last=2):
    opt = field_varint(1, 0) + field_f32(2, 0.9) + field_f32(3, 0.99) + field_f32(4, 1e-8)
    return (field_bytes(1, spec) + field_varint(2, first) + field_varint(3, last) +
            field_varint(4, 4) + field_varint(5, 1) + field_varint(6, 1) + field_varint(7, 0) +
            field_varint(8, 1) + field_varint(9, 7) + field_bytes(10, opt))


def frame(kind, nmb=0, rows=0, dtype=0, shape=(), payload=b"", step=0):
    packed = b"".join(varint(d) for d in shape)
    m = field_varint(1, kind) + field_varint(2, step) + field_varint(4, nmb) + field_varint(5, rows)
    m += field_varint(6, dtype)
    if shape:
        m += field_bytes(7, packed)
    if payload:
        m += field_bytes(10, payload)
    return m


def unary(channel, method, req, timeout=30):
    return channel.unary_unary(f"/arceus.Worker/{method}")(req, timeout=timeout)


def load_session(channel, req):
    """Load; returns the stage's session (LoadReply.session), which Save,
    Restore and Pipe must carry."""
    return decode(unary(channel, "Load", req)).get(2, [b""])[0].decode()


def with_session(first, session):
    """A Pipe's first frame carrying the stage's session (Frame.session,
    field 16)."""
    return first + field_bytes(16, session)


def pipe(channel, frames, timeout=30):
    return list(channel.stream_stream("/arceus.Worker/Pipe")(iter(frames), timeout=timeout))


def test_foreign_client_hello(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        r = decode(unary(ch, "Hello", hello_request()))
    assert r[1] == [PROTOCOL_VERSION]
    assert r[2] == [w.addr.encode()]
    caps = [c.decode() for c in r.get(3, [])]
    assert "pipeline" in caps and "gpt" in caps and "mlp" in caps
    gflops = struct.unpack("<d", r[4][0])[0]
    assert gflops > 0
    assert r[5][0] > 0          # free memory, bytes
    assert r[6] == [1]          # threads


def test_wrong_protocol_version_is_refused(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            unary(ch, "Hello", hello_request(version=99))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version" in e.value.details() and "99" in e.value.details()
        # a peer of the last version reads NORM records without digest words:
        # refused by name, not left to misparse them
        with pytest.raises(grpc.RpcError) as e:
            unary(ch, "Hello", hello_request(version=PROTOCOL_VERSION - 1))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        d = e.value.details()
        assert f"speaks version {PROTOCOL_VERSION - 1}" in d and f"speaks version {PROTOCOL_VERSION}" in d, d
        unary(ch, "Hello", hello_request())  # still serving


def test_pipe_before_load(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pipe(ch, [frame(9)])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stage not loaded" in e.value.details()


@pytest.mark.parametrize("spec,first,last,what", [
    ('{"type": "mlp", "inputs": 8}', 0, 1, "classes"),
    ('{"type": "mlp", "inputs": 8, "hidden": [6], "classes": 3, "bogus": 1}', 0, 1, "bogus"),
    ("not json", 0, 1, ""),
    (MLP_SPEC, 1, 5, "out of range"),
])
def test_invalid_load_is_refused(workers, spec, first, last, what):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            unary(ch, "Load", load_request(spec, first, last))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert what in e.value.details(), e.value.details()
        unary(ch, "Hello", hello_request())  # still serving


def test_bad_frame_gets_invalid_argument_and_the_worker_goes_on(workers):
    w, = workers(1)
    with grpc.insecure_channel(w.addr) as ch:
        session = load_session(ch, load_request())
        # shape (10,) float32 = 40 bytes, but 12 bytes of payload
        bad = frame(1, nmb=1, rows=1, dtype=0, shape=(10,), payload=b"\0" * 12)
        with pytest.raises(grpc.RpcError) as e:
            pipe(ch, [bad])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "40" in e.value.details() and "12" in e.value.details(), e.value.details()
        # garbage bytes that are not a Frame at all
        with pytest.raises(grpc.RpcError) as e:
            pipe(ch, [b"\xff\xff\xff"])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the next client is served: a SYNC frame comes back
    with grpc.insecure_channel(w.addr) as ch:
        replies = pipe(ch, [with_session(frame(9, step=5), session)])
        assert len(replies) == 1
        assert decode(replies[0])[1] == [9]


def test_driver_killed_mid_run_workers_serve_the_next_one(arceus_bin, run_arceus, workers, tmp_path,
                                                          small_mlp_spec, small_fashion):
    """The workers drop the vanished driver's step and serve a new run, which
    is still bitwise equal to one stage."""
    ws = workers(3)
    log = tmp_path / "log.jsonl"
    cmd = [str(arceus_bin), "train", "--model", str(small_mlp_spec), "--data", str(small_fashion),
           "--steps", "100000", "--batch", "32", "--micro-batches", "4", "--eval-every", "0",
           "--threads", "1", "--workers", addrs(ws), "--plan", "0-0,1-1,2-2", "--log", str(log)]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and driver.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert driver.poll() is None
    finally:
        driver.kill()
        driver.communicate()
    args = ("--model", small_mlp_spec, "--data", small_fashion, *MLP_RUN, "--threads", "1")
    run_arceus("train", *args, "--out", tmp_path / "one", check=True)
    run_arceus("train", *args, "--workers", addrs(ws), "--out", tmp_path / "three", check=True)
    assert ((tmp_path / "one" / "model.safetensors").read_bytes() ==
            (tmp_path / "three" / "model.safetensors").read_bytes())
    for w in ws:
        assert w.proc.poll() is None, f"worker {w.addr} died"


def test_driver_refuses_a_worker_of_another_protocol_version(run_arceus, small_mlp_spec, small_fashion):
    """A fake worker (python grpcio) answering Hello with version 1 (an older arceus)."""
    from concurrent import futures
    reply = field_varint(1, 1) + field_bytes(2, "fake") + field_bytes(3, "pipeline")
    handler = grpc.method_handlers_generic_handler("arceus.Worker", {
        "Hello": grpc.unary_unary_rpc_method_handler(lambda req, ctx: reply)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        p = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", "1",
                       "--workers", f"127.0.0.1:{port}", timeout=120)
    finally:
        server.stop(None)
    assert p.returncode != 0
    assert f"127.0.0.1:{port}" in p.stderr and "protocol version 1" in p.stderr, p.stderr


# ---------------------------------------------------------------------------
# Parity: 20 steps, every step's loss and the final weights bitwise
# identical: one stage, three in-process stages, three worker processes, with
# GPipe and with 1F1B.
# ---------------------------------------------------------------------------

def _losses(log):
    return [r["loss"] for r in read_log(log) if "loss" in r and "val_loss" not in r]


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_twenty_steps_identical_every_way(run_arceus, workers, tmp_path, small_mlp_spec,
                                          small_fashion, corpus, model):
    if model == "mlp":
        args = ["--model", small_mlp_spec, "--data", small_fashion, "--batch", "32"]
        plan = "0-0,1-1,2-2"
    else:
        args = ["--model", CONFIGS / "gpt-tiny.json", "--data", corpus, "--batch", "8",
                "--eval-batches", "1"]
        plan = "0-1,2-2,3-3"
    args += ["--steps", "20", "--micro-batches", "4", "--eval-every", "0", "--threads", "1", "--compress", "none"]

    def run(name, *extra):
        out, log = tmp_path / name, tmp_path / f"{name}.jsonl"
        run_arceus("train", *args, *extra, "--out", out, "--log", log, check=True)
        return _losses(log), (out / "model.safetensors").read_bytes()

    base_losses, base_model = run("one")
    assert len(base_losses) == 20
    ws = workers(3)
    for schedule in ("gpipe", "1f1b"):
        for where in ("local:3", addrs(ws)):
            losses, weights = run(f"{schedule}-{len(where)}", "--workers", where, "--plan", plan,
                                  "--schedule", schedule)
            assert losses == base_losses, (schedule, where)
            assert weights == base_model, (schedule, where)


# ---------------------------------------------------------------------------
# Accuracy: three worker processes train the MLP on Fashion-MNIST to
# the same test accuracy as one device, and gpt-5m on TinyShakespeare.
# ---------------------------------------------------------------------------

def _accuracy(log):
    return [r["accuracy"] for r in read_log(log) if "accuracy" in r][-1]


def test_mlp_fashion_three_workers_same_accuracy(run_arceus, workers, tmp_path, fashion_dir):
    args = ("--model", CONFIGS / "mlp-fashion.json", "--data", fashion_dir, "--steps", "120",
            "--batch", "128", "--micro-batches", "4", "--eval-every", "0", "--threads", "1", "--compress", "none")
    run_arceus("train", *args, "--log", tmp_path / "one.jsonl", check=True)
    ws = workers(3, "--threads", "1")
    p = run_arceus("train", *args, "--workers", addrs(ws), "--plan", "0-0,1-1,2-2",
                   "--log", tmp_path / "three.jsonl", check=True)
    one, three = _accuracy(tmp_path / "one.jsonl"), _accuracy(tmp_path / "three.jsonl")
    assert one == three
    assert three > 0.75, three
    assert "test accuracy" in p.stdout


SHAKESPEARE = REPO / ".." / "shared" / "data" / "tinyshakespeare.txt"


def test_gpt5m_three_workers_short_run(run_arceus, workers, tmp_path, corpus):
    text = SHAKESPEARE if SHAKESPEARE.exists() else corpus
    ws = workers(3, "--threads", "1")
    log = tmp_path / "gpt.jsonl"
    p = run_arceus("train", "--model", CONFIGS / "gpt-5m.json", "--data", text, "--steps", "4",
                   "--batch", "8", "--micro-batches", "4", "--eval-every", "0", "--eval-batches", "1",
                   "--threads", "1", "--workers", addrs(ws), "--log", log, check=True)
    losses = _losses(log)
    assert len(losses) == 4 and all(l == l for l in losses)
    assert losses[-1] < losses[0], losses
    assert "predicted bubble" in p.stdout and "final val loss" in p.stdout


# ---------------------------------------------------------------------------
# A worker of one's own, with a secret: every Load must carry it.
# ---------------------------------------------------------------------------

def test_worker_with_a_token_refuses_loads_without_it(run_arceus, workers, tmp_path, small_mlp_spec,
                                                      small_fashion):
    ws = workers(2, "--token", "correct-horse-42")
    args = ("--model", small_mlp_spec, "--data", small_fashion, *MLP_RUN, "--threads", "1",
            "--workers", addrs(ws))
    p = run_arceus("train", *args)
    assert p.returncode == 1 and "--worker-token" in p.stderr, p.stderr[-2000:]
    p = run_arceus("train", *args, "--worker-token", "wrong-horse-42")
    assert p.returncode == 1 and "needs its token" in p.stderr, p.stderr[-2000:]
    run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, *MLP_RUN, "--threads", "1",
               "--out", tmp_path / "one", check=True)
    run_arceus("train", *args, "--worker-token", "correct-horse-42", "--out", tmp_path / "two", check=True)
    assert ((tmp_path / "one" / "model.safetensors").read_bytes() ==
            (tmp_path / "two" / "model.safetensors").read_bytes())
    # too short a secret is refused up front
    p = run_arceus("worker", "--listen", "127.0.0.1:0", "--token", "short")
    assert p.returncode == 2 and "16 to 255" in p.stderr
