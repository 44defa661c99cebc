"""``VDMMixin``: deform the training loss of any LightningModule.

Put the mixin in front of a LightningModule and every loss that its ``training_step`` returns (automatic
optimization) or that it passes to ``manual_backward`` (manual optimization) is replaced by δ(ℓ) before backward, so
the gradient becomes δ'(ℓ)·∇ℓ:

.. code-block:: python

    class MyNet(VDMMixin, MyLightningModule):
        pass

    model = MyNet(deformation="LE(1, 0.99)", **my_module_arguments)

For the latest training batch the mixin keeps the raw loss, the deformed loss and the loss at which δ' was taken,
as detached tensors and without a host synchronisation. The monitors in :mod:`lightning_vdm.callbacks` read them.

Two ways to deform. A loss on an accelerator goes through ``deformation.forward``, and autograd differentiates it.
A loss on the CPU, where reading it costs no synchronisation, is read once: the built-in families compute δ(ℓ) and
δ'(ℓ) in float64 on the host (:meth:`~lightning_vdm.deformations.VerticalDeformation.value_and_derivative`), and
the mixin returns the product ℓ·δ'(ℓ) with its value overwritten by δ(ℓ): one scalar operation with one autograd
node instead of five or more. Both give the gradient δ'(ℓ)·∇ℓ. The second way treats δ'(ℓ) as a constant, so
second derivatives differ (:attr:`VDMMixin.vdm_deform_on_host` turns it off). A deformation of the user's own
without ``value_and_derivative`` takes the first way on the CPU too.

Domain and non-finite losses. A loss outside the deformation's domain, NaN or Inf, cannot be deformed, and neither
can a loss where δ is NaN or Inf. On the CPU, with a built-in family or a deformation that implements
``value_and_derivative``, the error comes at the bad step. Otherwise, to avoid a host synchronisation on every step,
the mixin collects the detached raw losses and checks them together: every ``log_every_n_steps`` losses (one per
step unless gradient accumulation or several ``manual_backward`` calls deform more), at the end of every epoch,
before every checkpoint is written, and at the end of training. The error names the global step, the epoch, the
batch index and the loss value. On an accelerator, training may run up to ``log_every_n_steps - 1`` steps past the
bad one before the error, but no checkpoint is written after it.

With ``nonfinite_loss="skip"`` a NaN or Inf loss instead makes the step a no-op (Lightning skips backward and the
optimizer step when ``training_step`` returns ``None``). That mode reads the loss on every step, which is one host
synchronisation per step on an accelerator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_vdm.deformations import (
    VerticalDeformation,
    _defining_class,
    as_deformation,
    host_formulas_apply,
    parse_deformation,
    promote_loss,
    stack_scalars,
)

__all__ = ["DeformationMismatchError", "VDMMixin", "VDMRecord"]

log = logging.getLogger(__name__)

_NONFINITE_POLICIES = ("error", "skip")
_DERIVATIVE_POINTS = ("local", "global_mean")
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT64_MAX = torch.finfo(torch.float64).max


class DeformationMismatchError(ValueError):
    """Training resumes from a checkpoint that was trained with another deformation or derivative point."""


class VDMRecord(NamedTuple):
    """One deformed loss, kept detached for the monitors."""

    raw: Tensor
    """The loss as the user's step returned it (before Lightning divides it for gradient accumulation)."""
    deformed: Tensor
    """The value that went into backward (before that division), δ(ℓ)."""
    derivative_at: Tensor
    """The loss at which δ' was evaluated: ``raw``, or the mean over processes with ``derivative_at="global_mean"``."""


class _StepState:
    """The mixin's per-step bookkeeping.

    It lives in a plain object because assigning an attribute of an ``nn.Module`` goes through
    ``Module.__setattr__``, which costs microseconds, and these fields change on every step.
    """

    __slots__ = ("records", "records_batch", "pending", "step_ran")

    def __init__(self) -> None:
        self.records: list[VDMRecord] = []
        self.records_batch = -1
        # Per kept loss: (global step, epoch, batch index) or None outside a Trainer, the raw loss, and δ.
        self.pending: list[tuple[tuple[int, int, int] | None, Tensor, Tensor]] = []
        self.step_ran = False


