"""The bulk job on a real two-node Ray cluster, submitted with ``ray job submit``, reading its
inputs and model from and writing its stems and manifest to an S3 API server (moto's server
mode, in its own process) on 127.0.0.1.

The cluster (``ray start --head`` + ``ray start --address``, 1 CPU each, own temp dirs, token
authentication off) and the S3 server are started by the module fixture and stopped by their own
PIDs: each ``ray start --block`` process shuts down the Ray processes it started when it gets
SIGTERM, so nothing else on the machine is touched (``ray stop`` would stop every Ray here).

- an uninterrupted run: every output is checked (stems decode to the input's length, one
  manifest row per input, completion markers, no temporary names left), and both nodes did work;
- a run killed part way (``ray job stop``) and rerun: nothing under a final name is partial, and
  the rerun finishes with byte-identical stems, the same manifest and no leftovers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile as sf

from tests.test_bulk_separation import (
    LABELS,
    RATE,
    flac_bytes,
    manifest_records,
    noise,
    result_view,
    stem_digests,
)
from tests.tiny_models import tiny_checkpoint

# Three to four minutes on 2 cores (cluster start, three jobs, shutdown): in the slow set.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: ray, moto_server, and the jobs' python
BUCKET = "uss-cluster"
NUM_GOOD = 24
SECONDS = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(check, timeout: float, what: str, interval: float = 0.5, what_now=None):
    """Poll ``check()`` until it returns something true (returned); ``what_now()`` describes
    the last state seen in the timeout error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    seen = f" (last seen: {what_now()})" if what_now is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen, timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT (job submission)
    env: dict  # environment for the ray CLI
    job_env: dict  # environment variables of the submitted jobs
    fs: object  # s3fs client of the S3 server
    workspace: Path

    def submit(self, submission_id: str, *job_args: str, wait: bool = True) -> subprocess.CompletedProcess:
        runtime_env = {"env_vars": self.job_env}
        command = [
            str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--submission-id", submission_id,
            *([] if wait else ["--no-wait"]), "--", "python", "-m", "jobs.separate", *job_args,
        ]  # fmt: skip
        return subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=240)

    def ray(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / "ray"), *args, "--address", self.dashboard], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    s3fs = pytest.importorskip("s3fs")
    logs = tmp_path_factory.mktemp("cluster-logs")
    # One temp dir per node (they would delete each other's unpacked working dirs), short: Ray's
    # socket paths have a length limit.
    temp_dirs = [tempfile.mkdtemp(prefix=f"ussc-{node}-", dir="/tmp") for node in ("head", "worker")]
    s3_port, gcs_port, dashboard_port = _free_port(), _free_port(), _free_port()
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env = {
        **os.environ,
        **credentials,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    endpoint = f"http://127.0.0.1:{s3_port}"
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        return process

    try:
        start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)])
        _wait_until(lambda: _http_ok(f"{endpoint}/moto-api/"), 60, "the S3 server")
        common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
        start("head", [
            str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dirs[0]}", *common,
        ])  # fmt: skip
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait_until(lambda: _http_ok(f"{dashboard}/api/version"), 120, "the Ray head's dashboard")
        start("worker", [
            str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs_port}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dirs[1]}", *common,
        ])  # fmt: skip
        from ray.util.state import list_nodes

        _wait_until(
            lambda: len([n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]) == 2, 120, "two alive nodes"
        )
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        workspace = tmp_path_factory.mktemp("workspace")
        job_env = {**credentials, "AWS_ENDPOINT_URL": endpoint, "USS_WORKSPACE": str(workspace)}
        yield Cluster(dashboard, env, job_env, fs, workspace)
    finally:
        for process in reversed(processes):  # worker, head, then the S3 server
            _stop(process)
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def archive(cluster, tmp_path_factory):
    """Inputs and the model in the bucket: NUM_GOOD recordings and one non-audio .wav."""
    fs = cluster.fs
    for i in range(NUM_GOOD):
        fs.pipe(f"{BUCKET}/archive/part{i % 3}/rec{i:02d}.flac", flac_bytes(noise(SECONDS - i / 10, seed=i)))
    fs.pipe(f"{BUCKET}/archive/part0/notes.wav", b"not audio at all")
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", LABELS)
    fs.put(str(checkpoint), f"{BUCKET}/models/tiny", recursive=True)
    return f"s3://{BUCKET}/archive"


