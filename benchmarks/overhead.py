"""Measure what VDMMixin and its monitors add to a training step.

Seven variants train the same network on the same batches with SGD (Nesterov momentum 0.9, weight decay 5e-4):

- ``plain``: :class:`~lightning_vdm.models.ImageClassificationModule` in ``Trainer.fit``;
- ``plain_2_callbacks``: ``plain`` with two callbacks that do nothing, which measures what Lightning itself spends
  calling the hooks of two callbacks on every step;
- ``identity``: :class:`~lightning_vdm.models.ImageClassifier` with ``Identity()``;
- ``le``: ``ImageClassifier`` with ``LE(1, 0.99)``; on the CPU the mixin evaluates δ and δ' on the host and adds
  three scalar operations;
- ``le_autograd``: ``le`` through ``LogExp.forward`` and autograd, the mixin's path for a loss on an accelerator,
  run here on the CPU to show what the host path saves;
- ``le_monitors``: ``le`` with ``DeformationMonitor`` and ``EffectiveLearningRateMonitor``;
- ``raw``: a hand-written PyTorch loop.

The Lightning runs log to a CSVLogger at Lightning's default ``log_every_n_steps=50``, with the progress bar, the
model summary and checkpointing off. A step's time is the interval between the starts of two consecutive batches,
so it includes everything the loop does per batch (data fetch, hooks, logging, backward and the optimizer step).
Every round runs each variant once, in a random order, and the first ``--warmup`` steps of each run are dropped.
The reported step time of a variant is the median over rounds of its per-run median. The added time of a variant
is the median over rounds of its per-run median minus that of ``plain`` in the same round, which cancels the
machine's slow drifts.

Peak memory is measured separately. On the CPU each variant trains in a new Python process and reports its peak
resident set size. On CUDA it is ``torch.cuda.max_memory_allocated`` per run.

Example::

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --model resnet20 --steps 60 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vdm import DeformationMonitor, EffectiveLearningRateMonitor, Identity, LogExp
from lightning_vdm.models.classifier import ImageClassificationModule, ImageClassifier
from lightning_vdm.models.resnet_cifar import CifarResNet

VARIANTS = ("plain", "plain_2_callbacks", "identity", "le", "le_autograd", "le_monitors", "raw")
LOG_EVERY_N_STEPS = 50  # Lightning's default
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


@dataclass
class Setting:
    """One benchmark configuration."""

    model: str
    batch_size: int
    steps: int
    warmup: int
    device: str
    seed: int = 0


@dataclass
class RunResult:
    """Step times (seconds) after warm-up, and the raw loss of every step."""

    step_times: list[float]
    losses: list[float]
    unexpected_syncs: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Model and data


class _MLP(nn.Module):
    """Two-layer perceptron on 32 features, where the per-step overhead dominates the compute."""

    def __init__(self, features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


def build_network(setting: Setting) -> nn.Module:
    """Return the network with the same initial weights on every call."""
    torch.manual_seed(setting.seed)
    if setting.model == "resnet20":
        return CifarResNet(depth=20, num_classes=10)
    if setting.model == "mlp":
        return _MLP()
    raise ValueError(f"`model` must be 'resnet20' or 'mlp', got {setting.model!r}.")


def build_loader(setting: Setting) -> DataLoader:
    """Return a loader over fixed random batches: 3×32×32 images for ResNet-20, 32 features for the MLP."""
    generator = torch.Generator().manual_seed(setting.seed)
    count = setting.batch_size * (setting.steps + setting.warmup + 1)
    shape = (3, 32, 32) if setting.model == "resnet20" else (32,)
    inputs = torch.randn(count, *shape, generator=generator)
    targets = torch.randint(0, 10, (count,), generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=setting.batch_size, shuffle=False)


# --------------------------------------------------------------------------------------------------------------
# Timing callbacks


class StepTimer(Callback):
    """Record ``time.perf_counter()`` at the start of every training batch and the loss of every step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.starts: list[float] = []
        self.losses: list[Tensor] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        records = getattr(pl_module, "vdm_records", None)
        # The raw loss, kept on the device: reading it here would add a host synchronisation to every step.
        self.losses.append(records[0].raw if records else outputs["loss"].detach())

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def is_logging_step(batches_that_stepped: int, log_every_n_steps: int) -> bool:
    """Return whether Lightning logs at this optimizer step (as ``_LoggerConnector.should_update_logs``)."""
    return (batches_that_stepped + 1) % log_every_n_steps == 0


class SyncGuard(Callback):
    """Turn on ``torch.cuda.set_sync_debug_mode("error")`` for the body of every step that does not log.

    Put it first in the callbacks, so that it switches the mode back before the monitors read values at a logging
    step. On the CPU it only records which steps it would guard, so the schedule can be tested without a GPU.
    """

    def __init__(self, device: str, log_every_n_steps: int) -> None:
        self.device = device
        self.log_every_n_steps = log_every_n_steps
        self.guarded_steps: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if is_logging_step(step, self.log_every_n_steps):
            return
        self.guarded_steps.append(step)
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------------------
# The four variants


