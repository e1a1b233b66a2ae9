"""Bad input gets one clear error line, a non-zero exit, and no crash."""

import json
import shutil

import pytest

from conftest import CONFIGS, FASHION, write_idx

GPT_TINY = CONFIGS / "gpt-tiny.json"
MLP = CONFIGS / "mlp-fashion.json"

GPT_SPEC = {"type": "gpt", "vocab_size": 0, "block_size": 16, "n_layer": 2,
            "n_head": 8, "n_embd": 32, "dropout": 0.0}
MLP_SPEC = {"type": "mlp", "inputs": 784, "hidden": [64], "classes": 10,
            "activation": "relu", "dropout": 0.0}


def error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines, f"no message on stderr (exit {proc.returncode}); stdout:\n{proc.stdout[-2000:]}"
    return lines[-1]


def assert_error(proc, *keywords, exit_codes=None):
    """Non-zero exit; stderr's last line is `arceus ...error...` naming every keyword."""
    assert proc.returncode != 0, f"expected failure, got exit 0\nstderr:\n{proc.stderr[-2000:]}"
    if exit_codes is not None:
        assert proc.returncode in exit_codes, proc.stderr
    line = error_line(proc)
    assert line.startswith("arceus"), f"last stderr line is not an arceus error: {line!r}"
    assert "error" in line, f"no 'error' in {line!r}"
    for k in keywords:
        assert str(k).lower() in line.lower(), f"{k!r} not named in {line!r}"
    # one clear line: no stack of messages, no usage dump after the error
    others = [l for l in proc.stderr.splitlines() if "error" in l and l != line]
    assert not others, f"several error lines:\n{proc.stderr}"
    return line


def write_spec(tmp_path, name, spec):
    p = tmp_path / name
    p.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return p


# ---------------------------------------------------------------------------
# help and commands
# ---------------------------------------------------------------------------

def test_top_level_help(run_arceus):
    for args in (["--help"], ["-h"]):
        p = run_arceus(*args)
        assert p.returncode == 0, p.stderr
        assert "usage: arceus" in p.stdout
        for cmd in ("train", "sample", "eval"):
            assert cmd in p.stdout


