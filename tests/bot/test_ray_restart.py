"""The real bot process SIGKILLed while its Ray job trains, then started again.

`tunebot serve --http` runs as a subprocess against the Slack fake, with
``TUNEBOT_LOCAL_RUNNER=ray`` and a real one-node Ray cluster (`tests/ray_cluster`;
skipped, saying how, when none answers). It is killed with SIGKILL (no clean-up,
no last words) once the job has trained a step; a new process on the same home
must re-attach to that job by its submission id: exactly one Ray job for the run,
one completion message, the adapter copied home, and the evaluation posted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest

pytest.importorskip("torch", reason="local training needs the [local] extra")
pytest.importorskip("trl", reason="local training needs the [local] extra")

from storage import Store
from tests.bot.test_restart import TUNEBOT, Bot, _env, _posted, _wait, drop_training_file
from tests.fakes.openai_api import FakeOpenAI
from tests.fakes.signing import slash_command_body
from tests.fakes.slack_api import FakeSlack
from tests.trainers.test_lora import tiny  # noqa: F401 (the session fixture)
from tests.trainers.test_ray_runner import ADDRESS, needs_cluster
from trainers.ray_runner import submission_id

SUCCEEDED = "r1 🎉 succeeded"


def _jobs(prefix: str) -> list:
    """The cluster's jobs whose submission id starts with `prefix`."""
    from ray.job_submission import JobSubmissionClient

    return [
        j for j in JobSubmissionClient(ADDRESS).list_jobs() if j.submission_id.startswith(prefix)
    ]


def _trained_a_step(folder) -> bool:
    try:
        lines = (folder / "progress.jsonl").read_text().splitlines()
    except OSError:
        return False
    return any('"event": "step"' in line for line in lines)


@needs_cluster
@pytest.mark.skipif(not TUNEBOT.exists(), reason="needs .venv/bin/tunebot (pip install -e .)")
def test_sigkill_of_the_bot_while_its_ray_job_trains_then_restart(tiny, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    artifacts = tmp_path / "artifacts"
    bots: list[Bot] = []
    prefix = None
    finished = False
    with FakeSlack() as slack, FakeOpenAI(api_key="sk-test") as openai:
        env = _env(slack, openai, home)
        env.update(
            TUNEBOT_DEFAULT_PROVIDER="local",
            TUNEBOT_LOCAL_RUNNER="ray",
            TUNEBOT_RAY_ADDRESS=ADDRESS,
            TUNEBOT_ARTIFACTS=artifacts.as_uri(),
            TUNEBOT_LOCAL_BASE_MODEL=str(tiny.model),
            TUNEBOT_MODEL_DIRS=str(tiny.root),
            TUNEBOT_POLL_SECONDS="0.5",
        )
        try:
            first = Bot(env, tmp_path / "bot-1.log")
            bots.append(first)
            first.wait_healthy()
            drop_training_file(first, slack)
            status, ack = first.post(
                slash_command_body("train provider=local epochs=4", user_id="UR")
            )
            assert status == 200 and "r1 accepted" in json.loads(ack)["text"], ack

            with Store.in_home(home) as store:
                key = f"{store.installation_id}:r1"
            sid = submission_id(key)
            prefix = sid.rsplit("-", 1)[0] + "-"  # this run's jobs, attempts included
            folder = artifacts / sid

            def recorded() -> bool:
                with Store.in_home(home) as store:  # the run is written after the ack
                    run = store.find_run("r1")
                    return run is not None and run.external_id == sid

            _wait("r1's Ray job to be recorded", recorded, timeout=120, interval=0.2)
            _wait("r1's job to train a step", lambda: _trained_a_step(folder), timeout=300)
            (job,) = _jobs(prefix)
            assert str(job.status) == "RUNNING" and not (folder / "result.json").exists()
            os.kill(first.pid, signal.SIGKILL)
            assert first.proc.wait(timeout=30) == -signal.SIGKILL
            assert not _posted(slack, SUCCEEDED)

            second = Bot(env, tmp_path / "bot-2.log")
            bots.append(second)
            second.wait_healthy()
            _wait("the success message of r1", lambda: _posted(slack, SUCCEEDED), timeout=420)
            _wait(
                "the evaluation summary of r1",
                lambda: _posted(slack, "r1 evaluation:"),
                timeout=300,
            )
            time.sleep(2.0)  # a few more polls: nothing may be submitted or posted twice
            assert second.stop() in (0, -signal.SIGTERM)

            jobs = _jobs(prefix)
            assert [(j.submission_id, str(j.status)) for j in jobs] == [(sid, "SUCCEEDED")]
            assert len(_posted(slack, SUCCEEDED)) == 1
            assert len(_posted(slack, "r1 evaluation:")) == 1
            with Store.in_home(home) as store:
                run = store.get_run("r1")
                assert run.status == "succeeded", (run.status, run.error)
                assert run.external_id == sid
                started = [e for e in store.audit_log(run_id="r1") if e.action == "started"]
            assert len(started) == 1  # submitted once, by the first bot
            adapter = home / "runs" / "r1" / "adapter"
            assert (adapter / "adapter_config.json").is_file()
            assert run.result_json["adapter_dir"] == str(adapter)
            for bot in bots:
                assert "Traceback" not in bot.log(), f"{bot.log_path.name}:\n{bot.log()[-4000:]}"
            finished = True
        finally:
            for bot in bots:
                bot.kill_group()
            if prefix is not None:
                from ray.job_submission import JobSubmissionClient

                client = JobSubmissionClient(ADDRESS)
                for job in _jobs(prefix):
                    if not job.status.is_terminal():
                        with contextlib.suppress(Exception):
                            client.stop_job(job.submission_id)
            if not finished:
                for bot in bots:
                    print(f"--- {bot.log_path.name} (tail) ---\n{bot.log()[-6000:]}")
