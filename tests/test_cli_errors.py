"""Commands fail with one sentence, never a traceback, and never corrupt a job: Redis down, a wrong
password, unknown or half-written jobs, finished jobs cancelled, states rich would read as markup, and
a Redis restart while ``submit --wait`` waits. Real redis-server processes and real ``fluxfleet`` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from fluxfleet.errors import FluxfleetError, UnknownJobError
from fluxfleet.jobs import JobStore
from fluxfleet.keys import JOB_ID_PATTERN, job_spec_key
from producer.cli import _plain
from producer.stack import RedisServer, free_port
from tests.conftest import base_env
from tests.faultkit import check_end_state, prompts, running_fleet, wait_for

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "canary-pass-7f3a9"
WAIT = ("--job-id", "restart", "--wait")


def fluxfleet(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``fluxfleet ARGS`` run with exactly ``env``, its output captured."""
    command = [sys.executable, "-m", "producer.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cli_env(tmp_path: Path, tiny_model_dir: Path, broker_url: str, **extra: str) -> dict[str, str]:
    (tmp_path / "store").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXFLEET_")}
    env |= base_env(tiny_model_dir, f"file://{tmp_path / 'store'}")
    return {**env, "FLUXFLEET_BROKER__URL": broker_url, **extra}


def one_sentence(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The single error line of a failed command (exit ``code``, no traceback)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def prompts_file(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox in snow\na lighthouse at dusk\n")
    return str(path)


def commands(tmp_path: Path) -> list[list[str]]:
    """Every command that talks to Redis, each on a job id."""
    return [
        ["status", "j1"],
        ["status", "j1", "--json"],
        ["cancel", "j1"],
        ["results", "j1"],
        ["wait", "j1"],
        ["submit", prompts_file(tmp_path), "--preset", "tiny"],
        ["submit", "--resume", "j1"],
    ]


def test_every_command_with_redis_down_says_which_broker_in_one_sentence(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Given a broker URL (with a password in it) where nothing listens,
    port = free_port()
    env = cli_env(tmp_path, tiny_model_dir, f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    for args in commands(tmp_path):
        # each command fails with one sentence naming the broker, password masked, and the setting to check.
        line = one_sentence(fluxfleet(env, *args))
        assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in line, (args, line)
        assert "FLUXFLEET_BROKER__URL" in line and PASSWORD not in line, (args, line)
    # `up` with that broker says so before it starts any worker (exit 2, like its other refusals).
    up = fluxfleet(env, "up", "--preset", "tiny", "--device", "cpu", "--state-dir", str(tmp_path / "up"))
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in one_sentence(up, code=2)
    assert not (tmp_path / "up").exists()


def test_every_command_with_a_wrong_or_missing_password_names_the_setting(tmp_path: Path, tiny_model_dir: Path) -> None:
    server = RedisServer(directory=tmp_path / "redis", password=PASSWORD).start()
    try:
        wrong = cli_env(tmp_path, tiny_model_dir, server.url, FLUXFLEET_BROKER__PASSWORD="wrong-pass-91c2")
        for args in commands(tmp_path):
            line = one_sentence(fluxfleet(wrong, *args))
            assert f"Redis at {server.url} refused the password" in line, (args, line)
            assert "FLUXFLEET_BROKER__PASSWORD" in line and "wrong-pass-91c2" not in line, (args, line)
        missing = cli_env(tmp_path, tiny_model_dir, server.url)
        line = one_sentence(fluxfleet(missing, "status", "j1"))
        assert "requires a password and none is set: set FLUXFLEET_BROKER__PASSWORD" in line
    finally:
        server.stop()


def test_cancel_of_an_unknown_job_writes_nothing_and_the_id_stays_usable(
    tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    env = cli_env(tmp_path, tiny_model_dir, redis_server.url)
    r = redis.Redis(port=redis_server.port)
    # Given no job 'typo-job', cancelling it is an error and leaves Redis empty;
    line = one_sentence(fluxfleet(env, "cancel", "typo-job"))
    assert "no job 'typo-job'" in line
    assert r.dbsize() == 0
    # status says the job is unknown (no KeyError), and the id can still be submitted and cancelled.
    assert "typo-job" in one_sentence(fluxfleet(env, "status", "typo-job"))
    submitted = fluxfleet(env, "submit", prompts_file(tmp_path), "--preset", "tiny", "--job-id", "typo-job", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout) == {"job_id": "typo-job", "total": 2, "already_submitted": False}
    cancelled = fluxfleet(env, "cancel", "typo-job")
    assert cancelled.returncode == 0 and "job typo-job cancelled (0/2 finished)" in cancelled.stdout
    assert "[cancelled]" in fluxfleet(env, "status", "typo-job").stdout


@pytest.mark.parametrize("state", ["done", "failed", "aborted", "cancelled"])
def test_cancel_leaves_a_finished_job_as_it_is(redis_server: RedisServer, state: str) -> None:
    store = JobStore(redis.Redis(port=redis_server.port, decode_responses=True))
    store.create(job_id="finished", preset="tiny", model="m", tasks=[])
    store.r.hset("fluxfleet:job:finished", mapping={"state": state, "finished_at": 1000.0})
    before = store.r.hgetall("fluxfleet:job:finished")
    assert store.cancel("finished") == state
    assert store.r.hgetall("fluxfleet:job:finished") == before


def test_cancel_of_a_done_job_says_so_from_the_command_line(
    tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    store = JobStore(redis.Redis(port=redis_server.port, decode_responses=True))
    store.create(job_id="finished", preset="tiny", model="m", tasks=[])
    store.set_state("finished", "done")
    proc = fluxfleet(cli_env(tmp_path, tiny_model_dir, redis_server.url), "cancel", "finished")
    assert proc.returncode == 0 and "job finished is already done (0/0 finished); nothing to cancel" in proc.stdout
    assert store.state("finished") == "done"


def test_a_half_written_job_record_is_a_clear_error(
    tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    # Given the record an earlier `cancel typo-job` wrote (a state and nothing else),
    redis.Redis(port=redis_server.port).hset("fluxfleet:job:typo-job", mapping={"state": "cancelled"})
    env = cli_env(tmp_path, tiny_model_dir, redis_server.url)
    # status, cancel and submit under that id say what is wrong and what to do, instead of KeyError: 'preset'.
    for args in (
        ["status", "typo-job"],
        ["cancel", "typo-job"],
        ["submit", prompts_file(tmp_path), "--preset", "tiny", "--job-id", "typo-job"],
    ):
        line = one_sentence(fluxfleet(env, *args))
        assert "job 'typo-job' has an incomplete record in Redis" in line and "--job-id" in line, (args, line)


def test_results_of_an_unknown_job_is_an_error(tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer) -> None:
    proc = fluxfleet(cli_env(tmp_path, tiny_model_dir, redis_server.url), "results", "nope")
    assert "no job 'nope'" in one_sentence(proc) and proc.stdout == ""


@pytest.mark.parametrize("state", ["done", "failed", "aborted", "cancelled", "lost"])
def test_status_shows_the_state_that_rich_would_read_as_markup(
    tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer, state: str
) -> None:
    if state == "lost":
        # A job Redis no longer knows, whose job.json storage still has.
        spec = tmp_path / "store" / job_spec_key("j")
        spec.parent.mkdir(parents=True)
        spec.write_text(json.dumps({"job_id": "j", "preset": "tiny", "model": "m", "items": [{"key": "k1"}]}))
    else:
        store = JobStore(redis.Redis(port=redis_server.port, decode_responses=True))
        store.create(job_id="j", preset="tiny", model="m", tasks=[])
        store.set_state("j", state)
    proc = fluxfleet(cli_env(tmp_path, tiny_model_dir, redis_server.url), "status", "j")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"job j [{state}]: "), proc.stdout


def test_cancel_of_a_job_redis_lost_creates_no_record(
    tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    # Given a job only storage knows (Redis lost it), cancel says it is lost and writes nothing to Redis.
    spec = tmp_path / "store" / job_spec_key("j")
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"job_id": "j", "preset": "tiny", "model": "m", "items": [{"key": "k1"}]}))
    proc = fluxfleet(cli_env(tmp_path, tiny_model_dir, redis_server.url), "cancel", "j")
    assert proc.returncode == 0 and "job j is already lost (0/1 finished); nothing to cancel" in proc.stdout
    assert redis.Redis(port=redis_server.port).dbsize() == 0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60))
def test_plain_text_prints_exactly_as_given(text: str) -> None:
    # Any text (a state, a path, a prompt, an error) comes out of rich as it went in: no markup read, no crash.
    console = Console(record=True, width=10_000, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(_plain(text), end="", soft_wrap=True)
    assert console.export_text() == text


@pytest.mark.faults
def test_submit_wait_rides_out_a_redis_restart_and_gives_up_on_a_lasting_outage(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with running_fleet(tmp_path, tiny_model_dir, FLUXFLEET_TEST_FAULTS="step_delay=0.3") as fleet:
        env = {**os.environ, **fleet.stack.env}
        (tmp_path / "p.txt").write_text("\n".join(prompts(8)) + "\n")
        # Given `submit --wait` waiting on an 8-image job,
        waiting = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "submit", str(tmp_path / "p.txt"), "--preset", "tiny", *WAIT],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = fleet.client
        wait_for(lambda: client.jobs.exists("restart") and client.jobs.item_starts("restart"), 60, "the job to start")
        # when Redis is killed and restarted from its AOF mid-job,
        time.sleep(1.2)  # appendfsync everysec
        fleet.redis.kill()
        time.sleep(2)
        fleet.redis.start()
        out, errors = waiting.communicate(timeout=150)
        # the command waits it out and reports the finished job, as the worker does.
        assert waiting.returncode == 0, errors
        assert "Traceback" not in errors and "job restart: done — 8 images" in out, (out, errors)
        check_end_state(client, "restart", done=8, started_once=False)

        # Given `wait` on another job, when Redis goes away for good, it gives up after its patience
        job = client.submit(prompts(8, "gone"), preset="tiny", job_id="gone")
        wait_for(lambda: client.jobs.item_starts(job.id), 60, "the second job to start")
        started = time.monotonic()
        waiting = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "wait", "gone", "--broker-patience", "3"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        fleet.redis.kill()
        out, errors = waiting.communicate(timeout=60)
        # with one sentence naming the broker and the setting.
        assert waiting.returncode == 1 and "Traceback" not in errors, errors
        last = errors.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot reach Redis at {fleet.redis.url}") and "FLUXFLEET_BROKER__URL" in last
        assert time.monotonic() - started < 40


STATES = ["submitting", "running", "done", "failed", "cancelled", "aborted"]
FIELD_VALUES = {
    "preset": st.just("tiny"),
    "state": st.sampled_from(STATES),
    "total": st.just("3"),
    "created_at": st.just("1.5"),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    job_id=st.from_regex(JOB_ID_PATTERN, fullmatch=True).filter(lambda j: ".." not in j),
    record=st.none() | st.fixed_dictionaries({}, optional=FIELD_VALUES),
)
def test_cancel_and_status_of_any_record_write_only_a_cancellation(
    redis_server: RedisServer, job_id: str, record: dict[str, str] | None
) -> None:
    # Given any job id, and no record under it or any part of a record (a half-written one included),
    store = JobStore(redis.Redis(port=redis_server.port, decode_responses=True))
    store.r.flushdb()
    key = f"fluxfleet:job:{job_id}"
    if record:
        store.r.hset(key, mapping=record)
    before = store.r.hgetall(key)
    # cancel either refuses (writing nothing) or cancels a running job; it never raises anything else,
    try:
        previous = store.cancel(job_id)
    except UnknownJobError:
        assert not record and store.r.dbsize() == 0
    except FluxfleetError as e:
        assert "state" not in before and "incomplete record" in str(e) and store.r.hgetall(key) == before
    else:
        after = store.r.hgetall(key)
        if previous in ("submitting", "running"):
            assert after["state"] == "cancelled" and "finished_at" in after
            assert {k: v for k, v in after.items() if k not in ("state", "finished_at")} == {
                k: v for k, v in before.items() if k not in ("state", "finished_at")
            }
        else:
            assert after == before
    # and status reads it, or says the record is incomplete: never a KeyError.
    try:
        status = store.status(job_id)
    except FluxfleetError as e:
        assert "incomplete record" in str(e) and not set(FIELD_VALUES) <= set(before)
    else:
        assert (status is None) == (not record)
