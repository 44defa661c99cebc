"""The overhead benchmark's core still runs and prints its table (the measured figures live in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the script's classes are built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_prints_ratios(overhead, capsys):
    summaries = overhead.main(["--model", "mlp", "--steps", "4", "--warmup", "2", "--rounds", "1", "--batch-size", "16",
                               "--no-memory", "--parts-runs", "1"])
    printed = capsys.readouterr().out

    summary = summaries[0]
    assert set(summary["ratio_vs_plain"]) == set(overhead.VARIANTS)
    assert set(overhead.VARIANTS) == {"plain", "plain_2_callbacks", "identity", "le", "le_autograd", "le_monitors", "raw"}
    assert summary["ratio_vs_plain"]["plain"] == 1.0
    assert all(ratio > 0 for ratio in summary["ratio_vs_plain"].values())
    # With Identity the Lightning module trains exactly as the hand-written loop.
    assert summary["identity_vs_raw_max_abs_loss_diff"] < 5e-6
    for variant in overhead.VARIANTS:
        assert f"| {variant} |" in printed
    assert "match to five decimals" in printed
    assert "Lightning calling two callbacks" in printed
    assert summary["added_us_vs_plain"]["plain"] == 0.0
    assert set(summary["added_s_by_part"]["mean"]) == {*overhead.PARTS, "total"}
    for text in overhead.PARTS.values():
        assert f"| {text} |" in printed
    assert "total over all steps as a share of plain's median step" in printed


def _graph_node_names(tensor):
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_autograd_variant_takes_the_tensor_path(overhead):
    # `le_autograd` builds LE's autograd graph on the CPU; `le` takes the host path, whose graph has no expm1.
    setting = overhead.Setting("mlp", batch_size=8, steps=1, warmup=0, device="cpu")
    inputs, targets = next(iter(overhead.build_loader(setting)))
    reference = overhead.LogExp(1, 0.99)
    has_expm1 = {}
    for variant in ("le", "le_autograd"):
        module = overhead.build_module(variant, setting)
        deformed = module._vdm_deform(overhead.F.cross_entropy(module(inputs), targets))
        has_expm1[variant] = "Expm1Backward0" in _graph_node_names(deformed)
        expected = reference.forward(module.vdm_records[0].raw.double()).item()
        assert deformed.item() == pytest.approx(expected, rel=1e-6)
    assert has_expm1 == {"le": False, "le_autograd": True}


def test_sync_guard_skips_logging_steps(overhead):
    setting = overhead.Setting("mlp", batch_size=4, steps=6, warmup=0, device="cpu")
    guard = overhead.SyncGuard("cpu", log_every_n_steps=3)
    module = overhead.build_module("le_monitors", setting)
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    trainer = Trainer(logger=CSVLogger(overhead.tempfile.mkdtemp()), callbacks=[guard], max_steps=6,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      log_every_n_steps=3, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=overhead.build_loader(setting))
    # Lightning logs after steps 2 and 5 (0-based) with log_every_n_steps=3; every other step is guarded.
    assert guard.guarded_steps == [0, 1, 3, 4]


def test_peak_memory_runs_in_child(overhead):
    setting = overhead.Setting("mlp", batch_size=8, steps=2, warmup=1, device="cpu")
    peak = overhead.peak_memory("identity", setting)
    assert peak > 50 * 2**20


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps, so the time between two marks has a known lower bound."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.02)
        return grad


def test_backward_marks_time_nodes_between(overhead):
    clock = overhead._Clock()
    clock.new_step()
    weight = torch.tensor(2.0, requires_grad=True)
    loss = weight * 3
    output = _SlowBackward.apply(loss)
    overhead.mark_backward(output, loss, clock)
    output.backward()

    assert 0.02 <= clock.current["deformation_backward"] < 0.5
    assert weight.grad.item() == 3.0


def test_backward_marks_one_tensor_hooks_only(overhead):
    clock = overhead._Clock()
    clock.new_step()
    loss = torch.tensor(2.0, requires_grad=True) * 3
    overhead.mark_backward(loss, loss, clock)
    loss.backward()

    assert 0.0 < clock.current["deformation_backward"] < 0.005


def test_timed_hooks_add_time(overhead):
    from lightning.pytorch import Callback

    class Slow(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(0.01)
            self.seen = batch_idx

    callback = Slow()
    clock = overhead._Clock()
    clock.new_step()
    overhead.time_hooks(callback, clock, "monitor_hooks")

    callback.on_train_batch_end(None, None, None, None, 7)
    callback.on_before_zero_grad(None, None, None)

    assert callback.seen == 7
    assert 0.01 <= clock.current["monitor_hooks"] < 1.0
    assert clock.steps == [clock.current]


def test_timed_runs_record_each_step(overhead):
    setting = overhead.Setting("mlp", batch_size=8, steps=5, warmup=2, device="cpu")
    loader = overhead.build_loader(setting)

    plain = overhead.timed_parts_of_run("plain", setting, loader)
    deformed = overhead.timed_parts_of_run("le_monitors", setting, loader)

    assert len(plain) == len(deformed) == 5
    for part in ("mixin_step", "mixin_hooks", "monitor_hooks"):
        assert all(step[part] == 0.0 for step in plain), part
        assert all(step[part] > 0.0 for step in deformed), part
    assert all(step["callback_dispatch"] > 0 for step in plain + deformed)
    with pytest.raises(ValueError, match="'plain' or 'le_monitors'.*got 'le'"):
        overhead.timed_parts_of_run("le", setting, loader)