def build_module(variant: str, setting: Setting) -> ImageClassificationModule:
    arguments = dict(network=build_network(setting), num_classes=10, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if variant in ("plain", "plain_2_callbacks"):
        return ImageClassificationModule(**arguments)
    if variant == "identity":
        return ImageClassifier(deformation=Identity(), **arguments)
    if variant in ("le", "le_monitors"):
        return ImageClassifier(deformation=LogExp(1, 0.99), **arguments)
    if variant == "le_autograd":
        return ImageClassifier(deformation=_AutogradLogExp(1, 0.99), **arguments)
    raise ValueError(f"`variant` must be one of {VARIANTS[:-1]} for a Lightning run, got {variant!r}.")


class _AutogradLogExp(LogExp):
    """LE without host formulas, so the mixin differentiates ``forward`` with autograd on the CPU too."""

    def value_and_derivative(self, loss: float) -> None:
        return None


class _NoOpCallback(Callback):
    """A callback that overrides no hook; Lightning still calls each of its hooks on every step."""


class _OtherNoOpCallback(_NoOpCallback):
    """A second no-op callback (Lightning rejects two callbacks with the same state key)."""


def run_lightning(variant: str, setting: Setting, loader: DataLoader, sync_check: bool = False) -> RunResult:
    """Train one Lightning variant for ``warmup + steps`` steps and return its step times after warm-up."""
    module = build_module(variant, setting)
    timer = StepTimer(setting.device)
    guard = SyncGuard(setting.device, LOG_EVERY_N_STEPS)
    callbacks: list[Callback] = [guard] if sync_check else []
    if variant == "le_monitors":
        callbacks += [DeformationMonitor(), EffectiveLearningRateMonitor()]
    if variant == "plain_2_callbacks":
        callbacks += [_NoOpCallback(), _OtherNoOpCallback()]
    callbacks.append(timer)
    with tempfile.TemporaryDirectory() as directory:
        trainer = Trainer(
            default_root_dir=directory,
            accelerator="gpu" if setting.device == "cuda" else "cpu",
            devices=1,
            logger=CSVLogger(directory, name="csv"),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            max_steps=setting.warmup + setting.steps,
            log_every_n_steps=LOG_EVERY_N_STEPS,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, train_dataloaders=loader)
    return _result(timer.starts, timer.losses, setting)


def run_raw(setting: Setting, loader: DataLoader) -> RunResult:
    """Train the same network with a hand-written loop: forward, cross entropy, backward, SGD step."""
    device = torch.device(setting.device)
    network = build_network(setting).to(device)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    starts, losses = [], []
    total = setting.warmup + setting.steps
    for step, (images, targets) in enumerate(loader):
        if step == total:
            break
        if setting.device == "cuda":
            torch.cuda.synchronize()
        starts.append(time.perf_counter())
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = F.cross_entropy(network(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if setting.device == "cuda":
        torch.cuda.synchronize()
    starts.append(time.perf_counter())
    return _result(starts, losses, setting)


def _result(starts: list[float], losses: list[Tensor], setting: Setting) -> RunResult:
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    return RunResult(step_times=intervals[setting.warmup :], losses=[float(loss) for loss in losses])


def run_variant(variant: str, setting: Setting, loader: DataLoader, sync_check: bool = False) -> RunResult:
    if variant == "raw":
        return run_raw(setting, loader)
    return run_lightning(variant, setting, loader, sync_check)


# --------------------------------------------------------------------------------------------------------------
# Memory


def peak_memory(variant: str, setting: Setting) -> int:
    """Return the peak memory in bytes of one run: CUDA allocations, or the RSS of a fresh CPU process."""
    if setting.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run_variant(variant, setting, build_loader(setting))
        return torch.cuda.max_memory_allocated()
    # A new interpreter rather than a fork: a child forked while torch's or a logger's thread holds a lock can wait
    # on that lock for ever.
    command = [
        sys.executable, __file__, "--peak-rss-of", variant, "--model", setting.model, "--batch-size",
        str(setting.batch_size), "--steps", str(setting.steps), "--warmup", str(setting.warmup),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
    if completed.returncode != 0:
        raise RuntimeError(f"The peak-memory run of {variant!r} failed (exit {completed.returncode}):\n{completed.stderr}")
    return int(completed.stdout.strip().splitlines()[-1])


def _print_peak_rss(variant: str, setting: Setting) -> None:
    run_variant(variant, setting, build_loader(setting))
    # ru_maxrss is in kibibytes on Linux.
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# --------------------------------------------------------------------------------------------------------------
# Domain check


def domain_check_cost_us(repeats: int = 20000) -> float:
    """Return the microseconds of one domain check of one loss (``vdm_check_losses``), timed on the CPU.

    Losses on an accelerator are checked in batches every ``log_every_n_steps`` steps. This is what a check on every
    step would cost.
    """
    module = ImageClassifier(network=_MLP(), num_classes=10, deformation=LogExp(1, 0.99))
    loss = torch.tensor(2.3)

    def check() -> None:
        module._vdm_state.pending.append((0, loss, loss))
        module.vdm_check_losses()

    check()
    return timeit.timeit(check, number=repeats) / repeats * 1e6


# --------------------------------------------------------------------------------------------------------------
# Report


def benchmark(setting: Setting, rounds: int, memory: bool = True, sync_check: bool = False) -> dict[str, Any]:
    """Run ``rounds`` rounds of all variants, each round in random order, and return the summary."""
    loader = build_loader(setting)
    order_rng = random.Random(setting.seed)
    per_round: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    paired: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    losses: dict[str, list[float]] = {}
    for _ in range(rounds):
        order = list(VARIANTS)
        order_rng.shuffle(order)
        for variant in order:
            result = run_variant(variant, setting, loader, sync_check)
            per_round[variant].append(statistics.median(result.step_times))
            losses.setdefault(variant, result.losses)
        for variant in VARIANTS:
            paired[variant].append(per_round[variant][-1] - per_round["plain"][-1])

    step_time = {variant: statistics.median(times) for variant, times in per_round.items()}
    summary: dict[str, Any] = {
        "setting": setting,
        "rounds": rounds,
        "step_time_s": step_time,
        "ratio_vs_plain": {variant: step_time[variant] / step_time["plain"] for variant in VARIANTS},
        "added_us_vs_plain": {variant: statistics.median(paired[variant]) * 1e6 for variant in VARIANTS},
        "identity_vs_raw_max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["identity"], losses["raw"])),
        "domain_check_us": domain_check_cost_us(),
    }
    if memory:
        summary["peak_memory_bytes"] = {variant: peak_memory(variant, setting) for variant in VARIANTS}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Return the summary as a Markdown table and a few lines of checks."""
    setting = summary["setting"]
    memory = summary.get("peak_memory_bytes")
    lines = [
        f"model={setting.model} batch_size={setting.batch_size} steps={setting.steps} warmup={setting.warmup} "
        f"rounds={summary['rounds']} device={setting.device}",
        "",
        "| variant | median step (ms) | ratio vs plain | added µs/step vs plain |"
        + (" peak memory (MiB) | memory vs plain |" if memory else ""),
        "|---|---|---|---|" + ("---|---|" if memory else ""),
    ]
    for variant in VARIANTS:
        row = (
            f"| {variant} | {summary['step_time_s'][variant] * 1e3:.3f} | {summary['ratio_vs_plain'][variant]:.4f} "
            f"| {summary['added_us_vs_plain'][variant]:+.1f} |"
        )
        if memory:
            row += f" {memory[variant] / 2**20:.1f} | {memory[variant] / memory['plain']:.4f} |"
        lines.append(row)
    difference = summary["identity_vs_raw_max_abs_loss_diff"]
    added = summary["added_us_vs_plain"]
    lines += [
        "",
        f"identity vs raw loop: max |loss difference| = {difference:.3g} "
        f"({'match' if difference < 5e-6 else 'MISMATCH'} to five decimals)",
        f"one domain check of one loss (batched every log_every_n_steps steps on an accelerator): "
        f"{summary['domain_check_us']:.1f} µs",
        f"LE through autograd instead of the host path: {added['le_autograd'] - added['le']:+.1f} µs/step",
        "added µs/step, split: "
        f"mixin with Identity {added['identity']:+.1f}, LE over Identity {added['le'] - added['identity']:+.1f}, "
        f"Lightning calling two callbacks {added['plain_2_callbacks']:+.1f}, "
        f"the monitors' own hooks {added['le_monitors'] - added['le'] - added['plain_2_callbacks']:+.1f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet20", "mlp", "both"], default="both", help="network to time")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to train on")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run, after warm-up")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of all variants, each in random order")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per batch")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--sync-check",
        action="store_true",
        help="on CUDA, raise on any host synchronisation in steps that do not log (set_sync_debug_mode)",
    )
    parser.add_argument("--peak-rss-of", choices=VARIANTS, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.peak_rss_of:
        # The child process of peak_memory: run one variant and print its peak RSS in bytes.
        setting = Setting(arguments.model, arguments.batch_size, arguments.steps, arguments.warmup, "cpu")
        _print_peak_rss(arguments.peak_rss_of, setting)
        return []
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False.")

    models = ["resnet20", "mlp"] if arguments.model == "both" else [arguments.model]
    summaries = []
    for model in models:
        setting = Setting(model, arguments.batch_size, arguments.steps, arguments.warmup, arguments.device)
        summary = benchmark(setting, arguments.rounds, memory=not arguments.no_memory, sync_check=arguments.sync_check)
        print(format_summary(summary), end="\n\n")
        summaries.append(summary)
    return summaries


if __name__ == "__main__":
    main()
