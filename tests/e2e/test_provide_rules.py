"""The owner's rules of `arceus provide` (--when, --idle-after, --busy-cpu,
--hours, --on-battery): a provider reads them from inputs the tests point at
files of their own (--clock-file, --power-supply-dir, --input-dir,
--interrupts, --proc-stat),
tells the market when it becomes unavailable and why, and again when it is
available; `arceus providers` (table and --json) shows it, and the market
leases an unavailable provider to no one."""

import json
import os
import re
import time
import urllib.request

import pytest

from conftest import Ticker, wait_for

CHECK = ("--check-every", "0.1")


def state(run_arceus, market, token):
    """provider id -> (available, why), as `arceus providers --json` says."""
    p = run_arceus("providers", "--market", market.addr, "--token", token, "--json", check=True)
    return {x["id"]: (x["available"], x["unavailable_why"]) for x in json.loads(p.stdout)["providers"]}


def wait_state(run_arceus, market, token, pid, available, why_part=""):
    def ok():
        s = state(run_arceus, market, token).get(pid)
        return s if s and s[0] == available and why_part in s[1] else None
    return wait_for(f"provider {pid} {'available' if available else 'unavailable: ' + why_part}", ok, timeout=30)


@pytest.fixture
def inputs(tmp_path):
    """Empty input devices, no interrupts, no power supply: a machine at rest."""
    d = tmp_path / "inputs"
    (d / "input").mkdir(parents=True)
    (d / "ps").mkdir()
    (d / "interrupts").write_text("           CPU0       CPU1\n  0:         40          0   IO-APIC    2-edge      timer\n")
    (d / "clock").write_text("12:00\n")
    return d


def input_args(d):
    return ("--input-dir", d / "input", "--power-supply-dir", d / "ps", "--interrupts", d / "interrupts",
            "--clock-file", d / "clock", *CHECK)


def supply(d, name, **attrs):
    s = d / "ps" / name
    s.mkdir(exist_ok=True)
    for k, v in attrs.items():
        (s / k).write_text(f"{v}\n")


def test_hours_rule_across_midnight_and_no_lease_outside_them(
        run_arceus, add_account, market, provider, tmp_path, inputs, small_fashion, small_mlp_spec):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "100")
    ada = add_account(db, "ada")
    m = market(db, "--http", "127.0.0.1:0")
    p = provider(m, ada, *input_args(inputs), "--hours", "22:00-07:00", "--when", "always")
    assert "computes always, 22:00-07:00, also on battery" in p.out()
    assert "unavailable now: outside hours 22:00-07:00" in p.out()
    wait_state(run_arceus, m, renter, p.id, False, "outside hours 22:00-07:00")
    table = run_arceus("providers", "--market", m.addr, "--token", renter, check=True).stdout
    assert "(unavailable: outside hours 22:00-07:00)" in table, table
    # and the dashboard's API, for its providers page
    req = urllib.request.Request(m.url + "api/providers")
    req.add_header("Authorization", f"Bearer {renter}")
    with urllib.request.urlopen(req, timeout=30) as r:
        api = json.loads(r.read())["providers"]
    assert [(x["id"], x["available"], x["unavailable_why"]) for x in api] == [
        (p.id, False, "outside hours 22:00-07:00")], api

    # not leased meanwhile: the renter is told no provider is free
    t = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", 1, "--batch", 32,
                   "--market", m.addr, "--token", renter, "--devices", 1)
    assert t.returncode != 0 and "1 providers asked for, 0 online" in t.stderr, t.stderr

    for clock, available in (("23:30", True), ("06:59", True), ("07:00", False), ("21:59", False),
                             ("22:00", True), ("00:00", True)):
        (inputs / "clock").write_text(clock + "\n")
        wait_state(run_arceus, m, renter, p.id, available, "" if available else "outside hours")
    assert "arceus provide: available again" in p.out()
    assert "arceus provide: unavailable: outside hours 22:00-07:00" in p.out()  # at 07:00

    # available: leased and trained on
    t = run_arceus("train", "--model", small_mlp_spec, "--data", small_fashion, "--steps", 1, "--batch", 32,
                   "--market", m.addr, "--token", renter, "--devices", 1)
    assert t.returncode == 0, t.stderr[-3000:]


def test_battery_rule(run_arceus, add_account, market, provider, tmp_path, inputs):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1")
    ada, bob = add_account(db, "ada"), add_account(db, "bob")
    m = market(db)
    supply(inputs, "AC", type="Mains", online=1)
    supply(inputs, "BAT0", type="Battery", status="Charging")
    strict = provider(m, ada, *input_args(inputs), "--when", "always", "--on-battery", "no")
    lenient = provider(m, bob, *input_args(inputs), "--when", "always", "--on-battery", "yes", name="lenient")
    wait_state(run_arceus, m, renter, strict.id, True)

    # unplugged: the strict one stops, the one allowed on battery goes on
    supply(inputs, "AC", online=0)
    supply(inputs, "BAT0", status="Discharging")
    wait_state(run_arceus, m, renter, strict.id, False, "on battery")
    assert state(run_arceus, m, renter)[lenient.id] == (True, "")
    assert "unavailable: on battery" in strict.out()

    # plugged in again
    supply(inputs, "AC", online=1)
    wait_state(run_arceus, m, renter, strict.id, True)

    # a laptop that lists only its battery: its status tells
    (inputs / "ps" / "AC" / "type").unlink()
    supply(inputs, "BAT0", status="Discharging")
    wait_state(run_arceus, m, renter, strict.id, False, "on battery")
    supply(inputs, "BAT0", status="Full")
    wait_state(run_arceus, m, renter, strict.id, True)


