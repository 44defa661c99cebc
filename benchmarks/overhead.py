"""Measure what VDMMixin and its monitors add to a training step.

Seven variants train the same network on the same batches with SGD (Nesterov momentum 0.9, weight decay 5e-4):

- ``plain``: :class:`~lightning_vdm.models.ImageClassificationModule` in ``Trainer.fit``;
- ``plain_2_callbacks``: ``plain`` with two callbacks that do nothing, which measures what Lightning itself spends
  calling the hooks of two callbacks on every step;
- ``identity``: :class:`~lightning_vdm.models.ImageClassifier` with ``Identity()``;
- ``le``: ``ImageClassifier`` with ``LE(1, 0.99)``; on the CPU the mixin evaluates δ and δ' on the host and adds
  one scalar multiplication;
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

A difference of two whole steps is noisy: on the CPU of docs/benchmarks.md it moved by up to 20 µs between runs
on the MLP and by several percent on ResNet-20. So the script also times each added part directly, inside
instrumented runs of ``plain`` and ``le_monitors`` (``--parts-runs``): the mixin's code in ``training_step`` and its
hooks, backward through the deformation's operations (from a hook on the deformed loss to one on the raw loss), the
monitors' hooks, Lightning's calls of them, its per-step metric update, and the garbage collector. Each part is a
sum of intervals of a few microseconds, so it varies by one or two microseconds between runs, and the parts cover
only the code they name.

Peak memory is measured separately. On the CPU each variant trains in a new Python process and reports its peak
resident set size. On CUDA it is ``torch.cuda.max_memory_allocated`` per run.

Example::

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --model resnet20 --steps 60 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer import call as lightning_call
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vdm import DeformationMonitor, EffectiveLearningRateMonitor, Identity, LogExp, VDMMixin
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
# The Lightning variants


def module_arguments(setting: Setting) -> dict[str, Any]:
    """Return the arguments of ``ImageClassificationModule`` that every variant shares, with a fresh network."""
    return dict(network=build_network(setting), num_classes=10, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def build_module(variant: str, setting: Setting) -> ImageClassificationModule:
    arguments = module_arguments(setting)
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
    fit_quietly(module, callbacks, setting, loader)
    return _result(timer.starts, timer.losses, setting)


def fit_quietly(
    module: ImageClassificationModule, callbacks: list[Callback], setting: Setting, loader: DataLoader
) -> None:
    """Train ``module`` for ``warmup + steps`` steps with a CSVLogger in a temporary folder, warnings silenced."""
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
        module._vdm_state.pending.append(((0, 0, 0), loss, loss))
        module.vdm_check_losses()

    check()
    return timeit.timeit(check, number=repeats) / repeats * 1e6


# --------------------------------------------------------------------------------------------------------------
# Direct timing of the added parts

PARTS = {
    "mixin_step": "the mixin in training_step (wrapper, record, δ and δ' on the host, one scalar multiplication)",
    "mixin_hooks": "the mixin's on_before_backward and on_before_optimizer_step",
    "deformation_backward": "backward through the deformation's operations",
    "monitor_hooks": "the monitors' hooks",
    "callback_dispatch": "Lightning calling the monitors' hooks",
    "logging": "Lightning writing the logged metrics (update_train_step_metrics)",
    "garbage_collection": "Python's garbage collector",
}


class _Clock:
    """Sums of ``perf_counter`` intervals per part, one dict per timed step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current = dict.fromkeys(PARTS, 0.0)  # the warm-up steps add here and are dropped
        self.inner = 0.0
        self.loss: Tensor | None = None
        self.backward_start = 0.0
        self.collection_start = 0.0

    def add(self, part: str, seconds: float) -> None:
        self.current[part] += seconds

    def new_step(self) -> None:
        self.current = dict.fromkeys(PARTS, 0.0)
        self.steps.append(self.current)