def job_args(archive: str, output: str) -> list[str]:
    return [
        "--input", archive, "--output", output, "--checkpoint", f"s3://{BUCKET}/models/tiny",
        "--class", "Alpha", "--class", "Beta+Gamma", "--activity-threshold", "0",
        "--actors", "2", "--cpus-per-actor", "0.6",  # more than half a node: one actor per node
    ]  # fmt: skip


def _markers(fs, output_key: str) -> list[str]:
    return [p for p in fs.find(f"{output_key}/_uss_bulk") if p.endswith(".json")]


@pytest.fixture(scope="module")
def uninterrupted(cluster, archive):
    done = cluster.submit("bulk-uninterrupted", *job_args(archive, f"s3://{BUCKET}/out-a"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def test_cluster_job_writes_every_output(cluster, uninterrupted):
    fs = cluster.fs
    assert "throughput:" in uninterrupted and "audio-s per wall-s" in uninterrupted
    assert f"{NUM_GOOD + 1} inputs (1 invalid, {NUM_GOOD} ok" in uninterrupted
    rows = manifest_records(f"s3://{BUCKET}/out-a/manifest.parquet", fs)
    assert len(rows) == NUM_GOOD + 1 and len({r.relative_path for r in rows}) == NUM_GOOD + 1
    bad = [r for r in rows if r.status != "ok"]
    assert [(r.relative_path, r.status) for r in bad] == [("part0/notes.wav", "invalid")]
    good = [r for r in rows if r.status == "ok"]
    assert len({r.worker_node for r in good}) == 2  # both nodes separated
    expected = set()
    for r in good:
        assert r.stem_names == ("Alpha", "Beta + Gamma") and r.error == ""
        for uri in r.output_uris:
            audio, rate = sf.read(io.BytesIO(fs.cat_file(uri)))
            assert rate == RATE and len(audio) == round(r.duration_seconds * RATE)
            expected.add(uri.removeprefix(f"s3://{BUCKET}/out-a/"))
    assert set(stem_digests(fs, f"{BUCKET}/out-a")) == expected  # nothing else: no temporary names
    assert len(_markers(fs, f"{BUCKET}/out-a")) == NUM_GOOD

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cluster.workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (run,) = [r for r in runs if r.data.tags.get("uss.output") == f"s3://{BUCKET}/out-a"]
    assert run.data.metrics["status_ok"] == NUM_GOOD and run.data.metrics["audio_seconds_per_second"] > 0
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)] == ["manifest.parquet"]


def test_killed_job_reruns_to_identical_outputs(cluster, archive, uninterrupted):
    fs = cluster.fs
    output, key = f"s3://{BUCKET}/out-b", f"{BUCKET}/out-b"
    started = cluster.submit("bulk-killed", *job_args(archive, output), wait=False)
    assert started.returncode == 0, started.stdout + started.stderr
    finished_before_kill = _wait_until(lambda: len(_markers(fs, key)) >= 3 and len(_markers(fs, key)), 180, "3 inputs done", 0.2)
    cluster.ray("job", "stop", "bulk-killed")
    # The job server's own answer (the CLI's wording of a status varies between Ray versions).
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    _wait_until(
        lambda: client.get_job_status("bulk-killed") == JobStatus.STOPPED,
        60,
        "the job to stop",
        what_now=lambda: client.get_job_status("bulk-killed"),
    )
    time.sleep(2)  # the job's actors are killed with its driver
    complete = len(_markers(fs, key))
    assert finished_before_kill <= complete < NUM_GOOD, "the job was not stopped part way"

    reference = stem_digests(fs, f"{BUCKET}/out-a")
    partial = stem_digests(fs, key)
    final_names = {k: v for k, v in partial.items() if not k.rsplit("/", 1)[-1].startswith(".")}
    # Whatever is under a final name is complete: the same bytes as the uninterrupted run's.
    assert final_names and all(reference[k] == v for k, v in final_names.items())

    rerun = cluster.submit("bulk-rerun", *job_args(archive, output))
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert f"{complete} complete before" in rerun.stdout
    assert stem_digests(fs, key) == reference  # no duplicates, no leftovers, same bytes
    rows = manifest_records(f"{output}/manifest.parquet", fs)
    expected = manifest_records(f"s3://{BUCKET}/out-a/manifest.parquet", fs)
    strip = lambda view: [{k: v for k, v in r.items() if k != "output_uris"} for r in view]  # noqa: E731
    assert strip(result_view(rows)) == strip(result_view(expected))
    assert [tuple(u.replace("/out-b/", "/out-a/") for u in r.output_uris) for r in rows] == [r.output_uris for r in expected]
    assert len({r.job_id for r in rows}) == 2  # rows of the killed run (from its markers) and of the rerun
