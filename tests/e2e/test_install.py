"""Installing Arceus like a real tool.

- `make install DESTDIR=... PREFIX=/usr/local` puts a working binary in
  bin/ and a manual page per command (generated from the option tables) in
  share/man/man1/; `man -l` renders them, and a page lists exactly the
  options `--help` lists.
- `arceus provide --install-service` writes a systemd user unit under
  $XDG_CONFIG_HOME, the token in a 0600 file beside it, and runs `systemctl
  --user`; without systemctl it says so clearly, and how to undo. A
  --cpu-limit becomes the unit's CPUQuota=, not an option of ExecStart.
- `scripts/install-deps.sh --runtime --print` lists only what building and
  running need (no PyTorch, no Chromium); the Makefile runs no pkg-config
  while it is read, so `make demo` prints no pkg-config errors before its
  install step.

The install uses the build under test (BUILD taken from $ARCEUS_BIN's
folder), so it builds nothing new."""

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, _env, assert_no_crash

TOKEN = "0123456789abcdef" * 4


def build_name(arceus_bin):
    """BUILD=X for the binary under test when it is build/X/arceus."""
    try:
        rel = Path(arceus_bin).resolve().relative_to(REPO / "build")
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) == 2 and rel.parts[1] == "arceus" else None


def help_options(text):
    return sorted(set(re.findall(r"^  --([a-z0-9-]+)", text, re.M)))