@pytest.mark.parametrize("cmd", ["train", "sample", "eval"])
def test_command_help(run_arceus, cmd):
    p = run_arceus(cmd, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: arceus {cmd}"), p.stdout[:200]
    assert "--" in p.stdout


def test_unknown_command(run_arceus):
    p = run_arceus("nonsense")
    assert p.returncode != 0
    # The error comes first; a usage summary may follow it.
    first = p.stderr.splitlines()[0]
    assert first.startswith("arceus") and "error" in first and "nonsense" in first, p.stderr


@pytest.mark.parametrize("cmd,missing", [("train", "--model"), ("sample", "--ckpt"),
                                         ("eval", "--ckpt")])
def test_required_option(run_arceus, cmd, missing):
    assert_error(run_arceus(cmd), missing)


# ---------------------------------------------------------------------------
# model specs
# ---------------------------------------------------------------------------

def test_malformed_json(run_arceus, tmp_path, corpus):
    spec = write_spec(tmp_path, "broken.json", '{"type": "gpt", "block_size": 16,')
    assert_error(run_arceus("train", "--model", spec, "--data", corpus, "--steps", "1"),
                 "broken.json")


def test_spec_not_an_object(run_arceus, tmp_path, corpus):
    spec = write_spec(tmp_path, "list.json", "[1, 2, 3]")
    assert_error(run_arceus("train", "--model", spec, "--data", corpus, "--steps", "1"),
                 "list.json")


@pytest.mark.parametrize("base", [GPT_SPEC, MLP_SPEC], ids=["gpt", "mlp"])
def test_unknown_key(run_arceus, tmp_path, corpus, base):
    spec = write_spec(tmp_path, "extra.json", dict(base, colour="red"))
    line = assert_error(run_arceus("train", "--model", spec, "--data", corpus, "--steps", "1"),
                        "extra.json", "colour")
    assert "unknown" in line


@pytest.mark.parametrize("change,key", [
    ({"n_head": 5}, "n_head"),                # 32 is not a multiple of 5
    ({"n_embd": 36, "n_head": 8}, "n_embd"),  # 36 is not a multiple of 8
    ({"block_size": -16}, "block_size"),
    ({"n_layer": -1}, "n_layer"),
    ({"n_embd": 0}, "n_embd"),
    ({"n_layer": "two"}, "n_layer"),
    ({"block_size": 16.5}, "block_size"),
    ({"dropout": "none"}, "dropout"),
    ({"dropout": 1.5}, "dropout"),
    ({"type": "cnn"}, "cnn"),
], ids=lambda v: str(v))
def test_bad_gpt_values(run_arceus, tmp_path, corpus, change, key):
    spec = write_spec(tmp_path, "bad.json", dict(GPT_SPEC, **change))
    assert_error(run_arceus("train", "--model", spec, "--data", corpus, "--steps", "1"),
                 "bad.json", key)


@pytest.mark.parametrize("change,key", [
    ({"hidden": [-5]}, "hidden"),
    ({"hidden": "wide"}, "hidden"),
    ({"inputs": 0}, "inputs"),
    ({"classes": -3}, "classes"),
    ({"activation": "tanh"}, "activation"),
    ({"activation": 3}, "activation"),
], ids=lambda v: str(v))
def test_bad_mlp_values(run_arceus, tmp_path, small_fashion, change, key):
    spec = write_spec(tmp_path, "bad.json", dict(MLP_SPEC, **change))
    assert_error(run_arceus("train", "--model", spec, "--data", small_fashion, "--steps", "1"),
                 "bad.json", key)


def test_missing_gpt_key(run_arceus, tmp_path, corpus):
    spec = dict(GPT_SPEC)
    del spec["n_head"]
    p = write_spec(tmp_path, "short.json", spec)
    assert_error(run_arceus("train", "--model", p, "--data", corpus, "--steps", "1"),
                 "short.json", "n_head")


def test_missing_spec_file(run_arceus, tmp_path, corpus):
    assert_error(run_arceus("train", "--model", tmp_path / "nope.json", "--data", corpus),
                 "nope.json")


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

def test_missing_idx_dir(run_arceus):
    assert_error(run_arceus("train", "--model", MLP, "--data", "/nonexistent", "--steps", "1"),
                 "/nonexistent")


def test_missing_text_file(run_arceus, tmp_path):
    assert_error(run_arceus("train", "--model", GPT_TINY, "--data", tmp_path / "gone.txt",
                            "--steps", "1"), "gone.txt")


def _idx_dir(tmp_path, name, train_images=None, train_labels=None, gz=False):
    """An IDX folder of small valid files (100 train, 50 test), with the
    training images/labels replaced by the given raw file contents."""
    d = tmp_path / name
    d.mkdir()
    sfx = ".gz" if gz else ""
    write_idx(d / f"train-images-idx3-ubyte{sfx}", bytes(100 * 784), (100, 28, 28), 0x803)
    write_idx(d / f"train-labels-idx1-ubyte{sfx}", bytes(100), (100,), 0x801)
    write_idx(d / f"t10k-images-idx3-ubyte{sfx}", bytes(50 * 784), (50, 28, 28), 0x803)
    write_idx(d / f"t10k-labels-idx1-ubyte{sfx}", bytes(50), (50,), 0x801)
    if train_images is not None:
        (d / f"train-images-idx3-ubyte{sfx}").write_bytes(train_images)
    if train_labels is not None:
        (d / f"train-labels-idx1-ubyte{sfx}").write_bytes(train_labels)
    return d


def _train_mlp(run_arceus, data, spec):
    return run_arceus("train", "--model", spec, "--data", data, "--steps", "2", "--batch", "8",
                      "--quiet")


@pytest.fixture
def mlp_spec(tmp_path):
    return write_spec(tmp_path, "mlp.json", MLP_SPEC)


def test_small_idx_dir_is_fine(run_arceus, tmp_path, mlp_spec):
    """Sanity check of the IDX writer used by the failure cases below."""
    p = _train_mlp(run_arceus, _idx_dir(tmp_path, "ok"), mlp_spec)
    assert p.returncode == 0, p.stderr


def test_truncated_raw_idx(run_arceus, tmp_path, mlp_spec):
    # header promises 100 images, only 10 are present
    head = bytes.fromhex("00000803") + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    d = _idx_dir(tmp_path, "trunc", train_images=head + bytes(10 * 784))
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "train-images-idx3-ubyte", "truncated")


