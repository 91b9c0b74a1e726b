"""Local runs as Ray jobs (TUNEBOT_LOCAL_RUNNER=ray), driven through signed Slack requests.

The bot is the real Bolt app over HTTP against the Slack fake; the cluster is
a real one-node Ray cluster (`tests/ray_cluster` starts one for the suite;
these tests skip, saying how, when none answers at ``TUNEBOT_RAY_ADDRESS``).
The worker really trains the tiny Llama of tests/trainers/test_lora.py as a
Ray job, its files under the test's artifacts folder, or with an ``s3://`` root on
moto's S3 server on 127.0.0.1 (tests/fakes/s3_store.py), which the job reaches too.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="local training needs the [local] extra")
pytest.importorskip("trl", reason="local training needs the [local] extra")

from bot import ray_runs
from bot.plans import TrainingPlan
from bot.results import RunResult
from tests.bot.test_runs import request, texts, upload
from tests.conftest import training_file
from tests.trainers.test_lora import tiny  # noqa: F401 (the session fixture)
from tests.trainers.test_ray_runner import ADDRESS, needs_cluster
from trainers.ray_runner import submission_id

FAST = {"lr": 1e-2, "grad_accum": 1, "max_length": 128, "num_cpus": 1}
DONE = ("succeeded", "failed", "cancelled")


def ray_jobs(prefix: str) -> list:
    """The cluster's jobs whose submission id starts with `prefix`."""
    from ray.job_submission import JobSubmissionClient

    return [
        j for j in JobSubmissionClient(ADDRESS).list_jobs() if j.submission_id.startswith(prefix)
    ]


@pytest.fixture
def ray_bot(paid_bot, tiny, tmp_path):  # noqa: F811 (tiny)
    """A bot whose local runs go to the cluster; every job it left running is stopped."""
    bots = []

    def start(make=paid_bot, **overrides):
        bot = make(
            local_base_model=str(tiny.model),
            model_dirs=(str(tiny.root),),
            default_provider="local",
            local_runner="ray",
            ray_address=ADDRESS,
            artifacts=overrides.pop("artifacts", (tmp_path / "artifacts").as_uri()),
            progress_seconds=0.0,
            **overrides,
        )
        bot.workflow.runs.local_overrides.update(FAST)
        bots.append(bot)
        return bot

    yield start
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ADDRESS)
    for bot in bots[:1]:
        for job in ray_jobs(prefix(bot)):
            if not job.status.is_terminal():
                with contextlib.suppress(Exception):
                    client.stop_job(job.submission_id)


def prefix(bot) -> str:
    """What every Ray job id of this bot's installation starts with."""
    return submission_id(bot.workflow.runs.key("r")).rsplit("-r-", 1)[0]