def test_make_install_puts_a_working_binary_and_man_pages(arceus_bin, tmp_path):
    build = build_name(arceus_bin)
    if build is None:
        pytest.skip(f"{arceus_bin} is not a build/X/arceus of this repository")
    dest = tmp_path / "root"
    p = subprocess.run(["make", f"BUILD={build}", "install", f"DESTDIR={dest}", "PREFIX=/usr/local"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Package" not in p.stderr and "pkg-config" not in p.stderr, p.stderr

    binary = dest / "usr/local/bin/arceus"
    assert binary.is_file() and os.access(binary, os.X_OK)
    h = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, env=_env())
    assert_no_crash(h)
    assert h.returncode == 0 and "usage: arceus COMMAND" in h.stdout, h.stdout + h.stderr

    man1 = dest / "usr/local/share/man/man1"
    commands = subprocess.run([str(binary), "--commands"], capture_output=True, text=True,
                              env=_env()).stdout.split()
    assert {"train", "provide", "market", "ledger"} <= set(commands), commands
    pages = sorted(f.name for f in man1.iterdir())
    assert pages == sorted(["arceus.1"] + [f"arceus-{c}.1" for c in commands]), pages

    if not shutil.which("man"):
        pytest.fail("man is not installed (scripts/install-deps.sh installs man-db for this test)")
    env = dict(_env(), MANWIDTH="100", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    for cmd in ("provide", "train"):
        r = subprocess.run(["man", "-l", str(man1 / f"arceus-{cmd}.1")], capture_output=True, text=True,
                           timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr.lower(), r.stderr
        page = r.stdout
        assert re.search(rf"^NAME\n\s+arceus-{cmd} - ", page, re.M), page[:2000]
        assert "SYNOPSIS" in page and "OPTIONS" in page
        # the page and --help come from one table: the same options
        h = subprocess.run([str(binary), cmd, "--help"], capture_output=True, text=True, env=_env())
        in_help = help_options(h.stdout)
        in_page = sorted(set(re.findall(r"^\s{7}--([a-z0-9-]+)", page, re.M)))
        assert in_help and in_page == in_help, (in_page, in_help)
    r = subprocess.run(["man", "-l", str(man1 / "arceus-provide.1")], capture_output=True, text=True,
                       env=env)
    assert "--install-service" in r.stdout and "ARCEUS_TOKEN" in r.stdout
    index = subprocess.run(["man", "-l", str(man1 / "arceus.1")], capture_output=True, text=True, env=env)
    assert index.returncode == 0 and "arceus-provide(1)" in index.stdout, index.stdout


def install_service(run_arceus, tmp_path, path, *extra):
    env = dict(_env(), XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path / "home"), PATH=path)
    env.pop("ARCEUS_TOKEN", None)
    args = [str(run_arceus.binary), "provide", "--market", "127.0.0.1:7000", "--token", TOKEN,
            "--price", "2.5", "--max-mem", "64M", *extra, "--install-service"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert_no_crash(p)
    unit = tmp_path / "config/systemd/user/arceus-provide.service"
    envfile = tmp_path / "config/arceus/provide.env"
    return p, unit, envfile


def check_written(unit, envfile, arceus_bin, tmp_path):
    text = unit.read_text()
    assert TOKEN not in text  # the token is in the 0600 file only
    execs = re.findall(r"^ExecStart=(.*)$", text, re.M)
    assert len(execs) == 1
    assert execs[0].startswith(f'"{Path(arceus_bin).resolve()}" "provide" "--market" "127.0.0.1:7000"'), execs
    assert '"--price" "2.5" "--max-mem" "64M"' in execs[0]
    assert "--install-service" not in execs[0] and "--token" not in execs[0]
    assert f"EnvironmentFile={envfile}" in text
    assert f"WorkingDirectory={tmp_path}" in text
    assert "WantedBy=default.target" in text
    assert "TimeoutStopSec=60\n" in text  # stopping waits out the graceful leave (--grace 30)
    assert stat.S_IMODE(envfile.stat().st_mode) == 0o600
    assert f"ARCEUS_TOKEN={TOKEN}\n" in envfile.read_text()


def test_install_service_without_systemctl_says_so(run_arceus, tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    p, unit, envfile = install_service(run_arceus, tmp_path, str(empty))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "systemctl is not on PATH" in p.stderr and "not enabled" in p.stderr, p.stderr
    assert "systemctl --user enable --now arceus-provide.service" in p.stderr
    check_written(unit, envfile, run_arceus.binary, tmp_path)
    assert "CPUQuota=" not in unit.read_text()  # no --cpu-limit: no quota
    assert f"wrote {unit}" in p.stdout and f"wrote {envfile}" in p.stdout
    assert re.search(rf"to undo:\n  rm {re.escape(str(unit))} {re.escape(str(envfile))}\n", p.stdout), p.stdout


def test_install_service_enables_the_unit_with_systemctl(run_arceus, tmp_path):
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "systemctl.log"
    fake = bindir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    p, unit, envfile = install_service(run_arceus, tmp_path, f"{bindir}:/usr/bin:/bin",
                                       "--tls-ca", "ca%1$.pem")
    # --tls-ca names a file that does not exist: refused before anything is written
    assert p.returncode == 2 and "ca%1$.pem" in p.stderr, p.stderr
    assert not unit.exists() and not log.exists()

    (tmp_path / "ca%1$.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    # --cpu-limit given twice, both spellings: the last one counts
    p, unit, envfile = install_service(run_arceus, tmp_path, f"{bindir}:/usr/bin:/bin",
                                       "--cpu-limit", "70", "--tls-ca", "ca%1$.pem", "--cpu-limit=40")
    assert p.returncode == 0, p.stdout + p.stderr
    check_written(unit, envfile, run_arceus.binary, tmp_path)
    text = unit.read_text()
    # systemd's specifiers and variables are escaped in ExecStart
    assert '"--tls-ca" "ca%%1$$.pem"' in text
    # the CPU limit is systemd's: a quota in percent of one CPU, 40% of each
    # of the machine's CPUs; the provider is not told to limit itself again
    quota = f"CPUQuota={40 * os.cpu_count()}%"
    assert re.findall(r"^CPUQuota=.*$", text, re.M) == [quota], text
    assert "--cpu-limit" not in re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    assert re.search(rf"^arceus provide:   {quota} \(--cpu-limit 40", p.stdout, re.M), p.stdout
    assert log.read_text().splitlines() == ["--user daemon-reload",
                                            "--user enable --now arceus-provide.service"]
    assert "ran systemctl --user enable --now arceus-provide.service" in p.stdout
    assert "systemctl --user disable --now arceus-provide.service" in p.stdout  # how to undo

    # systemctl failing: said, with the undo
    fake.write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
    p, _, _ = install_service(run_arceus, tmp_path, f"{bindir}:/usr/bin:/bin")
    assert p.returncode == 1 and "systemctl --user daemon-reload failed (exit status 1)" in p.stderr, p.stderr
    assert "to undo:" in p.stdout


def test_install_deps_runtime_print_lists_no_test_packages():
    script = REPO / "scripts" / "install-deps.sh"
    rt = subprocess.run([str(script), "--runtime", "--print"], capture_output=True, text=True, timeout=60)
    full = subprocess.run([str(script), "--print"], capture_output=True, text=True, timeout=60)
    assert rt.returncode == 0 and full.returncode == 0, rt.stderr + full.stderr
    runtime, everything = rt.stdout.split(), full.stdout.split()
    for needed in ("build-essential", "pkg-config", "libgrpc-dev", "libsqlite3-dev", "dataset-fashion-mnist"):
        assert needed in runtime, runtime
    for test_only in ("python3-torch", "chromium", "clang", "libcriterion-dev", "python3-pytest", "man-db"):
        assert test_only not in runtime and test_only in everything, (runtime, everything)
    assert set(runtime) < set(everything)
    bad = subprocess.run([str(script), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_the_makefile_runs_no_pkg_config_while_it_is_read(tmp_path):
    """A fresh machine has no pkg-config, nor the .pc files: reading the
    Makefile for `make demo` or `make deps` must not ask it anything."""
    marker = tmp_path / "asked"
    fake = tmp_path / "pkg-config"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {marker}\necho "Package $1 was not found" >&2\nexit 1\n')
    fake.chmod(0o755)
    for goal in ("demo", "demo-lm", "deps", "deps-runtime", "clean"):
        # (without the jobserver of a make this test may run under, which would warn on stderr)
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        p = subprocess.run(["make", "-n", goal, f"PKG_CONFIG={fake}"], cwd=REPO, capture_output=True,
                           text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stderr == "", p.stderr
        assert not marker.exists(), marker.read_text()
    # the demo itself installs only the runtime set
    assert re.search(r"^\s*scripts/install-deps\.sh --runtime", (REPO / "scripts/demo.sh").read_text(), re.M)