def test_truncated_header_idx(run_arceus, tmp_path, mlp_spec):
    d = _idx_dir(tmp_path, "hdr", train_images=b"\x00\x00\x08")
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "train-images-idx3-ubyte")


def test_truncated_gzip_idx(run_arceus, tmp_path, mlp_spec):
    d = _idx_dir(tmp_path, "truncgz", gz=True)
    f = d / "train-images-idx3-ubyte.gz"
    raw = f.read_bytes()
    f.write_bytes(raw[:len(raw) // 2])
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "train-images-idx3-ubyte.gz")


def test_truncated_real_fashion_gz(run_arceus, tmp_path, mlp_spec):
    """A real Fashion-MNIST download cut short (test set: the smaller file)."""
    d = tmp_path / "real"
    d.mkdir()
    for f in FASHION.iterdir():
        shutil.copy(f, d / f.name)
    src = FASHION / "t10k-labels-idx1-ubyte.gz"
    raw = src.read_bytes()
    (d / src.name).write_bytes(raw[:len(raw) // 3])
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "t10k-labels-idx1-ubyte.gz")


def test_not_gzip(run_arceus, tmp_path, mlp_spec):
    d = _idx_dir(tmp_path, "garbage", gz=True)
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"this is not a gzip stream " * 20)
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "train-images-idx3-ubyte")


def test_wrong_magic_idx(run_arceus, tmp_path, mlp_spec):
    head = bytes.fromhex("12345678") + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    d = _idx_dir(tmp_path, "magic", train_images=head + bytes(100 * 784))
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "train-images-idx3-ubyte", "magic")


def test_labels_images_mismatch(run_arceus, tmp_path, mlp_spec):
    labels = bytes.fromhex("00000801") + (90).to_bytes(4, "big") + bytes(90)
    d = _idx_dir(tmp_path, "mismatch", train_labels=labels)
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "train-labels-idx1-ubyte")


def test_label_out_of_range(run_arceus, tmp_path, mlp_spec):
    labels = bytes.fromhex("00000801") + (100).to_bytes(4, "big") + bytes([42]) * 100
    d = _idx_dir(tmp_path, "labels", train_labels=labels)
    assert_error(_train_mlp(run_arceus, d, mlp_spec), "42")


