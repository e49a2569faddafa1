"""Where checkpoints live: local paths, object storage (``s3://``) and the MLflow model registry.

Every job that takes a checkpoint (``--checkpoint``, ``--sed-tagger``, ...) accepts:

- a local folder or file (``runs/separator``, ``file:///abs/path``);
- an object-storage URI (``s3://bucket/prefix/separator``), read through pyarrow/fsspec with the
  standard AWS environment (``AWS_ENDPOINT_URL`` for a non-AWS endpoint);
- an MLflow URI (``models:/NAME/VERSION``, ``models:/NAME@alias``, ``runs:/RUN_ID/path``),
  downloaded from the tracking server / registry of ``MLFLOW_TRACKING_URI`` (or the workspace's
  embedded store).

:func:`local_checkpoint` turns any of them into a local path (copying remote ones into a
temporary folder the caller deletes). A registered model holds the checkpoint folder somewhere
inside its artifacts; the folder with the project's ``config.json`` is found by
:func:`find_checkpoint_folder`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.schemas import resolve_filesystem
from uss_core.errors import CheckpointError

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def has_scheme(uri: str) -> bool:
    """Whether ``uri`` names remote storage (``s3://``, ``models:/`` ...), not a local path."""
    text = str(uri)
    return ("://" in text or text.startswith(MLFLOW_SCHEMES)) and not text.startswith("file://")


def find_checkpoint_folder(root: Path) -> Path:
    """The folder under ``root`` (``root`` itself first) that holds a project checkpoint
    (``config.json`` beside ``model.safetensors``); ``root`` if none does (a single file)."""
    from uss_core.checkpoints import CONFIG_FILE

    if root.is_file() or (root / CONFIG_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(CONFIG_FILE) if (p.parent / "model.safetensors").is_file())
    if not found:
        raise CheckpointError(f"{root}: no checkpoint (config.json + model.safetensors) in the downloaded artifacts")
    return min(found, key=lambda p: len(p.parts))


def _download_mlflow(uri: str, target: str) -> Path:
    import mlflow

    from jobs.common import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=target)
    except Exception as exc:  # MlflowException and storage errors alike: say which URI and why
        raise CheckpointError(
            f"{uri}: could not download from MLflow ({exc}); check the model name/version "
            "(`mlflow models` / the MLflow UI) and MLFLOW_TRACKING_URI"
        ) from exc
    return find_checkpoint_folder(Path(local))


def register_checkpoint(run_id: str, artifact_path: str, name: str) -> Any:
    """Register the checkpoint folder logged as ``artifact_path`` of MLflow run ``run_id`` as a
    new version of the registered model ``name`` (created if new); returns the ModelVersion, whose
    ``models:/NAME/VERSION`` URI :func:`local_checkpoint` resolves.

    A version made straight from the artifact location: ``mlflow.register_model("runs:/...")``
    in MLflow 3 accepts only MLflow-format logged models, and the checkpoint folder is the
    project's own format (config.json + safetensors, nothing pickled).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    source = mlflow.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    return client.create_model_version(name, source=source, run_id=run_id)


def local_checkpoint(uri: str, filesystem: Any = None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """A local path for the checkpoint at ``uri`` (a folder or a file), and the temporary folder
    that holds it if it was copied from remote storage (clean it up when done)."""
    text = str(uri)
    if not has_scheme(text):
        path = Path(text.removeprefix("file://"))
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {uri}")
        return path, None
    tmp = tempfile.TemporaryDirectory(prefix="uss-ckpt-")
    try:
        if text.startswith(MLFLOW_SCHEMES):
            return _download_mlflow(text, tmp.name), tmp
        fs, path = resolve_filesystem(text, filesystem)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CheckpointError(f"{uri}: no such checkpoint")
        target = os.path.join(tmp.name, info.base_name)
        if info.type == pafs.FileType.Directory:
            os.makedirs(target)
            pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            with fs.open_input_stream(path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return Path(target), tmp
    except BaseException:
        tmp.cleanup()
        raise
