"""scripts/bootstrap on a machine that lacks the system packages: it asks apt for exactly those and
leaves every process it did not start alive. Nothing in the project kills or stops by name.

The machine is made "fresh" by a PATH of links to every executable except the four tools, and apt-get
is a script that records its arguments and puts a stand-in for each tool of the packages it is asked
for on that PATH, as the real packages would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.stack import RedisServer

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "scripts" / "bootstrap"
PROVIDES = {
    "redis-server": ["redis-server"],
    "prometheus": ["prometheus", "promtool"],
    "docker-compose": ["docker-compose"],
}
HIDDEN = {tool for tools in PROVIDES.values() for tool in tools}
# Names a set-up that stops "its" services by name would hit (matching the process name or the
# command line; prometheus-node-exporter is what the old recipe's own shell was killed by).
DECOY_NAMES = ("prometheus", "redis-server", "prometheus-node-exporter")


def fresh_path(bin_dir: Path, hidden: set[str]) -> str:
    """A PATH of one directory: links to every executable on the current PATH but ``hidden``."""
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            name = entry.name
            if name in hidden or (bin_dir / name).exists() or not os.access(entry.path, os.X_OK):
                continue
            if entry.is_file():  # follows links: a dangling one is skipped
                (bin_dir / name).symlink_to(entry.path)
    if os.geteuid() != 0:  # the script runs apt-get under sudo; the fake needs no root and no password
        (bin_dir / "sudo").unlink(missing_ok=True)
        (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (bin_dir / "sudo").chmod(0o755)
    return str(bin_dir)


def fake_apt_get(path: Path, log: Path, bin_dir: Path, *, installs: bool = True) -> Path:
    """apt-get that appends its arguments (tab-separated) to ``log``; ``install`` puts a stand-in for each
    tool of the named packages into ``bin_dir`` unless ``installs`` is false (a package without the tool)."""
    cases = "".join(f"    {pkg}) {' '.join(f'stub {tool};' for tool in tools)} ;;\n" for pkg, tools in PROVIDES.items())
    path.write_text(
        "#!/bin/sh\n"
        f"for a in \"$@\"; do printf '%s\\t' \"$a\"; done >> '{log}'; echo >> '{log}'\n"
        f"stub() {{ printf '#!/bin/sh\\nexit 0\\n' > '{bin_dir}'/\"$1\"; chmod +x '{bin_dir}'/\"$1\"; }}\n"
        f'[ "$1" = install ] && [ {int(installs)} = 1 ] || exit 0\n'
        'for pkg in "$@"; do\n'
        '  case "$pkg" in\n'
        f"{cases}"
        "  esac\n"
        "done\n"
    )
    path.chmod(0o755)
    return path


def apt_calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split("\t")[:-1] for line in log.read_text().splitlines()]


def installed_venv(directory: Path) -> Path:
    """A virtualenv directory whose stamp is newer than pyproject.toml, so the pip step is skipped."""
    directory.mkdir()
    stamp = directory / ".installed"
    stamp.touch()
    later = max(time.time(), (ROOT / "pyproject.toml").stat().st_mtime) + 3600
    os.utime(stamp, (later, later))
    return directory


def lacks_venv(path: str) -> bool:
    """Whether python3 on ``path`` lacks venv/ensurepip (Debian's python3-venv)."""
    return subprocess.run(["python3", "-c", "import ensurepip, venv"], env={"PATH": path}).returncode != 0


def run_bootstrap(path: str, apt_get: Path, venv: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), "VENV": str(venv), "FLUXFLEET_APT_GET": str(apt_get)}
    return subprocess.run(["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def decoys(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``sleep`` processes named (process name and command line) like the services a careless set-up stops."""
    directory = tmp_path / "decoys"
    directory.mkdir()
    sleep = shutil.which("sleep")
    assert sleep
    processes = []
    for name in DECOY_NAMES:
        (directory / name).symlink_to(sleep)
        processes.append(subprocess.Popen([name, "600"], executable=directory / name))
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def test_installs_exactly_the_missing_packages_and_kills_nothing(
    tmp_path: Path, redis_server: RedisServer, decoys: list[subprocess.Popen[bytes]]
) -> None:
    # Given a machine without redis-server, prometheus, promtool and docker-compose, whose user runs
    # their own Redis and processes named like Prometheus's
    path = fresh_path(tmp_path / "bin", HIDDEN)
    for process, name in zip(decoys, DECOY_NAMES, strict=True):
        assert Path(f"/proc/{process.pid}/comm").read_text().strip() == name[:15]  # what a kill by exact name matches
    log = tmp_path / "apt.log"
    apt_get = fake_apt_get(tmp_path / "apt-get", log, tmp_path / "bin")
    venv = installed_venv(tmp_path / "venv")
    needs_venv = lacks_venv(path)

    # When the set-up runs
    result = run_bootstrap(path, apt_get, venv)

    # Then it finished, asked apt for exactly the missing packages once, and left everything running
    assert result.returncode == 0, result.stdout + result.stderr
    expected = ["redis-server", "prometheus", "docker-compose"] + (["python3-venv"] if needs_venv else [])
    assert apt_calls(log) == [
        ["update", "-qq"],
        ["install", "-y", "-qq", "--no-install-recommends", *expected],
    ]
    assert f"installing with {apt_get}: {' '.join(expected)}" in result.stdout
    assert not (venv / "bin").exists(), "the pip step ran although the stamp is newer than pyproject.toml"
    for process in decoys:
        assert process.poll() is None, f"{process.args} was stopped"
    assert redis_server.process is not None and redis_server.process.poll() is None
    assert redis.Redis(port=redis_server.port).ping()


def test_asks_apt_for_nothing_when_nothing_is_missing(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    path = fresh_path(bin_dir, HIDDEN)
    for tool in HIDDEN:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "apt.log"
    result = run_bootstrap(path, fake_apt_get(tmp_path / "apt-get", log, bin_dir), installed_venv(tmp_path / "venv"))
    assert result.returncode == 0, result.stderr
    if lacks_venv(path):
        assert apt_calls(log)[-1][-1:] == ["python3-venv"]
    else:
        assert apt_calls(log) == []


def test_a_package_that_does_not_bring_its_tool_fails_the_set_up(tmp_path: Path) -> None:
    # What lets CI catch a wrong package name: the tool is looked for again after apt-get.
    path = fresh_path(tmp_path / "bin", HIDDEN)
    log = tmp_path / "apt.log"
    apt_get = fake_apt_get(tmp_path / "apt-get", log, tmp_path / "bin", installs=False)
    result = run_bootstrap(path, apt_get, installed_venv(tmp_path / "venv"))
    assert result.returncode != 0
    assert "still missing after" in result.stderr and "redis-server" in result.stderr
    assert "Traceback" not in result.stderr


def test_nothing_in_the_project_stops_or_kills_by_name() -> None:
    # The pattern is split so this file does not match itself.
    pattern = r"\b(p" + r"kill|kill" + r"all)\b|systemctl +(--[a-z-]+ +)*(stop|disable)|\bservice +\S+ +stop\b"
    found = subprocess.run(
        ["git", "grep", "--untracked", "-n", "-E", pattern, "--", ".", ":!*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode in (0, 1), found.stderr
    assert found.stdout == "", f"stops or kills by name:\n{found.stdout}"
