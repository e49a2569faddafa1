"""Shared fixtures."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def audioset_dir() -> Path:
    """Folder with the real AudioSet ontology.json and class_labels_indices.csv (never copied into
    the repo): $USS_METADATA_DIR, else ``shared/audioset`` beside the repository."""
    folder = Path(os.environ.get("USS_METADATA_DIR") or REPO_ROOT.parent / "shared" / "audioset")
    missing = [name for name in ("ontology.json", "class_labels_indices.csv") if not (folder / name).is_file()]
    if missing:
        pytest.skip(
            f"AudioSet metadata not found in {folder} (missing {', '.join(missing)}); "
            "set USS_METADATA_DIR to a folder holding them, or run `uss metadata fetch`"
        )
    return folder


# ---------------------------------------------------------------------------------------------
# A real S3 API server (moto) and a local Ray, for the pipeline tests


@dataclass(frozen=True)
class S3Server:
    """A running S3 API server: its endpoint, an s3fs client for it, and a test bucket."""

    endpoint_url: str
    fs: object  # s3fs.S3FileSystem
    bucket: str

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on loopback (moto, in a thread) with the bucket ``uss-test``.

    AWS_* test credentials are set only while the fixture is active. ``s3_server.fs`` is an
    ``s3fs.S3FileSystem`` with the endpoint and credentials built in (so it also works when
    pickled into Ray workers); ``s3_server.uri(key)`` names an object; ``endpoint_url`` is for
    other clients.
    """
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else one log line per request
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
            fs.mkdir("uss-test")
            yield S3Server(endpoint, fs, "uss-test")
        finally:
            server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the session (2 CPUs, no dashboard), shut down at the end.

    ``address="local"`` always starts a fresh instance, never joining another process's cluster
    on this machine. If Ray is already up in this process it is reused and left up.
    """
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
        )
        started = True
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