def tick_until(bot, run_id: str, statuses, timeout: float = 420.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        run = bot.store.get_run(run_id)
        if run.status in statuses:
            return run
        time.sleep(0.5)
    raise AssertionError(f"{run_id} stayed {bot.store.get_run(run_id).status}")


def progress_edits(bot, run) -> list[str]:
    return [
        c.params.get("text", "")
        for c in bot.slack.calls_to("chat.update")
        if c.params.get("ts") == run.progress_ts
    ]


def finals(bot, run_id: str, word: str) -> list[str]:
    return [t for t in texts(bot) if t.startswith(f"<@UR> {run_id} {word}")]


@needs_cluster
def test_a_run_trains_as_a_ray_job_reports_once_and_is_evaluated(ray_bot):
    bot = ray_bot()
    runs = bot.workflow.runs
    upload(bot, training_file(40))
    body = request(bot, "train provider=local epochs=2")
    assert "r1 accepted: it goes to the local GPU queue" in body["text"]
    run = tick_until(bot, "r1", ("running",), timeout=60)
    sid = submission_id(runs.key("r1"))
    deadline = time.monotonic() + 60
    while run.external_id is None:  # the launch (a job thread) records the Ray job
        assert time.monotonic() < deadline, "r1 was never submitted"
        time.sleep(0.2)
        run = bot.store.get_run("r1")
    assert run.external_id == sid
    run = tick_until(bot, "r1", DONE)
    assert run.status == "succeeded", run.error

    # The adapter came home: the evaluation and chat load it from TUNEBOT_HOME.
    home = runs.run_dir("r1") / "adapter"
    assert (home / "adapter_config.json").is_file()
    assert run.result_json["adapter_dir"] == str(home)
    (done,) = finals(bot, "r1", "🎉 succeeded")
    assert "Adapter:" in done and "Final train loss" in done
    edits = progress_edits(bot, run)
    assert any("step" in e for e in edits[:-1]), edits  # edited while it trained
    assert edits[-1].startswith("r1 succeeded")
    assert any(u.filename == "loss-r1.png" for u in bot.slack.uploads)
    bot.wait_idle()  # the evaluation: base vs tuned through the adapter copied home
    summary = [t for t in texts(bot) if t.startswith("r1 evaluation:")]
    assert len(summary) == 1 and "5 held-out examples" in summary[0]

    jobs = ray_jobs(prefix(bot))
    assert [(j.submission_id, str(j.status)) for j in jobs] == [(sid, "SUCCEEDED")]
    assert jobs[0].metadata["tunebot_run"] == "r1"
    tick_until(bot, "r1", ("succeeded",))  # more ticks: no second message
    assert len(finals(bot, "r1", "🎉 succeeded")) == 1
    audit = {e.action: e.detail_json for e in bot.store.audit_log(run_id="r1")}
    assert audit["started"]["ray_job"] == sid


@needs_cluster
def test_a_run_with_its_artifacts_on_s3_trains_reports_and_comes_home(ray_bot, s3):
    # TUNEBOT_ARTIFACTS=s3://…: the job's node trains in a scratch folder and syncs it with
    # the store (moto's S3 server on 127.0.0.1); the bot reads progress and result there.
    bot = ray_bot(artifacts=f"s3://{s3.bucket_name}/tunebot/runs")
    runs = bot.workflow.runs
    upload(bot, training_file(40))
    body = request(bot, "train provider=local epochs=2")
    assert "r1 accepted: it goes to the local GPU queue" in body["text"]
    run = tick_until(bot, "r1", DONE)
    assert run.status == "succeeded", run.error
    sid = submission_id(runs.key("r1"))
    assert run.external_id == sid

    (job,) = ray_jobs(prefix(bot))
    assert (job.submission_id, str(job.status)) == (sid, "SUCCEEDED")
    assert "-m trainers.artifact_sync" in job.entrypoint
    assert job.metadata["tunebot_run_dir"] == f"s3://{s3.bucket_name}/tunebot/runs/{sid}"
    keys = s3.keys(s3.bucket_name, f"tunebot/runs/{sid}/")
    for name in ("spec.json", "data/train.jsonl", "progress.jsonl", "result.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):  # fmt: skip
        assert f"tunebot/runs/{sid}/{name}" in keys, keys

    # The adapter came home from the store: the evaluation and chat load it from here.
    home = runs.run_dir("r1") / "adapter"
    assert (home / "adapter_config.json").is_file()
    assert run.result_json["adapter_dir"] == str(home)
    edits = progress_edits(bot, run)
    assert any("step" in e for e in edits[:-1]), edits  # edited while it trained
    assert edits[-1].startswith("r1 succeeded")
    (done,) = finals(bot, "r1", "🎉 succeeded")
    assert "Adapter:" in done and "Final train loss" in done
    bot.wait_idle()
    summary = [t for t in texts(bot) if t.startswith("r1 evaluation:")]
    assert len(summary) == 1 and "5 held-out examples" in summary[0]
    assert not [t for t in texts(bot) if "AKIA" in t or "tunebot-run-" in t]


@pytest.fixture(params=["folder", "s3"])
def artifacts_root(request, tmp_path) -> str:
    """TUNEBOT_ARTIFACTS: a folder, or a prefix on the S3 server of the `s3` fixture (the
    worker then syncs its scratch folder with the store: checkpoints up, a resume's down)."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3').bucket_name}/runs"
    return (tmp_path / "artifacts").as_uri()


@needs_cluster
def test_cancel_stops_the_job_keeps_its_checkpoint_and_resume_finishes(ray_bot, artifacts_root):
    bot = ray_bot(artifacts=artifacts_root)
    runs = bot.workflow.runs
    runs.local_overrides.update(save_steps=2)
    # On S3 a checkpoint shows once uploaded: upload often, and train longer, so the
    # cancel still comes mid-way on a quiet machine.
    runs.backends.runner("local").sync_seconds = 0.5
    epochs = 20 if artifacts_root.startswith("s3://") else 8
    upload(bot, training_file(40))
    request(bot, f"train provider=local epochs={epochs}")  # long enough to cancel mid-way
    tick_until(bot, "r1", ("running",), timeout=60)
    key = runs.key("r1")
    deadline = time.monotonic() + 240
    while not ray_runs.checkpoints(runs.backends.runner("local"), key):
        assert time.monotonic() < deadline, "r1 saved no checkpoint"
        runs.poll_all()
        assert bot.store.get_run("r1").status == "running", bot.store.get_run("r1").error
        time.sleep(0.5)
    _, body = bot.command("cancel r1", user_id="UR")
    assert "Stopping r1: it saves a checkpoint first" in body["text"]
    run = tick_until(bot, "r1", DONE, timeout=120)
    assert run.status == "cancelled", run.error
    (first,) = ray_jobs(submission_id(key))
    assert str(first.status) == "STOPPED"
    kept = ray_runs.checkpoints(runs.backends.runner("local"), key)
    assert kept, "the cancelled run kept no checkpoint"
    assert len(finals(bot, "r1", "✋ cancelled")) == 1
    assert any("A checkpoint was saved: `/finetune resume r1`" in t for t in texts(bot))

    # Twenty resumes at once (a double click, a retried request): one wins, one new job.
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: bot.command("resume r1", user_id="UR")[1], range(20)))
    won = [a["text"] for a in answers if f"r1 resumes from {kept[-1]}" in a["text"]]
    assert len(won) == 1, [a["text"] for a in answers]
    asked = [e for e in bot.store.audit_log(run_id="r1") if e.action == "resume_requested"]
    assert len(asked) == 1
    run = tick_until(bot, "r1", DONE)
    assert run.status == "succeeded", run.error
    # A second Ray job (the first id is Ray's for good) in the same run folder.
    jobs = {j.submission_id: str(j.status) for j in ray_jobs(prefix(bot))}
    second = submission_id(ray_runs.attempt_key(key, 2))
    assert jobs == {first.submission_id: "STOPPED", second: "SUCCEEDED"}
    assert run.external_id == second
    assert (runs.run_dir("r1") / "adapter" / "adapter_config.json").is_file()
    resumed = [e for e in bot.store.audit_log(run_id="r1") if e.action == "resumed"]
    assert len(resumed) == 1 and resumed[0].detail_json["ray_job"] == second
    assert len(finals(bot, "r1", "🎉 succeeded")) == 1


@needs_cluster
def test_a_restarted_bot_reattaches_to_its_ray_job(ray_bot, make_bot):
    bot = ray_bot()
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=3")
    tick_until(bot, "r1", ("running",), timeout=60)
    deadline = time.monotonic() + 60
    while bot.store.get_run("r1").external_id is None:
        assert time.monotonic() < deadline, "r1 was never submitted"
        time.sleep(0.2)
    # The first bot stops ticking (as if killed); a second one on the same home takes over.
    again = ray_bot(make=make_bot)
    run = tick_until(again, "r1", DONE)
    assert run.status == "succeeded", run.error
    assert len(ray_jobs(prefix(bot))) == 1
    assert len(finals(again, "r1", "🎉 succeeded")) == 1


@needs_cluster
def test_a_submission_lost_before_it_was_recorded_is_adopted_not_repeated(ray_bot):
    # The bot dies after Ray took the job but before it recorded the job's id: the
    # next bot's retry submits with the same id and adopts the job, whatever its state.
    bot = ray_bot(claim_lease_seconds=1.0)
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1")
    tick_until(bot, "r1", ("running",), timeout=60)
    deadline = time.monotonic() + 60
    while bot.store.get_run("r1").external_id is None:
        assert time.monotonic() < deadline, "r1 was never submitted"
        time.sleep(0.2)
    sid = bot.store.get_run("r1").external_id
    bot.store.update_run("r1", external_id=None)  # the record the dying bot never wrote
    time.sleep(1.5)  # its lease on the launch lapses
    run = tick_until(bot, "r1", DONE)
    assert run.status == "succeeded", run.error
    assert run.external_id == sid
    assert [j.submission_id for j in ray_jobs(prefix(bot))] == [sid]
    starts = sorted((e for e in bot.store.audit_log(run_id="r1") if e.action == "started"),
                    key=lambda e: e.id)  # fmt: skip
    assert [e.detail_json["adopted"] for e in starts] == [False, True]
    assert len(finals(bot, "r1", "🎉 succeeded")) == 1


@needs_cluster
def test_a_run_that_needs_gpus_says_how_many_the_cluster_lacks(ray_bot):
    bot = ray_bot(local_slots=1)  # the CI cluster has no GPU
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1 gpus=1")
    request(bot, "train provider=local epochs=1 gpus=2 nodes=2")
    two = TrainingPlan.from_json(bot.store.get_run("r2").plan_json).hyperparameters()
    assert (two["num_workers"], two["num_gpus"], two["spread"]) == (2, 1, True)
    lacks = "waiting for 2 GPUs (the Ray cluster has 0 of 0 free)"
    assert any(f"r2 queued for the local GPU: position 1 of 1, {lacks}." in t for t in texts(bot))
    waiting = "waiting for 1 GPU (the Ray cluster has 0 of 0 free)"
    run = tick_until(bot, "r1", ("running",), timeout=60)
    deadline = time.monotonic() + 60
    while not any(waiting in e for e in progress_edits(bot, bot.store.get_run("r1"))):
        assert time.monotonic() < deadline, progress_edits(bot, bot.store.get_run("r1"))
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        time.sleep(0.5)
    assert str(ray_jobs(submission_id(bot.workflow.runs.key("r1")))[0].status) == "PENDING"
    # Ray would stop a job it never started only once it could start it: the run ends now.
    _, body = bot.command("cancel r1", user_id="UR")
    assert "r1 left the Ray cluster's queue and is cancelled." in body["text"]
    run = bot.store.get_run("r1")
    assert run.status == "cancelled"
    bot.wait_idle()
    assert progress_edits(bot, run)[-1] == "r1 cancelled before the Ray cluster started it."
    # Its slot went to r2: two Ray Train workers, one GPU each, spread over the nodes.
    tick_until(bot, "r2", ("running",), timeout=60)
    deadline = time.monotonic() + 60
    while not bot.store.get_run("r2").external_id:
        assert time.monotonic() < deadline, "r2 was never submitted"
        time.sleep(0.2)
    (job,) = ray_jobs(bot.store.get_run("r2").external_id)
    assert "trainers.ray_train --workers 2 --gpus-per-worker 1 --spread " in job.entrypoint


@needs_cluster
def test_a_resume_waits_for_the_cancelled_job_ray_still_holds(ray_bot):
    """A job cancelled while Ray held it back stays PENDING at the cluster (its stop waits
    until Ray can start it): a resume now would start a second job in the same folder."""
    bot = ray_bot()
    runs = bot.workflow.runs
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1 gpus=1")  # the CI cluster has no GPU
    tick_until(bot, "r1", ("running",), timeout=60)
    deadline = time.monotonic() + 60
    while not bot.store.get_run("r1").external_id:
        assert time.monotonic() < deadline, "r1 was never submitted"
        time.sleep(0.2)
    _, body = bot.command("cancel r1", user_id="UR")
    assert "r1 left the Ray cluster's queue and is cancelled." in body["text"]
    # A checkpoint in the run's folder (as an earlier attempt would have left).
    folder = Path(runs.backends.runner("local").run_dir(submission_id(runs.key("r1"))))
    checkpoint = folder / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    assert ray_runs.checkpoints(runs.backends.runner("local"), runs.key("r1")) == ["checkpoint-2"]

    _, body = bot.command("resume r1", user_id="UR")
    assert "r1's last Ray job is still waiting or stopping on the cluster" in body["text"]
    run = bot.store.get_run("r1")
    assert run.status == "cancelled"
    for _ in range(3):  # the scheduler's ticks start nothing either
        runs.poll_all()
        bot.wait_idle()
    jobs = ray_jobs(prefix(bot))
    assert [j.submission_id for j in jobs] == [run.external_id]
    assert str(jobs[0].status) == "PENDING"
    assert [e for e in bot.store.audit_log(run_id="r1") if e.action == "resume_requested"] == []


def test_gpus_and_nodes_are_refused_without_a_ray_cluster(paid_bot, tiny):  # noqa: F811
    bot = paid_bot(local_base_model=str(tiny.model), model_dirs=(str(tiny.root),))
    upload(bot, training_file(40))
    body = request(bot, "train provider=local gpus=2")
    assert "`gpus=` and `nodes=` are for a Ray cluster (TUNEBOT_LOCAL_RUNNER=ray)" in body["text"]
    assert bot.store.runs(limit=None) == []


def test_a_run_keeps_its_place_while_no_ray_cluster_answers(paid_bot, tiny, tmp_path):  # noqa: F811
    pytest.importorskip("ray", reason="the Ray runner needs the [ray] extra")
    bot = paid_bot(
        local_base_model=str(tiny.model), model_dirs=(str(tiny.root),), default_provider="local",
        local_runner="ray", ray_address="http://127.0.0.1:9",  # nothing listens there
        artifacts=(tmp_path / "artifacts").as_uri(),
    )  # fmt: skip
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1")
    for _ in range(3):  # polls within the back-off do not try again
        bot.workflow.runs.poll_all()
        bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "queued" and run.error is None and run.external_id is None
    waits = [t for t in texts(bot) if t.startswith("r1 is waiting for the Ray cluster")]
    assert len(waits) == 1 and "no Ray cluster answers at http://127.0.0.1:9" in waits[0]
    assert "tried again in 30 s" in waits[0]
    actions = [e.action for e in bot.store.audit_log(run_id="r1")]
    assert "started" not in actions and "failed" not in actions


def test_a_running_job_that_stops_answering_is_said_once_in_its_thread(paid_bot, tiny, tmp_path):  # noqa: F811
    """A job submitted to a cluster that has since gone: the run stays running (the job
    may still train) and its thread is told once, after ten minutes, never again."""
    pytest.importorskip("ray", reason="the Ray runner needs the [ray] extra")
    settings = dict(
        local_base_model=str(tiny.model), model_dirs=(str(tiny.root),), default_provider="local",
        local_runner="ray", ray_address="http://127.0.0.1:9",  # nothing listens there
        artifacts=(tmp_path / "artifacts").as_uri(),
    )  # fmt: skip
    bot = paid_bot(**settings)
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1")
    key = bot.workflow.runs.key("r1")
    # As the bot records a job it submitted, before the cluster went away.
    assert bot.store.transition_run("r1", ["queued"], "running", external_id=submission_id(key))
    notice = "r1: no answer about its job for"

    def poll(times: int = 3) -> None:
        for _ in range(times):
            bot.workflow.runs.poll_all()
            bot.wait_idle()

    poll()
    data = RunResult.of(bot.store.get_run("r1"))
    assert data.unreachable_since is not None and not data.unreachable_said
    assert not [t for t in texts(bot) if notice in t]  # a short silence is not news
    eleven_minutes_ago = data.with_(unreachable_since=time.time() - 660)
    bot.store.update_run("r1", result_json=eleven_minutes_ago.to_json())
    poll()
    said = [t for t in texts(bot) if notice in t]
    assert len(said) == 1 and said[0].startswith("⚠️ r1: no answer about its job for 11 minutes")
    assert "no Ray cluster answers at http://127.0.0.1:9" in said[0]
    assert "`/finetune cancel r1` gives up" in said[0] and str(tmp_path) not in said[0]
    run = bot.store.get_run("r1")
    assert run.status == "running" and RunResult.of(run).unreachable_said
    poll()
    assert len([t for t in texts(bot) if notice in t]) == 1


def test_a_resume_while_the_s3_store_does_not_answer_says_so_in_one_sentence(
    paid_bot, tiny, monkeypatch,  # noqa: F811
):  # fmt: skip
    pytest.importorskip("ray", reason="the Ray runner needs the [ray] extra")
    pytest.importorskip("s3fs", reason="s3:// artifacts need the [s3] extra")
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "s",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
                        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)  # a store where nothing listens
    bot = paid_bot(
        local_base_model=str(tiny.model), model_dirs=(str(tiny.root),), default_provider="local",
        local_runner="ray", ray_address="http://127.0.0.1:9", artifacts="s3://team/runs",
    )  # fmt: skip
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1")
    bot.workflow.runs.poll_all()
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "queued"  # no cluster: it waits
    bot.command("cancel r1", user_id="UR")
    assert bot.store.get_run("r1").status == "cancelled"
    _, body = bot.command("resume r1", user_id="UR")
    assert body["text"] == (
        "⚠️ The artifacts store did not answer, so r1's checkpoints cannot be listed. "
        "Try again in a minute."
    )
    assert bot.store.get_run("r1").status == "cancelled"


def test_a_ray_runs_card_says_its_gpus_and_nodes_and_no_server_path(paid_bot, tiny, tmp_path):  # noqa: F811
    bot = paid_bot(
        local_base_model=str(tiny.model), model_dirs=(str(tiny.root),), default_provider="local",
        local_runner="ray", ray_address="http://127.0.0.1:9",  # nothing listens there
        artifacts=(tmp_path / "artifacts").as_uri(),
    )  # fmt: skip
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1 gpus=4 nodes=2")
    bot.wait_idle()
    cards = [t for t in texts(bot) if "Plan " in t and "r1" in t]
    assert cards and all("epochs 1, " in c and ", gpus 4, nodes 2;" in c for c in cards), cards
    # A folder model is named by its folder, never by its server path.
    assert all(f"local {tiny.model.name} on d1" in c for c in cards), cards
    assert not [t for t in texts(bot) if str(tiny.root) in t]


def test_a_ray_runs_folder_uri_in_an_error_shows_no_server_path(tmp_path):
    from bot import render
    from trainers.ray_runner import RayRunner

    runner = RayRunner("http://127.0.0.1:9", tmp_path / "artifacts")  # no call is made
    where = runner.where("installation:r1")
    assert where.startswith("file:///")
    # What RayRunner.poll says when Ray's job ended without the worker's result.json.
    shown = render.failure_line(f"the worker exited without a result in {where}")
    assert shown == f"the worker exited without a result in {submission_id('installation:r1')}"
    assert str(tmp_path) not in shown


@needs_cluster
def test_a_run_whose_artifacts_this_machine_cannot_read_is_followed_in_the_jobs_log(
    ray_bot, tmp_path
):
    """The bot's view of TUNEBOT_ARTIFACTS lacks the run folder (not mounted here): the
    progress edits and the finish come from the worker's progress lines in the job's log."""
    bot = ray_bot()
    runs = bot.workflow.runs
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=2")
    tick_until(bot, "r1", ("running",), timeout=60)
    deadline = time.monotonic() + 60
    while bot.store.get_run("r1").external_id is None:
        assert time.monotonic() < deadline, "r1 was never submitted"
        time.sleep(0.2)
    runner = runs.backends.runner("local")
    folder = Path(runner.run_dir(submission_id(runs.key("r1"))))
    assert (folder / "spec.json").is_file()  # the job trains there
    runner.root = str(tmp_path / "not-mounted")  # … and from now on the bot looks here
    assert not Path(runner.run_dir(submission_id(runs.key("r1")))).exists()
    run = tick_until(bot, "r1", DONE)
    assert run.status == "succeeded", run.error
    assert (folder / "result.json").is_file() and not (tmp_path / "not-mounted").exists()
    edits = progress_edits(bot, run)
    assert any("step" in e for e in edits[:-1]), edits  # edited while it trained, from the log
    assert edits[-1].startswith("r1 succeeded")
    (done,) = finals(bot, "r1", "🎉 succeeded")
    sid = submission_id(runs.key("r1"))
    assert f"Adapter: in `{sid}/adapter` under the Ray cluster's TUNEBOT_ARTIFACTS" in done
    assert "Final train loss" in done and str(tmp_path) not in done
    assert run.result_json.get("adapter_dir") is None
    assert not (runs.run_dir("r1") / "adapter").exists()  # nothing copied from out of reach
    assert any(u.filename == "loss-r1.png" for u in bot.slack.uploads)
    tick_until(bot, "r1", ("succeeded",))  # more ticks: no second message
    assert len(finals(bot, "r1", "🎉 succeeded")) == 1
    bot.wait_idle()
    assert not [t for t in texts(bot) if str(tmp_path) in t or "Traceback" in t]
    assert [t for t in texts(bot) if "evaluat" in t and t.startswith("⚠️ r1")] == [
        "⚠️ r1 has no adapter to evaluate."
    ]


@needs_cluster
def test_a_store_that_does_not_answer_at_launch_names_no_bucket_endpoint_or_key(
    ray_bot, monkeypatch
):
    """TUNEBOT_ARTIFACTS=s3://… on a store that does not answer when the run starts: the
    run keeps its place and says so, without the bucket, the prefix, the store's
    endpoint URL or the access key in Slack."""
    pytest.importorskip("s3fs", reason="s3:// artifacts need the [s3] extra")
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAQUIETKEY", "AWS_SECRET_ACCESS_KEY": "sekret",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
                        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)  # a store where nothing listens
    bot = ray_bot(artifacts="s3://team-bucket/private-prefix")
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1")
    tick_until(bot, "r1", ("queued",))
    deadline = time.monotonic() + 60
    while not [t for t in texts(bot) if t.startswith("r1 is waiting")]:
        assert time.monotonic() < deadline, texts(bot)
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        time.sleep(0.2)
    run = bot.store.get_run("r1")
    assert run.status == "queued" and run.external_id is None
    (wait,) = [t for t in texts(bot) if t.startswith("r1 is waiting")]
    assert "(the artifacts store did not answer: EndpointConnectionError)" in wait, wait
    for secret in ("team-bucket", "private-prefix", "127.0.0.1:9", "AKIAQUIETKEY", "sekret"):
        assert not [t for t in texts(bot) if secret in t], secret
    assert not ray_jobs(prefix(bot))


def test_an_s3_run_folder_in_an_error_or_the_result_shows_no_bucket():
    """What RayRunner.poll says when the job ended without a result, and the finish of a run
    followed from its job's log, name an s3 run folder by its last part alone."""
    from bot import render

    where = "s3://team-bucket/private-prefix/tunebot-installation-r1-0123456789ab"
    shown = render.failure_line(f"the worker exited without a result in {where}")
    assert shown == "the worker exited without a result in tunebot-installation-r1-0123456789ab"
    assert render.short_paths(f"in `{where}/adapter` under") == "in `adapter` under"