def test_empty_text_file(run_arceus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_error(run_arceus("train", "--model", GPT_TINY, "--data", empty, "--steps", "1"),
                 "empty.txt")


def test_text_too_short_for_validation(run_arceus, tmp_path):
    """30 characters: the 10% validation split cannot hold one 17-token window.
    This must be refused before training, not after the last step."""
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    p = run_arceus("train", "--model", GPT_TINY, "--data", short, "--steps", "3",
                   "--eval-every", "0", "--out", tmp_path / "out")
    assert_error(p, "validation")
    assert "train 1/" not in p.stderr + p.stdout, "trained before noticing the data is too short"


def test_eval_text_with_other_vocabulary(run_arceus, tmp_path, gpt_run):
    other = tmp_path / "other.txt"
    other.write_text("THE QUICK BROWN FOX! " * 100)
    assert_error(run_arceus("eval", "--ckpt", gpt_run["out"], "--data", other), "other.txt")


# ---------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------

def test_out_under_regular_file(run_arceus, tmp_path, corpus):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_error(run_arceus("train", "--model", GPT_TINY, "--data", corpus, "--steps", "1",
                            "--out", blocker / "sub"), "afile/sub")


def test_out_in_proc(run_arceus, corpus):
    assert_error(run_arceus("train", "--model", GPT_TINY, "--data", corpus, "--steps", "1",
                            "--out", "/proc/forbidden"), "/proc/forbidden")


def test_unwritable_log(run_arceus, tmp_path, corpus):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_error(run_arceus("train", "--model", GPT_TINY, "--data", corpus, "--steps", "1",
                            "--log", blocker / "log.jsonl"), "log")


# ---------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags,key", [
    (["--steps", "abc"], "--steps"),
    (["--steps", "-1"], "--steps"),
    (["--steps"], "--steps"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--workers", "foo"], "--workers"),
    (["--workers", "local:0"], "--workers"),
    (["--schedule", "nope"], "--schedule"),
    (["--compress", "int4"], "--compress"),
    (["--micro-batches", "3", "--batch", "16"], "--micro-batches"),
    (["--lr", "abc"], "--lr"),
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--threads", "-2"], "--threads"),
    (["--stop-after", "0"], "--stop-after"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_train_flags(run_arceus, corpus, flags, key):
    p = run_arceus("train", "--model", GPT_TINY, "--data", corpus, *flags)
    assert_error(p, key)


def test_resume_missing_dir(run_arceus, tmp_path, corpus):
    assert_error(run_arceus("train", "--resume", tmp_path / "nothing", "--data", corpus),
                 "nothing")


def test_more_stages_than_layers(run_arceus, corpus):
    # gpt-tiny has 4 pipeline units (embedding, 2 blocks, head)
    assert_error(run_arceus("train", "--model", GPT_TINY, "--data", corpus,
                            "--workers", "local:5", "--steps", "1"), "stages")


# ---------------------------------------------------------------------------
# sample / eval
# ---------------------------------------------------------------------------

def test_sample_missing_checkpoint(run_arceus, tmp_path):
    assert_error(run_arceus("sample", "--ckpt", tmp_path / "nockpt"), "nockpt")


def test_eval_missing_checkpoint(run_arceus, tmp_path, corpus):
    assert_error(run_arceus("eval", "--ckpt", tmp_path / "nockpt", "--data", corpus), "nockpt")


def test_sample_prompt_outside_vocab(run_arceus, gpt_run):
    p = run_arceus("sample", "--ckpt", gpt_run["out"], "--prompt", "Hello ZQ", "--tokens", "5")
    assert_error(p, "--prompt", "vocabulary")
    assert p.stdout == "", "printed text before rejecting the prompt"


@pytest.mark.parametrize("flags,key", [
    (["--tokens", "abc"], "--tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--prompt", ""], "--prompt"),
    (["--wat"], "--wat"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_sample_flags(run_arceus, gpt_run, flags, key):
    assert_error(run_arceus("sample", "--ckpt", gpt_run["out"], *flags), key)


def test_sample_needs_language_model(run_arceus, tmp_path, small_fashion, small_mlp_spec):
    out = tmp_path / "mlp"
    run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", "1",
               "--batch", "8", "--out", out, "--quiet", check=True)
    assert_error(run_arceus("sample", "--ckpt", out, "--prompt", "x"), "language")


def test_corrupt_checkpoint(run_arceus, tmp_path, gpt_run, corpus):
    bad = tmp_path / "bad"
    shutil.copytree(gpt_run["out"], bad)
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    assert_error(run_arceus("eval", "--ckpt", bad, "--data", corpus), "model.safetensors")
    assert_error(run_arceus("sample", "--ckpt", bad, "--prompt", "the "), "model.safetensors")


def test_bad_spec_in_checkpoint(run_arceus, tmp_path, gpt_run, corpus):
    bad = tmp_path / "bad"
    shutil.copytree(gpt_run["out"], bad)
    (bad / "spec.json").write_text("{ nope")
    assert_error(run_arceus("eval", "--ckpt", bad, "--data", corpus), "spec.json")


def test_bad_plan(run_arceus, corpus):
    # a gap between stage 0 (layers 0-1) and stage 1 (layer 3)
    assert_error(run_arceus("train", "--model", GPT_TINY, "--data", corpus, "--workers", "local:2",
                            "--plan", "0-1,3-3", "--steps", "1"), "plan")