class VDMMixin:
    """Apply a vertical deformation mapping δ to the training loss of a LightningModule.

    Place it before the LightningModule in the bases, ``class MyNet(VDMMixin, MyLightningModule)``, so that its
    ``training_step`` and ``manual_backward`` run first and call the module's own through ``super()``. The mixin's
    arguments are keyword-only; all other arguments go to the next class in the bases, and LightningCLI shows both in
    ``--help``.

    Args:
        deformation: The deformation δ: an instance such as ``LogExp(1, 0.99)``, a string in the paper's notation such
            as ``"LE(1, 0.99)"`` or ``"AP(18/pi, 1, 2, 1)"``, or ``None`` to train on the plain loss. It is saved in
            the hyperparameters (in exact notation for the built-in families), so a checkpoint rebuilds it.
        nonfinite_loss: What to do with a NaN or Inf raw loss. ``"error"`` stops training with an error that names
            the step and the value; ``"skip"`` skips the step, counts it in ``vdm_skipped_steps`` and costs one host
            synchronisation per step. ``"skip"`` is not available under multi-process training, where all processes
            must run backward together.
        derivative_at: Where δ' is evaluated. ``"local"`` deforms each process's own loss, so the averaged gradient
            is the mean of δ'(ℓᵣ)·∇ℓᵣ over processes r. ``"global_mean"`` evaluates δ' at the loss averaged over all
            processes, ℓ̄, so the gradient is δ'(ℓ̄)·mean(∇ℓᵣ), as with one process on the whole batch; it costs one
            scalar all-reduce per step. Both are the same with one process.

    Raises:
        TypeError: When a class is defined with a base before ``VDMMixin`` that defines ``training_step`` or
            ``manual_backward``, so the mixin's would never run. The check runs at class definition, because with
            that order none of the mixin's methods, ``__init__`` included, would run later. Also when a deformation
            is passed as a positional argument, or ``deformation`` is neither a deformation, a string nor ``None``.
        ValueError: If ``nonfinite_loss`` or ``derivative_at`` is not one of the accepted values, or the string
            ``deformation`` is not valid notation.
    """

    vdm_check_resumed_deformation: bool = True
    """Whether ``Trainer.fit(ckpt_path=...)`` raises when the checkpoint used another deformation (see
    :meth:`on_load_checkpoint`). Set it to ``False`` on a model to switch deformations on purpose when resuming."""

    vdm_deform_on_host: bool = True
    """Whether a CPU loss is deformed with the deformation's float formulas (see the module's documentation). Their
    δ'(ℓ) is a constant for autograd, so a second derivative through the deformed loss, as with
    ``loss.backward(create_graph=True)``, leaves out the term δ''(ℓ)·∇ℓ∇ℓᵀ. ``manual_backward`` with
    ``create_graph=True`` takes the autograd path on its own. Set it to ``False`` to differentiate δ with autograd on
    the CPU in every case, as on an accelerator."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_base_order(cls)

    def __init__(
        self,
        *args: Any,
        deformation: VerticalDeformation | str | None = None,
        nonfinite_loss: Literal["error", "skip"] = "error",
        derivative_at: Literal["local", "global_mean"] = "local",
        **kwargs: Any,
    ) -> None:
        if nonfinite_loss not in _NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite_loss` must be one of {_NONFINITE_POLICIES}, got {nonfinite_loss!r}.")
        if derivative_at not in _DERIVATIVE_POINTS:
            raise ValueError(f"`derivative_at` must be one of {_DERIVATIVE_POINTS}, got {derivative_at!r}.")
        _check_no_positional_deformation(type(self).__name__, args)
        resolved = as_deformation(deformation)

        super().__init__(*args, **kwargs)

        self.deformation: VerticalDeformation | None = resolved
        self.nonfinite_loss = nonfinite_loss
        self.derivative_at = derivative_at
        self.vdm_skipped_steps = 0
        self._vdm_state = _StepState()
        self.save_hyperparameters(
            {
                "deformation": _deformation_hparam(resolved),
                "nonfinite_loss": nonfinite_loss,
                "derivative_at": derivative_at,
            }
        )

    # ------------------------------------------------------------------------------------------------------------
    # The training path

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._vdm_state.step_ran = True
        output = super().training_step(*args, **kwargs)
        if not self.automatic_optimization or output is None:
            # Manual optimization deforms inside `manual_backward`. A `None` output makes Lightning skip the step.
            return output
        if isinstance(output, Tensor):
            return self._vdm_deform(output)
        if isinstance(output, Mapping):
            if "loss" not in output:
                raise KeyError(
                    "VDMMixin: the dict returned by `training_step` has no 'loss' key (keys: "
                    f"{sorted(output)}); return the loss under 'loss' so it can be deformed."
                )
            deformed = self._vdm_deform(output["loss"])
            if deformed is None:
                return None
            return {**output, "loss": deformed}
        raise TypeError(
            "VDMMixin: `training_step` must return a loss tensor, a dict with a 'loss' key, or None; "
            f"got {type(output).__name__}."
        )

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        # `Tensor.backward(gradient, retain_graph, create_graph)`: a graph for second derivatives needs δ through
        # autograd, because the CPU path's δ' is a constant.
        create_graph = kwargs.get("create_graph", args[2] if len(args) > 2 else False)
        deformed = self._vdm_deform(loss, on_host=not create_graph)
        if deformed is None:
            log.debug("Skipped backward of a non-finite loss at global step %d.", self.trainer.global_step)
            return
        super().manual_backward(deformed, *args, **kwargs)

    def _vdm_deform(self, loss: Tensor, on_host: bool = True) -> Tensor | None:
        """Return δ(loss) for backward and keep the detached record; ``None`` when the step is skipped.

        ``on_host=False`` keeps a CPU loss off the host path, so that autograd differentiates δ.
        """
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "VDMMixin deforms a scalar loss; got "
                f"{'a tensor of shape ' + str(tuple(loss.shape)) if isinstance(loss, Tensor) else type(loss).__name__}."
                " Reduce the loss to a scalar (for example with .mean()) before returning it."
            )
        raw = loss.detach()
        records = self._vdm_current_records()
        if self.nonfinite_loss == "skip" and not bool(torch.isfinite(raw)):
            self.vdm_skipped_steps += 1
            log.warning(
                "Skipped the training step at global step %d: the loss is %s (skipped %d so far).",
                self.trainer.global_step if self._trainer is not None else -1,
                raw.item(),
                self.vdm_skipped_steps,
            )
            return None

        deformation = self.deformation
        at = raw
        if deformation is None:
            self._vdm_queue_check(raw, raw)
            records.append(VDMRecord(raw, raw, raw))
            return loss
        if self.derivative_at == "global_mean" and self._trainer is not None and self._trainer.world_size > 1:
            deformed, at = self._vdm_deform_at_global_mean(loss, raw)
            detached = deformed.detach()
            self._vdm_queue_check(raw, detached)
        elif (
            raw.device.type == "cpu"
            and on_host
            and self.vdm_deform_on_host
            and (host_result := self._vdm_deform_on_host(loss, raw)) is not None
        ):
            deformed, detached = host_result
        else:
            deformed = deformation.forward(promote_loss(loss))
            detached = deformed.detach()
            self._vdm_queue_check(raw, detached)
        records.append(VDMRecord(raw, detached, at))
        return deformed

    def _vdm_deform_on_host(self, loss: Tensor, raw: Tensor) -> tuple[Tensor, Tensor] | None:
        """Deform a CPU loss with the deformation's float formulas; return δ(loss) and its detached alias.

        Return ``None`` when the deformation has no float formulas. Only CPU losses come here, so ``item()`` reads
        host memory and waits for no device. One scalar multiplication then replaces the five or more operations of
        ``deformation.forward`` and their autograd nodes, each of which costs microseconds (benchmarks/overhead.py).
        A loss outside the domain, NaN or Inf raises here, at its own step, with the error of
        :meth:`vdm_check_losses`.
        """
        deformation = self.deformation
        if not host_formulas_apply(deformation):
            return None
        promoted = promote_loss(loss)
        value = promoted.item()
        try:
            pair = deformation.value_and_derivative(value)
        except (ArithmeticError, ValueError):
            # A formula of the user's own written with `math` raises outside its domain instead of returning NaN.
            # Treating the loss as undefined makes the check below raise the mixin's error, which names the step.
            pair = (math.nan, math.nan)
        if pair is None:
            return None
        deformed_value, slope = _as_value_pair(deformation, value, pair)
        limit = _FLOAT64_MAX if promoted.dtype == torch.float64 else _FLOAT32_MAX
        if not (abs(deformed_value) <= limit and abs(slope) <= limit):
            # The loss is outside the domain or NaN, or δ or δ' exceeds the loss's dtype. Checking now raises at this
            # step for a bad loss or an infinite δ. An infinite δ' alone passes and trains through `forward`, as on a GPU.
            deformed = deformation.forward(promoted)
            detached = deformed.detach()
            self._vdm_queue_check(raw, detached)
            self.vdm_check_losses()
            return deformed, detached
        if slope == 1.0 and deformed_value == value:
            return promoted, raw if promoted is loss else promoted.detach()
        # Backward of the product multiplies the gradient by δ'(ℓ). Overwriting its value with δ(ℓ) is safe because a
        # product with a number saves no tensor for backward, and no other code has a reference to the product yet.
        deformed = promoted * slope
        detached = deformed.detach()
        detached.fill_(deformed_value)
        return deformed, detached

    def _vdm_deform_at_global_mean(self, loss: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Return a loss whose value is δ(ℓ) and whose gradient is δ'(ℓ̄)·∇ℓ, with ℓ̄ the mean over processes."""
        deformation = self.deformation
        loss32 = promote_loss(loss)
        mean_loss = self.trainer.strategy.reduce(promote_loss(raw).clone(), reduce_op="mean")
        slope = deformation.closed_form_derivative(mean_loss)
        # Value: δ(ℓ); gradient: slope·∇ℓ, because the bracket is zero but carries ℓ's graph.
        deformed = deformation.forward(loss32.detach()) + slope * (loss32 - loss32.detach())
        return deformed, mean_loss

    # ------------------------------------------------------------------------------------------------------------
    # Deferred domain checks

    def _vdm_queue_check(self, raw: Tensor, deformed: Tensor) -> None:
        trainer = self._trainer
        if trainer is None:
            # Called outside a Trainer (for example in a unit test): nothing to wait for.
            self._vdm_state.pending.append((None, raw, deformed))
            self.vdm_check_losses()
            return
        pending = self._vdm_state.pending
        where = (trainer.global_step, trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx)
        pending.append((where, raw, deformed))
        # CPU losses that take the tensor path wait too: one check costs tens of µs of tensor operations
        # (benchmarks/overhead.py), which a batched check every `log_every_n_steps` steps amortises.
        if len(pending) >= max(1, trainer.log_every_n_steps):
            self.vdm_check_losses()

    def vdm_check_losses(self) -> None:
        """Check the raw losses kept since the last check against the deformation's domain, and δ at them.

        This reads the losses on the host once for all of them. The mixin calls it on its own; a monitor may call it
        at a logging step, where it synchronises anyway.

        Raises:
            FloatingPointError: If a loss is NaN or Inf, or δ is NaN or Inf at a loss inside the domain.
            ValueError: If a finite loss lies outside the deformation's domain.
        """
        state = self._vdm_state
        if not state.pending:
            return
        pending, state.pending = state.pending, []
        losses = stack_scalars([raw for _, raw, _ in pending])
        deformed = stack_scalars([value for _, _, value in pending])
        deformation = self.deformation
        finite = torch.isfinite(losses)
        inside = finite if deformation is None else deformation.in_domain(losses)
        valid = inside & torch.isfinite(deformed)
        if bool(valid.all()):
            return

        index = int((~valid).nonzero()[0])
        location, value = _location_text(pending[index][0]), losses[index].item()
        if not bool(finite[index]):
            raise FloatingPointError(
                f"The training loss is {value} ({location}). Training stopped before the next "
                "checkpoint. Lower the learning rate or check the data; set `nonfinite_loss='skip'` on the model "
                "to skip such steps instead."
            )
        if not bool(inside[index]):
            raise ValueError(
                f"The training loss {value:.9g} ({location}) lies outside the domain of {deformation!r} "
                f"({_domain_text(deformation)}). Choose a deformation whose domain contains every training loss."
            )
        raise FloatingPointError(
            f"δ(ℓ) is {deformed[index].item()} at the training loss {value:.9g} ({location}), although the loss "
            f"is inside the domain of {deformation!r} ({_domain_text(deformation)}). If δ is undefined there, "
            f"override `in_domain` and `domain` of {type(deformation).__name__}; if it overflows, compute the loss in "
            "float64 or choose other coefficients."
        )

    # ------------------------------------------------------------------------------------------------------------
    # What the monitors read

    @property
    def vdm_records(self) -> list[VDMRecord]:
        """The records of the current training batch: one per deformed loss (several with manual optimization).

        Empty when the batch deformed nothing, for example when ``training_step`` returned ``None``.
        """
        state = self._vdm_state
        if self._vdm_batch_index() != state.records_batch:
            return []
        return state.records

    def _vdm_batch_index(self) -> int:
        """Return a number that changes with every training batch, or -1 outside a Trainer."""
        # `_trainer` rather than the `trainer` property: this runs several times per step and the property checks.
        trainer = self._trainer
        if trainer is None:
            return -1
        return trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def _vdm_current_records(self) -> list[VDMRecord]:
        """Return the record list of the current batch, starting a new one when the batch changed."""
        state = self._vdm_state
        batch = self._vdm_batch_index()
        if batch != state.records_batch or batch == -1:
            state.records = []
            state.records_batch = batch
        return state.records

    def vdm_derivative(self, loss: Tensor) -> Tensor:
        """Return δ'(loss) in float64 without domain checks; ones when there is no deformation.

        float64 gives the slope that the CPU path applied, also within a float32 rounding of the domain's bound, where
        float32 arithmetic loses it. MPS has no float64, so there it is float32.
        """
        loss = promote_loss(loss)
        if loss.device.type != "mps":
            loss = loss.double()
        if self.deformation is None:
            return torch.ones_like(loss)
        return self.deformation.closed_form_derivative(loss)

    # ------------------------------------------------------------------------------------------------------------
    # Lightning hooks (each calls super() so the user's module keeps its own)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.nonfinite_loss == "skip" and self.trainer.world_size > 1:
            raise ValueError(
                "`nonfinite_loss='skip'` cannot be used with "
                f"{self.trainer.world_size} processes: a process that skips its step would leave the others waiting "
                "in the gradient all-reduce. Use `nonfinite_loss='error'`."
            )

    def on_before_backward(self, loss: Tensor) -> None:
        if self.automatic_optimization:
            if not self._vdm_state.step_ran:
                raise RuntimeError(
                    f"VDMMixin.training_step did not run for this batch, so the loss is not deformed. "
                    f"`{type(self).__name__}.training_step` must call `super().training_step(...)`, or the "
                    "LightningModule must come after VDMMixin in the bases."
                )
            self._vdm_state.step_ran = False
        super().on_before_backward(loss)

    def on_train_epoch_end(self) -> None:
        self.vdm_check_losses()
        super().on_train_epoch_end()

    def on_train_end(self) -> None:
        self.vdm_check_losses()
        super().on_train_end()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if not self.automatic_optimization and self._trainer is not None:
            self._vdm_check_manual_backward()
        super().on_before_optimizer_step(optimizer)

    def _vdm_check_manual_backward(self) -> None:
        """Raise when an optimizer steps in a batch in which no loss went through ``manual_backward``."""
        if self._vdm_state.records_batch == self._vdm_batch_index():
            return
        raise RuntimeError(
            f"An optimizer stepped at global step {self.trainer.global_step} although no loss of this batch went "
            f"through `manual_backward`, so the gradient is not deformed. In `{type(self).__name__}.training_step` "
            "call `self.manual_backward(loss)` instead of `loss.backward()`."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.vdm_check_losses()
        checkpoint["vdm"] = {
            "skipped_steps": self.vdm_skipped_steps,
            "deformation": _deformation_notation(self.deformation),
            "derivative_at": self.derivative_at,
        }
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("vdm", {})
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        if fitting and self.vdm_check_resumed_deformation:
            # Resuming with `Trainer.fit(ckpt_path=...)` restores weights but keeps the running model's
            # deformation; `load_from_checkpoint` has no trainer yet and builds the model from the hyperparameters.
            # Validation, test and prediction never deform, so any checkpoint serves them.
            _check_same_deformation(state, checkpoint.get("hyper_parameters", {}), self)
        self.vdm_skipped_steps = state.get("skipped_steps", 0)
        super().on_load_checkpoint(checkpoint)


def _location_text(where: tuple[int, int, int] | None) -> str:
    """Return where a kept loss came from, for the error messages of :meth:`VDMMixin.vdm_check_losses`."""
    if where is None:
        return "outside a Trainer"
    step, epoch, batch = where
    # With gradient accumulation several batches share a global step, so the batch index identifies the batch.
    return f"global step {step}, epoch {epoch}, batch {batch}"


def _domain_text(deformation: VerticalDeformation) -> str:
    """Return the deformation's domain text, or name its ``in_domain`` when a subclass overrides only that."""
    checks = _defining_class(type(deformation), "in_domain")
    describes = _defining_class(type(deformation), "domain")
    if checks is not describes and issubclass(checks, describes):
        return f"the losses that {checks.__name__}.in_domain accepts"
    return deformation.domain


def _as_value_pair(deformation: VerticalDeformation, loss: float, pair: Any) -> tuple[float, float]:
    """Return ``value_and_derivative``'s result as two floats, or raise a TypeError that names the deformation."""
    try:
        value, slope = (float(number) for number in pair)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{type(deformation).__name__}.value_and_derivative({loss!r}) must return two real numbers (δ(ℓ), δ'(ℓ)) "
            f"or None, got {pair!r}."
        ) from error
    return value, slope


def _check_no_positional_deformation(class_name: str, args: tuple[Any, ...]) -> None:
    """Raise if a positional argument is a deformation: it would reach the next class in the bases instead."""
    for argument in args:
        is_deformation = isinstance(argument, VerticalDeformation)
        if isinstance(argument, str):
            try:
                parse_deformation(argument)
                is_deformation = True
            except ValueError:
                pass
        if is_deformation:
            raise TypeError(
                f"{class_name} got the deformation {argument!r} as a positional argument, which would go to the "
                f"LightningModule's own arguments. VDMMixin's arguments are keyword-only: pass "
                f"`deformation={argument!r}`."
            )


def _deformation_notation(deformation: VerticalDeformation | None) -> str | None:
    return None if deformation is None else deformation.notation


def _check_same_deformation(state: Mapping[str, Any], hparams: Mapping[str, Any], model: VDMMixin) -> None:
    """Raise if the checkpoint was trained with another deformation or derivative point than ``model`` uses."""
    if "deformation" in state:
        saved = state["deformation"]
    elif "deformation" in hparams:
        # Checkpoints written before the mixin stored its own entry keep the deformation in the hyperparameters.
        value = hparams["deformation"]
        saved = value.notation if isinstance(value, VerticalDeformation) else value
    else:
        return
    running = _deformation_notation(model.deformation)
    same = saved == running
    if not same and saved is not None and running is not None:
        try:
            same = as_deformation(saved) == model.deformation
        except (TypeError, ValueError):
            same = False
    saved_object = hparams.get("deformation")
    if same and isinstance(saved_object, VerticalDeformation) and isinstance(model.deformation, VerticalDeformation):
        # The notation of a deformation of the user's own shows only plain public attributes, so the pickled object
        # from the hyperparameters is compared attribute by attribute.
        same = _same_attributes(saved_object, model.deformation)
    saved_point = state.get("derivative_at", hparams.get("derivative_at", model.derivative_at))
    if same and saved_point == model.derivative_at:
        return
    differences = ""
    if saved == running and isinstance(saved_object, VerticalDeformation):
        differences = f" The deformations differ in {_attribute_differences(saved_object, model.deformation)}."
    raise DeformationMismatchError(
        f"The checkpoint was trained with deformation={saved!r} and derivative_at={saved_point!r}, but the model "
        f"being resumed uses deformation={running!r} and derivative_at={model.derivative_at!r}.{differences} Build "
        "the model with the checkpoint's values (for example `Model.load_from_checkpoint(path)`, with "
        "`weights_only=False` for a deformation class of your own) before `fit(ckpt_path=...)`, or set "
        "`model.vdm_check_resumed_deformation = False` to continue with the running model's deformation on purpose."
    )


def _attribute_differences(saved: VerticalDeformation, running: VerticalDeformation) -> str:
    """Return the attributes whose values differ between two deformations of one class, with both values."""
    saved_attributes, running_attributes = vars(saved), vars(running)
    parts = []
    for name in sorted(saved_attributes.keys() | running_attributes.keys()):
        before, now = saved_attributes.get(name), running_attributes.get(name)
        try:
            equal = bool(before == now)
        except (RuntimeError, TypeError, ValueError):
            equal = False
        if not equal:
            parts.append(f"`{name}`: {before!r} in the checkpoint, {now!r} now")
    return "; ".join(parts) or "attributes that do not compare equal"


def _same_attributes(first: VerticalDeformation, second: VerticalDeformation) -> bool:
    """Return whether two deformations have the same class and equal attributes (True when they cannot be compared)."""
    if type(first) is not type(second):
        return False
    try:
        return bool(vars(first) == vars(second))
    except (RuntimeError, TypeError, ValueError):
        # Attributes such as tensors do not compare to one bool; the notation already matched.
        return True


def _deformation_hparam(deformation: VerticalDeformation | None) -> VerticalDeformation | str | None:
    """Return what the hyperparameters keep: exact notation when it rebuilds an equal deformation."""
    if deformation is None:
        return None
    try:
        if parse_deformation(deformation.notation) == deformation:
            return deformation.notation
    except ValueError:
        pass
    return deformation


def _check_base_order(cls: type) -> None:
    """Raise if a class that comes before ``VDMMixin`` in the MRO defines a method that the mixin wraps."""
    for base in cls.__mro__:
        if base is VDMMixin:
            return
        if issubclass(base, VDMMixin):
            # A subclass of the combined class may override and call super(); a hook checks that at run time.
            continue
        for name in ("training_step", "manual_backward"):
            if name in vars(base):
                raise TypeError(
                    f"{cls.__name__}: `{base.__name__}.{name}` comes before `VDMMixin.{name}` in the method "
                    f"resolution order, so the loss would never be deformed. Put VDMMixin first in the bases: "
                    f"`class {cls.__name__}(VDMMixin, {base.__name__})`."
                )
