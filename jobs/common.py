"""What every job does the same way: the workspace, connecting to Ray, and the MLflow run.

Embedded defaults, so a first run needs no server:

- workspace: ``$USS_WORKSPACE``, else ``./workspace`` (datasets, checkpoints, the MLflow store);
- Ray: ``$RAY_ADDRESS`` if set (a cluster, or ``auto``), else a local Ray started here;
- MLflow: ``$MLFLOW_TRACKING_URI`` if set (a tracking server), else a SQLite store
  ``<workspace>/mlflow.db`` with artifacts under ``<workspace>/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from uss_core.config import to_dict

EXPERIMENT = "uss-at-scale"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def add_query_arguments(parser) -> None:
    """The query flags ``uss separate`` and ``uss bulk-separate`` share (one kind per run; none
    at all separates hierarchically)."""
    q = parser.add_argument_group("queries (choose one kind)")
    q.add_argument("--class", dest="classes", action="append", default=[], metavar="LABEL", help="class name or mid; 'A+B' for a union")
    q.add_argument("--class-id", dest="class_ids", action="append", default=[], metavar="N", help="class index; '0+1' for a union")
    q.add_argument("--levels", nargs="+", type=int, default=[], metavar="L", help="ontology levels to separate hierarchically")
    q.add_argument("--query-audio", action="append", default=[], metavar="URI", help="folder of example recordings")


def preset_path(name_or_path: str, family: str) -> Path:
    """A preset name (``jobs/presets/<name>.yaml``) or a YAML file path; ``family`` (e.g.
    ``"tagger"``) names the presets listed when the name is unknown."""
    from uss_core.errors import ConfigError

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file not found: {path}")
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob(f"{family}-*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(known)} (or a path to a YAML file)")
    return candidate


def workspace_dir() -> Path:
    """The workspace folder (created on first use)."""
    path = Path(os.environ.get("USS_WORKSPACE", "workspace")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def workspace_tracking_uri() -> str:
    """The embedded MLflow store: SQLite in the workspace."""
    return f"sqlite:///{workspace_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLflow tracking URI: ``$MLFLOW_TRACKING_URI`` or the workspace's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or workspace_tracking_uri()


def connect_ray(num_cpus: int | None = None) -> None:
    """Connect to ``$RAY_ADDRESS``, or start a local Ray (``num_cpus`` defaults to all cores).

    A no-op if this process is already connected (e.g. a job submitted with ``ray job submit``
    or a test fixture).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard also serves the state API, which Ray Train's placement-group cleaner polls
        # (without it every poll logs a warning); on loopback only.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def log_training_outcome(metrics: dict, params: dict, ray_checkpoint: Any, subfolder: str = "") -> None:
    """A training job's last MLflow records: its final ``metrics`` (NaN ones left out), ``params``,
    and the exported checkpoint (``subfolder`` of the final Ray Train checkpoint) as the
    ``checkpoint`` artifact, which the model registry and ``runs:/`` URIs point at."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
    mlflow.log_params(params)
    with ray_checkpoint.as_directory() as folder:
        mlflow.log_artifacts(str(Path(folder) / subfolder), artifact_path="checkpoint")


@contextlib.contextmanager
def mlflow_run(job: str, config: Any = None, run_name: str | None = None, tags: dict | None = None) -> Iterator[Any]:
    """An MLflow run for a job: config logged as flattened parameters, tagged ``uss.job``.

    Yields the active ``mlflow.ActiveRun``; the run ends FAILED if the body raises. The local
    default experiment keeps its artifacts in the workspace (not the current directory).
    """
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # the SQLite store logs every migration
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        # Compare URIs, not the environment: set_tracking_uri exports MLFLOW_TRACKING_URI itself.
        if uri == workspace_tracking_uri():
            location = (workspace_dir() / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.set_tags({"uss.job": job, **(tags or {})})
        if config is not None:
            params: dict[str, Any] = {}
            _flatten("", to_dict(config), params)
            # MLflow caps parameter values at 6000 characters; long lists are summarised.
            mlflow.log_params({k: (str(v) if len(str(v)) < 500 else str(v)[:497] + "...") for k, v in params.items()})
        yield run


class MlflowMetricLogger:
    """Logs the ``keys`` of a metrics dict to MLflow run ``run_id``, at step ``metrics[step_key]``.

    Picklable, for Ray Train report callbacks (they run in the Ray Train controller, another
    process): it carries the tracking URI and run id, not a client.
    """

    def __init__(self, tracking_uri: str, run_id: str, keys: tuple[str, ...], step_key: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.keys = keys
        self.step_key = step_key

    def __call__(self, metrics: dict) -> None:
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        step = int(metrics[self.step_key])
        for key in self.keys:
            if key in metrics:
                client.log_metric(self.run_id, key, float(metrics[key]), step=step)