def mark_backward(output: Tensor, loss: Tensor, clock: _Clock) -> None:
    """Time backward from ``output`` down to ``loss``: the nodes that lie between them, and two hook calls."""

    def start(grad: Tensor) -> None:
        clock.backward_start = time.perf_counter()

    def end(grad: Tensor) -> None:
        clock.add("deformation_backward", time.perf_counter() - clock.backward_start)

    # Hooks of one tensor run in the order of registration, so with `output is loss` this times the hooks alone.
    output.register_hook(start)
    loss.register_hook(end)


class _TimedInnerStep(ImageClassificationModule):
    """Time the module's own training step, the part that the plain module runs too, and keep its loss."""

    clock: _Clock

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        start = time.perf_counter()
        loss = super().training_step(batch, batch_idx)
        self.clock.inner = time.perf_counter() - start
        self.clock.loss = loss
        return loss


class _TimedPlain(_TimedInnerStep):
    """The plain module with the same timers as ``_TimedClassifier``, as the baseline of each part."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        mark_backward(loss, loss, self.clock)
        return loss


class _TimedClassifier(VDMMixin, _TimedInnerStep):
    """``ImageClassifier`` whose mixin code is timed: ``training_step`` minus the module's own step, and hooks."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        clock = self.clock
        start = time.perf_counter()
        output = super().training_step(batch, batch_idx)
        clock.add("mixin_step", time.perf_counter() - start - clock.inner)
        mark_backward(output, clock.loss, clock)
        return output

    def on_before_backward(self, loss: Tensor) -> None:
        start = time.perf_counter()
        super().on_before_backward(loss)
        self.clock.add("mixin_hooks", time.perf_counter() - start)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(optimizer)
        self.clock.add("mixin_hooks", time.perf_counter() - start)


