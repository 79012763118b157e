"""The README's two set-up commands: `make demo` and `make test` install the Debian packages
they need, or, without root, say the exact command and stop with exit 2."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"


def _make_system_packages(packages: str) -> subprocess.CompletedProcess:
    """`make system-packages` as a user who is not root (nobody, when the tests run as root)."""
    command = ["make", "-s", "-f", str(MAKEFILE), "system-packages", f"DEBIAN_PACKAGES={packages}"]
    if os.geteuid() == 0:
        command = ["su", "nobody", "-s", "/bin/sh", "-c", shlex.join(command)]
    return subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=60)


def test_a_missing_package_names_the_install_command_and_exits_2():
    done = _make_system_packages("prometheus no-such-package-ddm")
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.endswith("run: sudo apt-get install -y no-such-package-ddm")


def test_installed_packages_need_nothing():
    done = _make_system_packages("prometheus dataset-fashion-mnist")
    assert done.returncode == 0 and done.stdout == done.stderr == "", done.stderr
