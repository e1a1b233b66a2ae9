"""Training over slow links (docs/DESIGN.md, "Slow links"): three workers,
each behind an emulated home link (bench/wan_relay: 20 Mbit/s each way, 10
ms one way), so every frame into a stage, the driver's included, crosses one.
With --compress auto the driver measures every link at setup and prints
them, compresses what crosses them, and the MLP reaches the accuracy of the
same pipeline unshaped."""

import re

from conftest import CONFIGS, read_log

RATE_MBIT, DELAY_MS = 20, 10
ARGS = ("--model", CONFIGS / "mlp-fashion.json", "--steps", "80", "--batch", "128", "--micro-batches", "4",
        "--eval-every", "0", "--threads", "1", "--plan", "0-0,1-1,2-2")


def accuracy(log):
    return [r["accuracy"] for r in read_log(log) if "accuracy" in r][-1]


def test_three_workers_over_emulated_links_train_to_the_unshaped_accuracy(run_arceus, workers, relay, tmp_path,
                                                                            fashion_dir):
    ws = workers(3)
    plain = ",".join(w.addr for w in ws)
    run_arceus("train", *ARGS, "--data", fashion_dir, "--workers", plain, "--compress", "none",
               "--log", tmp_path / "unshaped.jsonl", check=True)

    relays = [relay(w.addr, DELAY_MS, RATE_MBIT, name=f"relay-{i}") for i, w in enumerate(ws)]
    shaped = ",".join(r.addr for r in relays)
    p = run_arceus("train", *ARGS, "--data", fashion_dir, "--workers", shaped, "--log", tmp_path / "wan.jsonl",
                   check=True, timeout=900)

    # the plan shows every link as measured: its bandwidth, its round trip, and
    # the compression auto chose for it
    rows = {}
    for line in p.stdout.splitlines():
        m = re.match(r"^(driver|\S+) -> (\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(none|bf16|int8)\s", line)
        if m:
            rows[(m.group(1), m.group(2))] = tuple(float(m.group(k)) for k in (3, 4, 5)) + (m.group(6),)
    want = [("driver", relays[0].addr), (relays[0].addr, relays[1].addr), (relays[1].addr, relays[2].addr)]
    assert sorted(rows) == sorted(want), p.stdout
    cap = RATE_MBIT / 8  # MB/s
    for link, (down, up, rtt, codec) in rows.items():
        assert 0.8 * cap <= down <= 1.1 * cap and 0.8 * cap <= up <= 1.1 * cap, (link, rows[link], p.stdout)
        assert 2 * DELAY_MS - 1 <= rtt <= 2 * DELAY_MS + 15, (link, rtt)
        # a micro-batch's activations (32 x 512 floats, 64 KiB) take 26 ms at
        # the cap, far more than a stage computes: auto compresses the most;
        # the driver's link carries the images themselves: left as they are
        assert codec == ("none" if link[0] == "driver" else "int8"), (link, codec, p.stdout)

    # the run summary: bytes per link and step, compressed against float32,
    # next to the plan's prediction
    moved = re.findall(r"link (\S+ -> \S+) \((\w+)\): ([\d.]+) MB down, ([\d.]+) MB up per step; "
                       r"as float32 ([\d.]+) MB, ([\d.]+) MB \(([\d.]+)x\); predicted ([\d.]+) MB, ([\d.]+) MB",
                       p.stdout)
    assert len(moved) == 3, p.stdout
    for name, codec, down, up, down_raw, up_raw, ratio, pdown, pup in moved[1:]:
        assert float(ratio) > 3.5, (name, ratio)
        assert abs(float(down) - float(pdown)) <= 0.05 * float(pdown) + 0.002, (name, down, pdown)
    # the log carries each step's bytes per link: [down, down as float32, up, up as float32]
    steps = [r for r in read_log(tmp_path / "wan.jsonl") if "links" in r]
    assert len(steps) == 80 and len(steps[-1]["links"]) == 3
    last = steps[-1]["links"][1]
    assert last[1] > 3.5 * last[0] and last[3] > 3.5 * last[2], last

    unshaped, wan = accuracy(tmp_path / "unshaped.jsonl"), accuracy(tmp_path / "wan.jsonl")
    assert unshaped > 0.75, unshaped
    assert abs(wan - unshaped) <= 0.02, (wan, unshaped)