def time_hooks(callback: Callback, clock: _Clock, part: str) -> None:
    """Replace every ``on_*`` hook of ``callback`` by one that adds its time to ``part``."""
    for name in dir(Callback):
        if not name.startswith("on_"):
            continue
        method = getattr(callback, name)

        def timed(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                clock.add(part, time.perf_counter() - start)

        setattr(callback, name, timed)


class _StepClock(Callback):
    """Start a new record at every timed step; warm-up steps are not recorded."""

    def __init__(self, clock: _Clock, warmup: int) -> None:
        self.clock = clock
        self.warmup = warmup

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.warmup:
            self.clock.new_step()


@contextlib.contextmanager
def _timing_lightning(clock: _Clock) -> Iterator[None]:
    """Time Lightning's callback dispatch, its per-step metric update, and the garbage collector."""
    dispatch = lightning_call._call_callback_hooks
    update = _LoggerConnector.update_train_step_metrics

    def timed_dispatch(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            dispatch(*args, **kwargs)
        finally:
            clock.add("callback_dispatch", time.perf_counter() - start)

    def timed_update(connector: _LoggerConnector) -> None:
        start = time.perf_counter()
        try:
            update(connector)
        finally:
            clock.add("logging", time.perf_counter() - start)

    def collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            clock.collection_start = time.perf_counter()
        else:
            clock.add("garbage_collection", time.perf_counter() - clock.collection_start)

    gc.callbacks.append(collection)
    try:
        with mock.patch.object(lightning_call, "_call_callback_hooks", timed_dispatch), mock.patch.object(
            _LoggerConnector, "update_train_step_metrics", timed_update
        ):
            yield
    finally:
        gc.callbacks.remove(collection)


def timed_parts_of_run(variant: str, setting: Setting, loader: DataLoader) -> list[dict[str, float]]:
    """Train ``plain`` or ``le_monitors`` with the parts timed; return the seconds of each part per timed step."""
    if variant not in ("plain", "le_monitors"):
        raise ValueError(f"`variant` must be 'plain' or 'le_monitors' for the timed parts, got {variant!r}.")
    clock = _Clock()
    arguments = module_arguments(setting)
    callbacks: list[Callback] = [_StepClock(clock, setting.warmup)]
    if variant == "plain":
        module: ImageClassificationModule = _TimedPlain(**arguments)
    else:
        module = _TimedClassifier(deformation=LogExp(1, 0.99), **arguments)
        monitors = [DeformationMonitor(), EffectiveLearningRateMonitor()]
        for monitor in monitors:
            time_hooks(monitor, clock, "monitor_hooks")
        callbacks += monitors
    module.clock = clock
    with _timing_lightning(clock):
        fit_quietly(module, callbacks, setting, loader)
    for step in clock.steps:
        # The dispatch timer runs around the monitors' hooks, which have their own part.
        step["callback_dispatch"] -= step["monitor_hooks"]
    return clock.steps


def timed_parts(setting: Setting, runs: int) -> dict[str, dict[str, float]]:
    """Return the seconds per step that ``le_monitors`` adds over ``plain``, per part and in total.

    For each statistic, ``"mean"`` over all timed steps (logging steps included) and ``"median"`` over them, a part's
    figure is the median over ``runs`` of the statistic in ``le_monitors`` minus that in ``plain``. The runs
    alternate between the two variants. The mixin's code and the monitors' hooks are zero in ``plain``. Each timer
    costs a fraction of a microsecond, so the figures are slight overestimates.
    """
    loader = build_loader(setting)
    added: dict[str, dict[str, list[float]]] = {"mean": {}, "median": {}}
    for _ in range(runs):
        plain = timed_parts_of_run("plain", setting, loader)
        deformed = timed_parts_of_run("le_monitors", setting, loader)
        for part in (*PARTS, "total"):
            for name, statistic in (("mean", statistics.fmean), ("median", statistics.median)):
                difference = statistic(_part_series(deformed, part)) - statistic(_part_series(plain, part))
                added[name].setdefault(part, []).append(difference)
    return {name: {part: statistics.median(values) for part, values in parts.items()} for name, parts in added.items()}


def _part_series(steps: list[dict[str, float]], part: str) -> list[float]:
    return [sum(step.values()) if part == "total" else step[part] for step in steps]


# --------------------------------------------------------------------------------------------------------------
# Report


def benchmark(
    setting: Setting, rounds: int, memory: bool = True, sync_check: bool = False, parts_runs: int = 0
) -> dict[str, Any]:
    """Run ``rounds`` rounds of all variants, each round in random order, and return the summary.

    With ``parts_runs`` above zero, also time the added parts directly (:func:`timed_parts`) in that many runs.
    """
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
    if parts_runs > 0:
        summary["parts_runs"] = parts_runs
        summary["added_s_by_part"] = timed_parts(setting, parts_runs)
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
    if "added_s_by_part" in summary:
        lines += ["", *_format_parts(summary["added_s_by_part"], summary["parts_runs"], summary["step_time_s"]["plain"])]
    return "\n".join(lines)


def _format_parts(by_part: dict[str, dict[str, float]], runs: int, plain_step_s: float) -> list[str]:
    mean, median = by_part["mean"], by_part["median"]
    lines = [
        f"le_monitors over plain, each part timed directly (µs/step, median of {runs} "
        f"{'run' if runs == 1 else 'runs'} of each variant):",
        "",
        "| part | mean over all steps | median step |",
        "|---|---|---|",
    ]
    lines += [f"| {text} | {mean[part] * 1e6:+.1f} | {median[part] * 1e6:+.1f} |" for part, text in PARTS.items()]
    lines += [
        f"| total | {mean['total'] * 1e6:+.1f} | {median['total'] * 1e6:+.1f} |",
        "",
        f"total over all steps as a share of plain's median step ({plain_step_s * 1e3:.3f} ms): "
        f"{mean['total'] / plain_step_s * 100:.3f} %",
    ]
    return lines


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
        "--parts-runs",
        type=int,
        default=3,
        help="runs of plain and le_monitors that time each added part directly (0 skips them)",
    )
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
        summary = benchmark(
            setting,
            arguments.rounds,
            memory=not arguments.no_memory,
            sync_check=arguments.sync_check,
            parts_runs=arguments.parts_runs,
        )
        print(format_summary(summary), end="\n\n")
        summaries.append(summary)
    return summaries


if __name__ == "__main__":
    main()
