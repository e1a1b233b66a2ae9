"""What the tests of scripts/demo.sh share (test_demo*.py): the demo's
environment, the checks of the Fashion-MNIST demo's output, and process
lookups. The demo's tests are split over files so that the parallel runner
(pytest-xdist, a file per worker) can run the long ones side by side."""

import os
import re
from pathlib import Path

from conftest import SANITIZER_MARKERS, _env

ROOT = Path(__file__).resolve().parents[2]
STEPS = 200


def alive(pid):
    """Whether pid is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text):
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and alive(int(d.name)):
            found.append(f"{d.name}: {cmd}")
    return found


def demo_env(arceus_bin, tmp_path, steps=None, **extra):
    env = _env()
    env.update(ARCEUS_BIN=str(arceus_bin), ARCEUS_DEMO_SKIP_DEPS="1", ARCEUS_DEMO_STEPS=str(steps or STEPS),
               ARCEUS_DEMO_OUT=str(tmp_path / "demo"), TMPDIR=str(tmp_path), **extra)
    return env


def check_demo(out, tmp_path, took, steps=STEPS, min_accuracy=80.0):
    for marker in SANITIZER_MARKERS:
        assert marker not in out, out[-6000:]

    # the lease of three providers, then a plan of three stages on three devices
    assert re.search(r"lease \d+ for job \d+ from market \S+: 3 providers", out), out
    plan = re.findall(r"^(\d)\s+(127\.0\.0\.1:\d+)\s+linear \d", out, re.M)
    assert [s for s, _ in plan] == ["0", "1", "2"], out
    assert len({d for _, d in plan}) == 3, out
    assert re.search(rf"^train\s+{steps}/{steps} \|", out, re.M), out  # the progress lines

    acc = float(re.search(r"^test accuracy ([\d.]+)%", out, re.M).group(1))
    assert acc >= min_accuracy, out

    # the ledger: a summary per account (its rows by reason), not hundreds of rows
    summaries = re.findall(r"^ledger of (\S+): (\d+) rows?$", out, re.M)
    assert [name for name, _ in summaries] == ["renter", "ada", "grace", "linus"], out
    assert int(summaries[0][1]) > steps, out  # the renter paid every step of every stage
    assert re.search(r"^  usage\s+\d+\s+-\d+\.\d{6}$", out, re.M), out
    assert not re.search(r"^\d+\s+\d+\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+usage", out, re.M), out
    # four accounts' balances, and the sum of every row (mint included) zero
    balances = re.findall(r"^balance: ([\d.]+) credits$", out, re.M)
    assert len(balances) == 4, out
    m = re.search(r"renter paid ([\d.]+) credits; providers earned ([\d.]+) credits", out)
    assert m and m.group(1) == m.group(2) and float(m.group(1)) > 0, out
    micro = [int(b.replace(".", "")) for b in balances]
    assert micro[0] + sum(micro[1:]) == 100_000_000, out  # renter + providers = what was minted
    assert re.search(r"^ledger sum .*: 0\.000000$", out, re.M), out

    # the renter's jobs and the job's loss curve
    assert re.search(rf"^1\s+done\s+{steps}\s+{re.escape(m.group(1))}\s", out, re.M), out
    assert re.search(r"curve:\s+[▁▂▃▄▅▆▇█]+$", out, re.M), out

    # everything it started is gone, and so is its temporary folder
    pids = [int(x) for x in re.findall(r"\(pid (\d+)", out)]
    assert len(pids) == 4, out  # the market and three providers
    assert not [x for x in pids if alive(x)], out
    market = re.search(r"market listening on (127\.0\.0\.1:\d+)", out).group(1)
    assert not processes_mentioning(market)
    assert not processes_mentioning(str(tmp_path))
    assert not list(tmp_path.glob("arceus-demo.*"))
    assert (tmp_path / "demo" / "model.safetensors").exists()
    assert took < 180, f"the demo took {took:.0f} s"
