"""``lightning-vdm report``: medians, differences and run counts from CSVLogger and LightningCLI files."""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from lightning_vdm.cli import VDMLightningCLI
from lightning_vdm.deformations import parse_deformation
from lightning_vdm.report import collect_runs, load_run, main, summarise, to_markdown

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

NETWORK_RESNET20 = {"class_path": "lightning_vdm.models.CifarResNet", "init_args": {"depth": 20, "num_classes": 10}}


def _write_run(
    folder: Path,
    val_acc: list[float],
    deformation: str | dict | None = None,
    seed: int = 0,
    test_acc: float | None = None,
    lr: float = 0.1,
    dataset: str = "CIFAR10DataModule",
    network: dict | None = None,
    val_top5: list[float] | None = None,
) -> Path:
    """Write metrics.csv as CSVLogger does (sorted columns, empty cells) and config.yaml as LightningCLI does."""
    folder.mkdir(parents=True)
    columns = ["epoch", "step", "train/loss", "val/acc", "val/loss"]
    if val_top5 is not None:
        columns.append("val/acc_top5")
    if test_acc is not None:
        columns.append("test/acc")
    columns.sort()
    rows = []
    for epoch, accuracy in enumerate(val_acc):
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "train/loss": 1.5 - 0.1 * epoch})
        row = {"epoch": epoch, "step": 10 * epoch + 9, "val/acc": accuracy, "val/loss": 1.0}
        if val_top5 is not None:
            row["val/acc_top5"] = val_top5[epoch]
        rows.append(row)
    if test_acc is not None:
        rows.append({"epoch": 0, "step": 0, "test/acc": test_acc})
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    config = {
        "seed_everything": seed,
        "trainer": {"accelerator": "auto", "devices": 1, "num_nodes": 1, "precision": None, "max_epochs": 250},
        "model": {
            "class_path": "lightning_vdm.models.ImageClassifier",
            "init_args": {
                "deformation": deformation,
                "network": network or NETWORK_RESNET20,
                "num_classes": 10,
                "lr": lr,
                "momentum": 0.9,
                "nesterov": True,
                "weight_decay": 0.0005,
                "milestones": [150, 225],
                "gamma": 0.1,
                "top_k": [1],
                "nonfinite_loss": "error",
                "derivative_at": "local",
            },
        },
        "data": {
            "class_path": f"lightning_vdm.data.{dataset}",
            "init_args": {"data_dir": f"/data/{seed}", "batch_size": 128, "val_split": 0, "num_workers": 4},
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def _table_rows(markdown: str) -> list[list[str]]:
    lines = markdown.strip().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _header(markdown: str) -> list[str]:
    return [cell.strip() for cell in markdown.splitlines()[0].strip("|").split("|")]


# ----------------------------------------------------------------------------------------------------------------
# Medians, differences and counts


BASELINE_C10 = [0.9204, 0.9180, 0.9215, 0.9190, 0.9230]
DEFORMED_C10 = [0.9229, 0.9251, 0.9212, 0.9240, 0.9199]
BASELINE_C100 = [0.6976, 0.6950]
DEFORMED_C100 = [0.7067, 0.7021, 0.7040]


@pytest.fixture
def table2_runs(tmp_path: Path) -> list[Path]:
    runs = []
    for seed, accuracy in enumerate(BASELINE_C10):
        runs.append(_write_run(tmp_path / f"c10_base_{seed}", [0.5, accuracy], seed=seed))
    for seed, accuracy in enumerate(DEFORMED_C10):
        runs.append(_write_run(tmp_path / f"c10_vdm_{seed}", [0.5, accuracy], "LE(1, 0.9)", seed=seed))
    for seed, accuracy in enumerate(BASELINE_C100):
        runs.append(
            _write_run(tmp_path / f"c100_base_{seed}", [0.3, accuracy], seed=seed, dataset="CIFAR100DataModule")
        )
    for seed, accuracy in enumerate(DEFORMED_C100):
        runs.append(
            _write_run(
                tmp_path / f"c100_vdm_{seed}",
                [0.3, accuracy],
                "AP(18/pi, 1, 2, 1)",
                seed=seed,
                dataset="CIFAR100DataModule",
            )
        )
    return runs


def test_summarise_medians(table2_runs: list[Path]) -> None:
    rows = summarise(collect_runs(table2_runs))
    by_dataset = {row.dataset: row for row in rows}

    assert [row.dataset for row in rows] == ["CIFAR-10", "CIFAR-100"]
    assert by_dataset["CIFAR-10"].baseline_median == pytest.approx(100 * statistics.median(BASELINE_C10))
    assert by_dataset["CIFAR-10"].deformed_median == pytest.approx(100 * statistics.median(DEFORMED_C10))
    # Two baseline runs: the median is the mean of both.
    assert by_dataset["CIFAR-100"].baseline_median == pytest.approx(100 * (0.6976 + 0.6950) / 2)
    assert by_dataset["CIFAR-100"].deformed_median == pytest.approx(100 * 0.7040)
    assert by_dataset["CIFAR-100"].difference == pytest.approx(100 * (0.7040 - 0.6963))


def test_markdown_table2_shape(table2_runs: list[Path]) -> None:
    markdown = to_markdown(summarise(collect_runs(table2_runs)))

    assert _header(markdown) == [
        "Dataset", "Network", "Baseline top-1 (%)", "n", "Deformed top-1 (%)", "n", "VDM", "Difference", "Accuracy used"
    ]
    assert _table_rows(markdown) == [
        ["CIFAR-10", "ResNet-20", "92.04", "5", "92.29", "5", "LE(1, 0.9)", "+0.25", "`val/acc (last)`"],
        ["CIFAR-100", "ResNet-20", "69.63", "2", "70.40", "3", "AP(18/π, 1, 2, 1)", "+0.77", "`val/acc (last)`"],
    ]


def test_main_writes_file(table2_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "results.md"

    status = main([str(path) for path in table2_runs] + ["--out", str(out)])

    assert status == 0
    assert out.read_text() == to_markdown(summarise(collect_runs(table2_runs)))


def test_main_error_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()

    status = main([str(tmp_path / "empty")])

    assert status == 1
    assert "No metrics.csv" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Which accuracy


def test_test_acc_preferred(tmp_path: Path) -> None:
    run = load_run(_write_run(tmp_path / "run", [0.80, 0.90, 0.85], test_acc=0.8712))

    assert run.metric == "test/acc"
    assert run.top1 == pytest.approx(87.12)


@pytest.mark.parametrize(("rule", "expected"), [("last", 85.0), ("best", 90.0)], ids=["last", "best"])
def test_val_acc_rule(rule: str, expected: float, tmp_path: Path) -> None:
    run = load_run(_write_run(tmp_path / "run", [0.80, 0.90, 0.85]), val_metric=rule)

    assert run.metric == f"val/acc ({rule})"
    assert run.top1 == pytest.approx(expected)


def test_top5_same_epoch(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "run", [0.60, 0.70, 0.65], val_top5=[0.85, 0.90, 0.88])

    assert load_run(path, "best").top5 == pytest.approx(90.0)
    assert load_run(path, "last").top5 == pytest.approx(88.0)
    markdown = to_markdown(summarise([load_run(path)]))
    assert "Baseline top-5 (%)" in _header(markdown)
    assert _table_rows(markdown)[0][_header(markdown).index("Baseline top-5 (%)")] == "88.00"


# ----------------------------------------------------------------------------------------------------------------
# Cells with several deformations or settings


def test_deformations_own_rows(tmp_path: Path) -> None:
    paths = [
        _write_run(tmp_path / "base", [0.6976]),
        _write_run(tmp_path / "le", [0.7022], "LE(1, 0.6)"),
        _write_run(tmp_path / "ap", [0.7067], "AP(18/pi, 1, 2, 1)"),
        # The same deformation written with its decimal value joins the AP(18/π, 1, 2, 1) arm.
        _write_run(tmp_path / "ap_decimal", [0.7001], "AP(5.729577951308232, 1, 2, 1)", seed=1),
    ]

    rows = summarise(collect_runs(paths))

    assert [row.deformation_label for row in rows] == ["LE(1, 0.6)", "AP(18/π, 1, 2, 1)"]
    assert [len(row.baseline) for row in rows] == [1, 1]
    assert [len(row.deformed) for row in rows] == [1, 2]
    assert rows[1].deformed_median == pytest.approx(100 * (0.7067 + 0.7001) / 2)


def test_inconsistent_settings_error(tmp_path: Path) -> None:
    paths = [_write_run(tmp_path / "a", [0.69]), _write_run(tmp_path / "b", [0.70], lr=0.2, seed=1)]

    with pytest.raises(ValueError, match=r"inconsistent settings \(model\.lr=0\.1 .* model\.lr=0\.2"):
        summarise(collect_runs(paths))


def test_split_settings_rows(tmp_path: Path) -> None:
    paths = [
        _write_run(tmp_path / "lr1", [0.6976]),
        _write_run(tmp_path / "lr1_vdm", [0.7067], "AP(18/pi, 1, 2, 1)"),
        _write_run(tmp_path / "lr2", [0.6910], lr=0.2),
    ]

    markdown = to_markdown(summarise(collect_runs(paths), split_settings=True))

    assert _header(markdown)[2] == "Setting"
    assert _table_rows(markdown) == [
        ["CIFAR-10", "ResNet-20", "model.lr=0.1", "69.76", "1", "70.67", "1", "AP(18/π, 1, 2, 1)", "+0.91",
         "`val/acc (last)`"],
        ["CIFAR-10", "ResNet-20", "model.lr=0.2", "69.10", "1", "—", "0", "—", "—", "`val/acc (last)`"],
    ]


def test_data_location_ignored(tmp_path: Path) -> None:
    # _write_run puts each seed's data in another folder, which must not split the cell.
    paths = [_write_run(tmp_path / f"s{seed}", [0.9], seed=seed) for seed in range(3)]

    rows = summarise(collect_runs(paths))

    assert len(rows) == 1
    assert len(rows[0].baseline) == 3


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_metrics_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()

    with pytest.raises(FileNotFoundError, match="No metrics.csv in"):
        load_run(tmp_path / "run")


def test_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "absent")


def test_missing_config_error(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "run", [0.9])
    (path / "config.yaml").unlink()

    with pytest.raises(FileNotFoundError, match="No config.yaml or hparams.yaml"):
        load_run(path)


def test_no_accuracy_error(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "run", [])

    with pytest.raises(ValueError, match="no value of 'test/acc' or 'val/acc'"):
        load_run(path)


def test_duplicate_seed_error(tmp_path: Path) -> None:
    paths = [_write_run(tmp_path / "a", [0.90], seed=3), _write_run(tmp_path / "b", [0.91], seed=3)]

    with pytest.raises(ValueError, match="repeat seed 3"):
        summarise(collect_runs(paths))


def test_mixed_metrics_error(tmp_path: Path) -> None:
    paths = [_write_run(tmp_path / "a", [0.90], test_acc=0.9), _write_run(tmp_path / "b", [0.91], seed=1)]

    with pytest.raises(ValueError, match="use different accuracies"):
        summarise(collect_runs(paths))


def test_folder_twice_error(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "a", [0.90])

    with pytest.raises(ValueError, match="given twice"):
        collect_runs([path, tmp_path / "a" / ".." / "a"])


def test_bad_deformation_error(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "a", [0.90], "LE(1,")

    with pytest.raises(ValueError, match="does not parse"):
        load_run(path)


def test_class_path_deformation(tmp_path: Path) -> None:
    spec = {"class_path": "lightning_vdm.deformations.LogExp", "init_args": {"e1": 1.0, "e2": 0.9}}
    run = load_run(_write_run(tmp_path / "a", [0.90], spec))

    assert run.deformation == parse_deformation("LE(1, 0.9)")
    assert run.deformation_label == repr(parse_deformation("LE(1, 0.9)"))


def test_unknown_class_path_error(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "a", [0.90], {"class_path": "torch.nn.Linear", "init_args": {}})

    with pytest.raises(ValueError, match="reads only the classes of lightning_vdm.deformations"):
        load_run(path)


def test_bad_val_metric_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`val_metric` must be one of"):
        load_run(_write_run(tmp_path / "a", [0.90]), val_metric="mean")


def test_no_runs_error() -> None:
    with pytest.raises(ValueError, match="No run folders given"):
        collect_runs([])


# ----------------------------------------------------------------------------------------------------------------
# Runs written by LightningCLI itself


def _fit_digits(root: Path, extra: list[str], csv_first: bool) -> Path:
    loggers = ["lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger"]
    if not csv_first:
        loggers.reverse()
    logger_args = []
    for class_path in loggers:
        # Each save_dir applies to the logger appended just before it.
        logger_args += ["--trainer.logger+=" + class_path, f"--trainer.logger.save_dir={root}"]
    args = [
        "fit",
        "--config", str(CONFIGS / "quickstart_baseline.yaml"),
        "--trainer.logger=[]",
        *logger_args,
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        *extra,
    ]
    # The quickstart config sets test_after_fit, so the run logs test/acc after val/acc.
    cli = VDMLightningCLI(args=args)
    csv_logger = next(logger for logger in cli.trainer.loggers if type(logger).__name__ == "CSVLogger")
    return Path(csv_logger.log_dir)


def test_lightning_cli_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-vdm"])
    base = _fit_digits(tmp_path / "base", [], csv_first=True)
    deformed = _fit_digits(tmp_path / "vdm", ["--model.init_args.deformation", "LE(1, 0.9)"], csv_first=True)

    rows = summarise(collect_runs([base, deformed]))

    logged = {}
    for name, path in (("base", base), ("vdm", deformed)):
        with (path / "metrics.csv").open(newline="") as handle:
            logged[name] = [float(row["test/acc"]) for row in csv.DictReader(handle) if row.get("test/acc")][-1]
    assert len(rows) == 1
    assert (rows[0].dataset, rows[0].network) == ("digits", "ResNet-8")
    assert rows[0].deformation_label == "LE(1, 0.9)"
    assert rows[0].metric == "test/acc"
    assert rows[0].baseline_median == pytest.approx(100 * logged["base"])
    assert rows[0].deformed_median == pytest.approx(100 * logged["vdm"])
    assert math.isclose(rows[0].difference, 100 * (logged["vdm"] - logged["base"]), abs_tol=1e-9)


def test_hparams_fallback_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-vdm"])
    path = _fit_digits(tmp_path / "tb_first", ["--model.init_args.deformation", "LE(1, 0.9)"], csv_first=False)
    # The CLI saves config.yaml beside every logger's files; a run written without it keeps only hparams.yaml.
    (path / "config.yaml").unlink()

    with pytest.warns(UserWarning, match="no config.yaml, only hparams.yaml"):
        run = load_run(path)

    assert run.network == "unknown network"
    assert run.deformation_label == "LE(1, 0.9)"
    assert dict(run.recipe)["model.lr"] == "0.1"
