"""Shared fixtures for the end-to-end tests of the `arceus` binary.

The binary comes from $ARCEUS_BIN (default: bin/arceus in the repository).
In CI it is the AddressSanitizer + UBSan build, so every run is checked for
sanitizer reports and for death by a signal, and the workloads are small.
"""

import gzip
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
FASHION = Path("/usr/share/datasets/fashion-mnist")

# tests/ref/refmodels.py: PyTorch twins of the engine's models.
sys.path.insert(0, str(REPO / "tests" / "ref"))

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error",
                     "UndefinedBehaviorSanitizer", "ThreadSanitizer")

# Generous: the ASan build on two busy cores is many times slower than release.
DEFAULT_TIMEOUT = 300


def _binary_path():
    p = os.environ.get("ARCEUS_BIN")
    path = Path(p) if p else REPO / "bin" / "arceus"
    if not path.is_absolute():
        path = (REPO / path).resolve()
    return path


@pytest.fixture(scope="session")
def arceus_bin():
    path = _binary_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"arceus binary not found or not executable: {path} "
                    "(build it with make, or set ARCEUS_BIN)")
    return path


def assert_no_crash(proc):
    """The process exited by itself (no signal) and no sanitizer spoke."""
    assert proc.returncode >= 0, (
        f"arceus died from signal {-proc.returncode}\nstderr:\n{proc.stderr[-4000:]}")
    for marker in SANITIZER_MARKERS:
        assert marker not in proc.stderr, f"sanitizer report ({marker}):\n{proc.stderr[-6000:]}"


def _env():
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:" + env.get("ASAN_OPTIONS", "")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    env.setdefault("LSAN_OPTIONS", "")
    return env


class Runner:
    def __init__(self, binary):
        self.binary = binary

    def __call__(self, *args, timeout=DEFAULT_TIMEOUT, cwd=None, check=False):
        """Run `arceus ARGS...`; returns the CompletedProcess (text mode).

        Always asserts the process was not killed by a signal and that no
        sanitizer report appeared; with check=True also that it exited 0.
        """
        cmd = [str(self.binary)] + [str(a) for a in args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                                  timeout=timeout, cwd=cwd, env=_env())
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n"
                        f"stderr so far:\n{(e.stderr or b'')[-2000:]!r}")
        assert_no_crash(proc)
        if check:
            assert proc.returncode == 0, (
                f"{' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return proc


@pytest.fixture(scope="session")
def run_arceus(arceus_bin):
    return Runner(arceus_bin)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

_WORDS = ("the a one that this every some no old young quick slow bright dark "
          "king queen fox dog cat bird sea ship river city garden night morning "
          "sees loves finds keeps sings hears follows remembers leaves builds "
          "and but so then while when where because under over near beyond").split()


def make_corpus_text(n_chars=6000, seed=0):
    """Deterministic lowercase English-like text: letters, space, ',', '.',
    and newlines between short paragraphs."""
    rng = random.Random(seed)
    parts = []
    size = 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 11))]
        s = " ".join(words)
        if rng.random() < 0.3:
            k = rng.randint(1, len(words) - 1)
            s = " ".join(words[:k]) + ", " + " ".join(words[k:])
        s += "."
        s += "\n" if rng.random() < 0.2 else " "
        parts.append(s)
        size += len(s)
    return "".join(parts)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A ~6 KB text file; its 10% validation split is ~600 characters,
    far more than the 17 a gpt-tiny window needs."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus_text())
    return path


def write_idx(path, array_bytes, dims, magic):
    """Write a (gzipped if path ends in .gz) IDX file."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
    data = header + array_bytes
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=1)
    Path(path).write_bytes(data)


def read_idx(path):
    """Read a gzip IDX file -> (dims, raw payload bytes)."""
    raw = gzip.open(path).read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return dims, raw[4 + 4 * ndim:]


@pytest.fixture(scope="session")
def fashion_dir():
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found at {FASHION} (Debian's dataset-fashion-mnist)")
    return FASHION


@pytest.fixture(scope="session")
def small_fashion(tmp_path_factory, fashion_dir):
    """The first 1024 training and 256 test examples of Fashion-MNIST, as
    gzip IDX files: quick to load for tests that only need real-looking data."""
    out = tmp_path_factory.mktemp("fashion-small")
    for split, n in (("train", 1024), ("t10k", 256)):
        dims, payload = read_idx(fashion_dir / f"{split}-images-idx3-ubyte.gz")
        write_idx(out / f"{split}-images-idx3-ubyte.gz", payload[:n * dims[1] * dims[2]],
                  (n, dims[1], dims[2]), 0x00000803)
        _, payload = read_idx(fashion_dir / f"{split}-labels-idx1-ubyte.gz")
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", payload[:n], (n,), 0x00000801)
    return out


@pytest.fixture(scope="session")
def small_mlp_spec(tmp_path_factory):
    """A small MLP (784-64-32-10, gelu): three linear layers, so it can be
    split into up to three pipeline stages."""
    path = tmp_path_factory.mktemp("spec") / "mlp-small.json"
    path.write_text(json.dumps({"type": "mlp", "inputs": 784, "hidden": [64, 32],
                                "classes": 10, "activation": "gelu", "dropout": 0.0}))
    return path


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Shared training runs (session-scoped: each trains once for all tests)
# ---------------------------------------------------------------------------

GPT_ARGS = ("--steps", "20", "--batch", "8", "--eval-every", "10", "--eval-batches", "2")
MLP_ARGS = ("--steps", "60", "--batch", "128", "--eval-every", "30")


@pytest.fixture(scope="session")
def gpt_run(tmp_path_factory, run_arceus, corpus):
    """gpt-tiny trained 20 steps on the corpus, with --out and --log."""
    d = tmp_path_factory.mktemp("gpt-run")
    out, log = d / "ckpt", d / "train.jsonl"
    proc = run_arceus("train", "--model", CONFIGS / "gpt-tiny.json", "--data", corpus,
                      *GPT_ARGS, "--out", out, "--log", log, check=True)
    return {"out": out, "log": log, "proc": proc}


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory, run_arceus, fashion_dir):
    """configs/mlp-fashion.json trained 60 steps on Fashion-MNIST."""
    d = tmp_path_factory.mktemp("mlp-run")
    out, log = d / "ckpt", d / "train.jsonl"
    proc = run_arceus("train", "--model", CONFIGS / "mlp-fashion.json", "--data", fashion_dir,
                      *MLP_ARGS, "--out", out, "--log", log, check=True)
    return {"out": out, "log": log, "proc": proc}
