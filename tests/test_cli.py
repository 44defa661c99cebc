"""The lightning-vdm command line: a user's own module with the mixin, saved configs, the quickstart."""

from __future__ import annotations

import csv
from pathlib import Path

import jsonargparse
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from packaging.version import Version

from lightning_vdm import LogExp, parse_deformation
from lightning_vdm.cli import VDMLightningCLI, main
from lightning_vdm.models import CifarResNet, ImageClassifier

REPOSITORY = Path(__file__).resolve().parents[1]

_QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
]


def _user_model_args(tmp_path, *extra: str) -> list[str]:
    return [
        "--model=tests.tiny.DeformedRegression",
        "--data=tests.tiny.RegressionData",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.log_every_n_steps=1",
        *_QUIET,
        *extra,
    ]


def test_print_config_shows_both_classes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_user_model_args(tmp_path, "--model.deformation=LE(1, 0.99)", "--model.lr=0.3"), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    init_args = config["model"]["init_args"]
    assert init_args["deformation"] == "LE(1, 0.99)"  # the mixin's argument
    assert init_args["lr"] == 0.3  # the user's module's arguments
    assert init_args["offset"] == 1.0
    assert init_args["nonfinite_loss"] == "error"


def test_help_shows_both_classes(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "tests.tiny.DeformedRegression"])
    # jsonargparse 4.27.7 prints subclass options with `.init_args`; both forms parse.
    help_text = capsys.readouterr().out.replace("--model.init_args.", "--model.")
    for option in ("--model.deformation", "--model.derivative_at", "--model.nonfinite_loss", "--model.lr", "--model.offset"):
        assert option in help_text
    if Version(jsonargparse.__version__) >= Version("4.53"):
        assert "paper's notation" in help_text  # the mixin's docstring reaches --help (not with jsonargparse 4.27.7)


@pytest.mark.parametrize(
    "deformation_args",
    [
        ["--model.deformation=LE(1, 0.99)"],
        [
            "--model.deformation=lightning_vdm.LogExp",
            "--model.deformation.e1=1",
            "--model.deformation.e2=0.99",
        ],
    ],
    ids=["notation", "class-path"],
)
def test_deformation_from_command_line(tmp_path, deformation_args):
    cli = VDMLightningCLI(args=["fit", *_user_model_args(tmp_path, *deformation_args)])
    assert cli.model.deformation == LogExp(1, 0.99)
    assert cli.trainer.global_step == 8


def test_saved_config_reruns_same_experiment(tmp_path):
    first = VDMLightningCLI(args=["fit", *_user_model_args(tmp_path / "first", "--model.deformation=AP(18/pi, 1, 2, 1)"), "--seed_everything=3"])
    saved = Path(first.trainer.log_dir) / "config.yaml"
    assert saved.is_file()

    second = VDMLightningCLI(
        args=["fit", f"--config={saved}", f"--trainer.logger.save_dir={tmp_path / 'second'}", f"--trainer.default_root_dir={tmp_path / 'second'}"]
    )

    assert second.model.deformation == parse_deformation("AP(18/pi, 1, 2, 1)")
    for before, after in zip(first.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(before, after, rtol=0, atol=0)


def _cli_checkpoint(tmp_path, *extra: str) -> str:
    cli = VDMLightningCLI(args=["fit", *_user_model_args(tmp_path, *extra)])
    return cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path


# Lightning 2.6 added LightningCLI._parse_ckpt_path, which takes the model's arguments from --ckpt_path. Before it,
# the model is built from the config and the mixin's own check refuses a checkpoint with another deformation.
_CLI_READS_CHECKPOINT_ARGUMENTS = hasattr(LightningCLI, "_parse_ckpt_path")


def test_resume_keeps_checkpoint_deformation(tmp_path):
    checkpoint = _cli_checkpoint(tmp_path / "first", "--model.deformation=LE(1, 0.99)")
    if not _CLI_READS_CHECKPOINT_ARGUMENTS:
        with pytest.raises(SystemExit) as exit_info:
            VDMLightningCLI(args=["fit", *_user_model_args(tmp_path / "second"), f"--ckpt_path={checkpoint}"])
        assert exit_info.value.code == 2
        return

    resumed = VDMLightningCLI(
        args=["fit", *_user_model_args(tmp_path / "second", "--trainer.max_epochs=3"), f"--ckpt_path={checkpoint}"]
    )

    assert resumed.model.deformation == LogExp(1, 0.99)
    assert resumed.trainer.global_step == 12  # 4 steps per epoch, resumed after epoch 2


def test_resume_with_other_deformation_errors(tmp_path, capsys):
    checkpoint = _cli_checkpoint(tmp_path / "first")  # trained without a deformation
    if not _CLI_READS_CHECKPOINT_ARGUMENTS:
        with pytest.raises(SystemExit) as exit_info:
            VDMLightningCLI(
                args=["fit", *_user_model_args(tmp_path / "second", "--model.deformation=LE(1, 0.99)"), f"--ckpt_path={checkpoint}"]
            )
        assert exit_info.value.code == 2
        return

    with pytest.raises(SystemExit) as exit_info:
        VDMLightningCLI(
            args=["fit", *_user_model_args(tmp_path / "second", "--model.deformation=LE(1, 0.99)"), f"--ckpt_path={checkpoint}"]
        )

    assert exit_info.value.code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "was trained with deformation None, but the config or command line asks for LE(1, 0.99)" in message


def test_resume_python_checkpoint_from_cli(tmp_path, capsys):
    from lightning.pytorch import Trainer

    from tests.tiny import DeformedRegression, RegressionData

    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    trainer.fit(DeformedRegression(deformation="LE(1, 0.99)"), RegressionData())
    checkpoint = trainer.checkpoint_callback.best_model_path

    resumed = VDMLightningCLI(
        args=["fit", *_user_model_args(tmp_path, "--model.deformation=LE(1, 0.99)"), f"--ckpt_path={checkpoint}"]
    )
    assert resumed.trainer.global_step == 8

    with pytest.raises(SystemExit) as exit_info:
        VDMLightningCLI(args=["fit", *_user_model_args(tmp_path / "other"), f"--ckpt_path={checkpoint}"])
    assert exit_info.value.code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "trained with deformation='LE(1, 0.99)'" in message
    assert "From the command line: set --model.deformation" in message
    assert "Traceback" not in message

    # Validation never deforms, so the same checkpoint validates with any deformation.
    validated = VDMLightningCLI(args=["validate", *_user_model_args(tmp_path / "validate"), f"--ckpt_path={checkpoint}"])
    assert validated.model.deformation is None


def test_load_from_checkpoint_rebuilds_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPOSITORY / "configs" / "quickstart.yaml"
    short = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--test_after_fit=false"]
    cli = VDMLightningCLI(args=["fit", f"--config={config}", *short])

    loaded = ImageClassifier.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path)

    assert isinstance(loaded.network, CifarResNet)
    assert loaded.deformation == LogExp(1, 0.9)
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--model.deformation=LE(1)", "Invalid deformation 'LE(1)': LE takes 2 coefficients"),
        ("--model.deformation=LE(1, -0.5)", "LE coefficient e2 must be a finite number > 0, got -0.5"),
        ("--model.deformation=LE(1, 0.99); import os", "Invalid deformation"),
    ],
    ids=["notation", "coefficient", "injection"],
)
def test_bad_argument_is_usage_error(tmp_path, capsys, argument, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_user_model_args(tmp_path, argument)])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bad_classifier_argument_is_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPOSITORY / "configs" / "quickstart.yaml"

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", "--model.init_args.lr=-1"])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid configuration: ValueError:" in error
    assert "-1" in error
    assert not (tmp_path / "logs").exists()


