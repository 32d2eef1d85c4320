"""The non-finite guard: stop (or skip the step) before an optimizer step that a NaN or inf would poison, and
refuse to save NaN or inf weights.

A mixin of :class:`~reca_hf.RecATrainer`, not a callback: a callback cannot skip an optimizer step, and the guard
must act inside the stock loop, where the gradient norm is computed (``_get_grad_norm``).
"""

from __future__ import annotations

import logging

import torch

from .resume import last_complete_checkpoint
from .tasks import TASKS

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or inf loss or gradient norm (``nonfinite_action``). The message names the step, the
    task and a fix; the weights are those of the last good step, and nothing non-finite was saved."""


class NonFiniteWeightsError(RuntimeError):
    """``save_model`` refused to write weights holding NaN or inf; the message names the tensors."""


class NonFiniteGuardMixin:
    """``nonfinite_action`` for a Trainer: task losses flagged on the device in ``compute_loss``
    (:meth:`_flag_nonfinite`), one check per optimizer step, the step skipped or the run stopped. The trainer
    provides ``_totals()`` (the run totals, whose ``nonfinite_skipped_steps`` survive a resume)."""

    def _init_nonfinite_guard(self) -> None:
        self._nonfinite: dict[str, torch.Tensor] = {}  # task -> a non-finite loss since the last optimizer step
        self._skipping_step = False

    def _flag_nonfinite(self, losses: dict[str, torch.Tensor]) -> None:
        """Remember, on the device (no host sync), which task losses were not finite."""
        for task, loss in losses.items():
            bad = ~torch.isfinite(loss.detach()).all()
            self._nonfinite[task] = bad if task not in self._nonfinite else self._nonfinite[task] | bad

    def _get_grad_norm(self, model, grad_norm=None):
        # The stock loop computes the gradient norm right before the optimizer step: the one place to check.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_finite(grad_norm)
        return grad_norm

    def _check_finite(self, grad_norm) -> None:
        """Before each optimizer step: stop, or skip the step, when a task loss since the last step or the
        gradient norm is not finite (``nonfinite_action``)."""
        if self._skipping_step:  # the previous step was skipped: accelerate's flag of a skipped step goes back
            self.optimizer._is_overflow = False
            self._skipping_step = False
        problem = self._nonfinite_problem(grad_norm)
        if problem is None:
            return
        step, args, totals = self.state.global_step + 1, self.args, self._totals()
        fix = (
            f"Fix: lower learning_rate (now {args.learning_rate:g}; try {args.learning_rate / 10:g}), clip gradients "
            f"with max_grad_norm (now {args.max_grad_norm:g}), or train in fp32/bf16 rather than fp16."
        )
        if args.nonfinite_action == "skip" and totals.nonfinite_skipped_steps < args.max_nonfinite_steps:
            totals.nonfinite_skipped_steps += 1
            self._skip_optimizer_step()
            if self.is_world_process_zero():
                logger.warning(
                    "Step %d skipped: %s (nonfinite_action='skip'; %d of at most max_nonfinite_steps=%d skipped). %s",
                    step, problem, totals.nonfinite_skipped_steps, args.max_nonfinite_steps, fix,
                )  # fmt: skip
            return
        reason = "nonfinite_action='stop'"
        if args.nonfinite_action == "skip":
            reason = (f"more than max_nonfinite_steps={args.max_nonfinite_steps} non-finite steps "
                      f"({totals.nonfinite_skipped_steps} skipped before)")  # fmt: skip
        last = last_complete_checkpoint(args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training stopped at step {step} before the optimizer step ({reason}): {problem}. Nothing of this step "
            f"was applied or saved; {kept}. {fix} nonfinite_action='skip' skips such steps instead."
        )

    def _nonfinite_problem(self, grad_norm) -> str | None:
        """What is not finite in this step (None when all is): one host sync per optimizer step, the task flags
        and the norm in one tensor, averaged over the processes so that every rank decides alike."""
        device = self.accelerator.device
        flags = [self._nonfinite.get(task, torch.zeros((), dtype=torch.bool, device=device)) for task in TASKS]
        self._nonfinite.clear()
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=device).detach().float()
        values = torch.stack([*(flag.to(device).float() for flag in flags), (~torch.isfinite(norm)).float(), norm])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        *task_flags, norm_flag, norm_value = values.tolist()
        bad_tasks = [f"{task}_loss" for task, flag in zip(TASKS, task_flags) if flag > 0]
        if bad_tasks:
            return f"{' and '.join(bad_tasks)} not finite (gradient norm {norm_value})"
        return f"the gradient norm is {norm_value} (every task loss was finite)" if norm_flag else None

    def _skip_optimizer_step(self) -> None:
        """Make the coming optimizer step a no-op, reported as skipped: the weights, the optimizer's moments and
        the learning-rate schedule all stay as they are (accelerate's flag for a skipped step, which the stock
        loop and the accelerated scheduler read, as for an fp16 overflow)."""
        optimizer = self.optimizer

        def skipped_step(*args, **kwargs):
            del optimizer.step  # the class's own step again
            optimizer._is_overflow = True

        optimizer.step = skipped_step
        self._skipping_step = True

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        logged = self._globalstep_last_logged
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        if self._globalstep_last_logged != logged:  # a log reset the running loss, but NaN - NaN stays NaN
            tr_loss.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def _check_finite_weights(self) -> None:
        """Refuse to save NaN or inf weights. Each process checks the tensors it holds (one host sync); sharded
        runs (FSDP, DeepSpeed) decide together, since every rank holds other values."""
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        tensors = {name: getattr(t, "to_local", lambda t=t: t)().detach() for name, t in named}  # a DTensor's shard
        tensors = {name: t for name, t in tensors.items() if t.is_floating_point() and t.numel()}
        if not tensors:
            return
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors.values()]).any().float()
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), reduction="sum")
        if not bad.item():
            return
        names = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        raise NonFiniteWeightsError(
            f"save_model refused to write weights with NaN or inf values: {len(names)} of {len(tensors)} tensors "
            f"(on this process){', e.g. ' + ', '.join(names[:5]) if names else ''}. The run diverged: lower "
            f"learning_rate (now {self.args.learning_rate:g}) and keep nonfinite_action='stop' (the default), which "
            "stops before such a step."
        )