def test_idle_rule_keyboard_and_mouse(run_arceus, add_account, market, provider, tmp_path, inputs):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1")
    ada = add_account(db, "ada")
    m = market(db)
    event = inputs / "input" / "event0"
    event.write_text("")
    # 0.05 minutes: 3 s without input and the owner is away
    p = provider(m, ada, *input_args(inputs), "--when", "idle", "--idle-after", "0.05")
    wait_state(run_arceus, m, renter, p.id, True)  # the device was last touched before the wait

    os.utime(event)  # a key pressed
    wait_state(run_arceus, m, renter, p.id, False, "its owner is active")
    t0 = time.monotonic()
    wait_state(run_arceus, m, renter, p.id, True)
    assert time.monotonic() - t0 >= 1.5  # it waited for the idle time

    # the PS/2 keyboard's interrupts moving are activity too
    irq = inputs / "interrupts"
    irq.write_text(irq.read_text() + "  1:        100         20   IO-APIC    1-edge      i8042\n")
    time.sleep(0.5)  # the first count seen is no activity
    wait_state(run_arceus, m, renter, p.id, True)
    irq.write_text(irq.read_text().replace("100         20", "101         20"))
    wait_state(run_arceus, m, renter, p.id, False, "keyboard or mouse")
    wait_state(run_arceus, m, renter, p.id, True)


class FakeProcStat(Ticker):
    """A /proc/stat whose counters a thread moves on, as the kernel moves
    the real one's: STEP ticks every 0.05 s, `busy` percent of them user
    time and the rest idle. The steps are huge beside the provider's own
    real ticks (/proc/self/stat, which it subtracts), so the share it
    measures is the one set here. Each version is written whole and renamed
    into place: the provider never reads half a line."""

    STEP = 100000
    interval = 0.05

    def __init__(self, path, busy):
        self.path, self.busy = path, busy
        self.user = self.idle = 0
        self.write()

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"cpu  {self.user} 0 0 {self.idle} 0 0 0 0 0 0\n"
                       f"cpu0 {self.user} 0 0 {self.idle} 0 0 0 0 0 0\nintr 0\nctxt 0\n")
        os.replace(tmp, self.path)

    def tick(self):
        busy = self.STEP * self.busy // 100
        self.user += busy
        self.idle += self.STEP - busy
        self.write()


def test_busy_cpu_rule(run_arceus, add_account, market, provider, tmp_path, inputs):
    db = tmp_path / "market.db"
    renter = add_account(db, "renter", "1")
    ada = add_account(db, "ada")
    m = market(db)
    with FakeProcStat(inputs / "stat", busy=5) as stat:
        p = provider(m, ada, *input_args(inputs), "--when", "idle", "--idle-after", "0", "--busy-cpu", "50",
                     "--check-every", "0.2", "--proc-stat", inputs / "stat")
        assert "while other processes use little CPU" in p.out(), p.out()
        wait_state(run_arceus, m, renter, p.id, True)

        # the machine's other processes take 90% of it: not idle
        stat.busy = 90
        wait_state(run_arceus, m, renter, p.id, False, "busy: other processes use 90% of the CPU (more than 50%)")
        assert re.search(r"unavailable: busy: other processes use \d+% of the CPU \(more than 50%\)", p.out()), \
            p.out()
        table = run_arceus("providers", "--market", m.addr, "--token", renter, check=True).stdout
        assert "(unavailable: busy: other processes use 90% of the CPU (more than 50%))" in table, table

        # they calm down to 5%: back in the market
        stat.busy = 5
        wait_state(run_arceus, m, renter, p.id, True)
        assert "arceus provide: available again" in p.out()


def test_rules_are_checked_on_the_command_line(run_arceus):
    for args, why in ((("--hours", "22:00"), "--hours expects HH:MM-HH:MM"),
                      (("--hours", "07:00-07:00"), "two different times"),
                      (("--hours", "24:00-07:00"), "--hours expects"),
                      (("--when", "sometimes"), "--when must be idle or always"),
                      (("--on-battery", "maybe"), "--on-battery must be no or yes"),
                      (("--cpu-limit", "0"), "--cpu-limit 0 is out of range 1..100")):
        p = run_arceus("provide", "--market", "127.0.0.1:1", "--token", "x", *args)
        assert p.returncode == 2 and why in p.stderr, (args, p.stderr)


def test_cpu_limit_holds_the_provider_and_leaves_nothing_behind(run_arceus, add_account, market, provider,
                                                                 tmp_path):
    db = tmp_path / "market.db"
    ada = add_account(db, "ada")
    m = market(db)
    p = provider(m, ada, "--cpu-limit", "40")
    out = p.out()
    assert "at most 40% of the CPU" in out, out
    helper = None
    if "by duty-cycling" in out:
        helper = int(re.search(r"helper process (\d+)", out).group(1))
        assert os.path.exists(f"/proc/{helper}")
    else:
        assert "CPU held to 40% of the machine by its cgroup" in out, out
    assert p.stop() == 0  # SIGTERM: a clean exit, though the helper stops it now and then
    if helper is not None:
        wait_for("the duty-cycling helper to go", lambda: not os.path.exists(f"/proc/{helper}")
                 or open(f"/proc/{helper}/stat").read().split(")")[1].split()[0] == "Z", timeout=10)