def test_top_level_help_names_tools(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])

    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'lightning-vdm plot', 'lightning-vdm simulate' and 'lightning-vdm report'" in help_text


def test_unknown_tool_falls_through_to_lightning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code != 0
    assert "fit" in capsys.readouterr().err


def _read_metrics(path: Path) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if value:
                    values.setdefault(key, []).append(float(value))
    return values


def test_quickstart_trains_on_digits(tmp_path, monkeypatch):
    # The config as shipped (30 epochs; about 10 s on two idle CPU cores), without the progress bar.
    monkeypatch.chdir(tmp_path)
    config = REPOSITORY / "configs" / "quickstart.yaml"
    cli = VDMLightningCLI(args=["fit", f"--config={config}", "--trainer.enable_progress_bar=false"])

    # The config sets test_after_fit, so the fit ends with a test of the best checkpoint, which must reach 95 %.
    assert cli.trainer.callback_metrics["test/acc"].item() >= 0.95
    csv_files = list((tmp_path / "logs" / "quickstart" / "csv").glob("version_*/metrics.csv"))
    assert len(csv_files) == 1
    metrics = _read_metrics(csv_files[0])
    for key in ("vdm/derivative", "vdm/loss_raw", "vdm/loss_deformed", "lr-SGD", "effective-lr-SGD"):
        assert key in metrics
    # LE(1, 0.9): δ'(ℓ) = 1 / (1 − 0.9·exp(−ℓ)) lies in (1, 10] for every loss ℓ ≥ 0.
    assert all(1.0 < value <= 10.0 for value in metrics["vdm/derivative"])
    assert list((tmp_path / "logs" / "quickstart" / "tensorboard").glob("version_*/events.out.tfevents.*"))
    # The TensorBoardLogger comes first, yet the config is saved beside metrics.csv too, for `lightning-vdm report`.
    saved = yaml.safe_load((csv_files[0].parent / "config.yaml").read_text())
    assert saved["model"]["init_args"]["deformation"] == "LE(1, 0.9)"
    assert saved == yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())


def test_quickstart_configs_differ_only_in_deformation():
    deformed = yaml.safe_load((REPOSITORY / "configs" / "quickstart.yaml").read_text())
    baseline = yaml.safe_load((REPOSITORY / "configs" / "quickstart_baseline.yaml").read_text())
    assert deformed["model"]["init_args"].pop("deformation") == "LE(1, 0.9)"
    assert baseline["model"]["init_args"].pop("deformation") is None
    assert deformed["model"] == baseline["model"]
    assert deformed["data"] == baseline["data"]
