"""finetune.report_to: the Trainer's trackers beside DVCLive, with local stores only.

TensorBoard writes event files; MLflow writes to a SQLite database (MLflow 3 refuses its old
./mlruns file store unless told to, so SQLite is the local store its documentation names).
"""

from __future__ import annotations

import pytest
import yaml

from qlora.core.io import StageError
from qlora.train import log_layout
from stages import finetune

SECRET = "hf_NotARealTokenButSecret0123456789"


def set_report_to(workspace, trackers: list[str]) -> None:
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["finetune"]["report_to"] = trackers
    path.write_text(yaml.safe_dump(params))


def test_tensorboard_and_mlflow_get_the_same_curves_as_dvclive_and_no_secret(
    workspace, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard", reason="tensorboard is a dev dependency ([trackers])")
    pytest.importorskip("mlflow", reason="mlflow-skinny is a dev dependency ([trackers])")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard_dir, database = tmp_path / "tb", tmp_path / "mlflow.db"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tensorboard_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "qlora-test")
    monkeypatch.setenv("HF_TOKEN", SECRET)  # what a user with a hub login has set
    set_report_to(workspace, ["tensorboard", "mlflow"])
    finetune.main()

    logged = log_layout.read_curve(workspace / "reports/train", log_layout.TRAIN_LOSS)
    dvclive = {r["step"]: r["loss"] for r in logged}
    assert sorted(dvclive) == [1, 2, 3]

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    assert {"train/loss", "train/tokens_per_s", "train/peak_memory_gb", "eval/loss"} <= set(
        events.Tags()["scalars"]
    )
    tensorboard = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tensorboard == pytest.approx(dvclive, rel=1e-6)  # float32 in event files

    client = MlflowClient(f"sqlite:///{database}")
    (run,) = client.search_runs([client.get_experiment_by_name("qlora-test").experiment_id])
    mlflow = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert mlflow == pytest.approx(dvclive, rel=1e-9)
    assert client.get_metric_history(run.info.run_id, "tokens_per_s")

    for store in (tensorboard_dir, database):
        files = [store] if store.is_file() else [f for f in store.rglob("*") if f.is_file()]
        assert files
        for f in files:
            assert SECRET.encode() not in f.read_bytes(), f


def test_a_tracker_that_is_not_installed_is_named_with_what_to_install(workspace, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    set_report_to(workspace, ["wandb"])
    with pytest.raises(StageError, match=r"finetune.report_to=\['wandb'\]: .*install"):
        finetune.main()
    assert not (workspace / "data/prepared/adapter").exists()
    assert not (workspace / "reports/train").exists()


def test_dvclive_is_not_a_report_to_choice_because_it_always_logs(workspace):
    from qlora.core.params import load_params

    set_report_to(workspace, ["dvclive"])
    with pytest.raises(StageError, match="report_to"):
        load_params()
