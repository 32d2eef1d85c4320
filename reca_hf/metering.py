"""Per-task metering of a RecA run: task losses, sample counts, skipped bad images, the global token shares (captions,
and token-weighted reconstruction losses), and FLOPs with the model FLOPs utilisation.

A mixin of :class:`~reca_hf.RecATrainer`. Losses and counts stay on the device and the host during steps and are
gathered over the processes at log and checkpoint time (:meth:`TaskMeteringMixin._flush_task_losses`), so a step
never waits for the device.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import gather_object

from .adapters.base import UMMAdapter
from .adapters.helpers import IGNORE_INDEX, unwrap_model
from .callbacks import RunTotals
from .flops import FlopCounter, resolve_peak_flops
from .tasks import IMAGE_TO_TEXT, RECONSTRUCTION, TASKS, EvalTasksDataset


class TaskMeteringMixin:
    """Metering for a Trainer whose ``compute_loss`` reports each step's task losses (:meth:`_record_task_losses`)
    and skipped images (:meth:`_count_skipped`); it needs ``adapter``, ``task_ratios`` and the Trainer's own
    ``accelerator``, ``args``, ``model`` and ``callback_handler``."""

    def _init_metering(self) -> None:
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}  # name -> [(sum, count)]
        self.run_totals = RunTotals(dict.fromkeys(TASKS, 0))  # samples per task, wall time: saved in checkpoints
        self.add_callback(self.run_totals)
        self._pending_losses = {"train": [], "eval": []}  # per step: (device loss sums per task, host counts)
        self._pending_skipped: list[dict[str, list[int]]] = []  # per step, with several processes: bad rows found
        self.flop_counter = FlopCounter().attach(unwrap_model(self.model))
        self.task_flos = dict.fromkeys(TASKS, 0)  # FLOPs of the training steps per task (this process)
        self._step_flos = self._window_flos = 0
        self._window_start = time.time()
        self.peak_flops_per_second = resolve_peak_flops(self.args)

    def _logged_metrics(self, mode: str) -> dict[str, float]:
        """The task losses gathered since the last log, each the mean over its samples (``eval_`` names in eval)."""
        self._flush_task_losses(mode)
        metrics = {
            name: sum(total for total, _ in pairs) / sum(count for _, count in pairs)
            for name, pairs in self._metrics[mode].items()
            if pairs
        }
        self._metrics[mode].clear()
        return {f"eval_{name}": value for name, value in metrics.items()} if mode == "eval" else metrics

    def _count_skipped(self, skipped: dict[str, list[int]] | None) -> None:
        """Add a batch's bad rows (found by the collator, in whichever worker made the batch) to the run's
        :attr:`skipped_rows`, each distinct row once. Host objects: one process adds them at once; several keep
        them until the next :meth:`_flush_task_losses` gathers them from every process (no device read in the
        step)."""
        if self.accelerator.num_processes > 1:
            self._pending_skipped.append(dict(skipped or {}))
        else:
            self._add_skipped(skipped or {})

    def _add_skipped(self, skipped: dict[str, list[int]]) -> None:
        totals = self._totals()
        for name, rows in skipped.items():
            totals.add_skipped(name, rows)

    @property
    def skipped_rows(self) -> dict[str, int]:
        """Bad images skipped per dataset (``bad_image_policy: skip``), over all processes, dataloader workers and
        the resumed parts of the run."""
        return self._totals().skipped_rows

    def skipped_summary(self) -> str | None:
        """``"train 2, i2t 1"``: the bad images skipped so far per dataset (None when none were)."""
        if not self.skipped_rows:
            return None
        return ", ".join(f"{name} {count:,}" for name, count in sorted(self.skipped_rows.items()))

    def _caption_token_share(self, batches, mode: str) -> tuple[torch.Tensor, torch.Tensor | float] | None:
        """Make the image-to-text loss of a multi-process step the mean over all processes' answer tokens, as one
        process training on the whole global batch computes it (what transformers does with num_items_in_batch).

        Each process's caption loss is a mean over its own answer tokens; the processes' token counts differ, so
        averaging their gradients weighs tokens unequally. Returns ``(share, factor)``: this process's loss times
        ``share`` (its tokens per sample over the global tokens per sample) is what it logs, and, times ``factor``
        as well, what it trains on (1 for ``task_loss_reduction="sample_mean"``, whose task weights are the
        process's own sample shares; world size x the process's share of the samples for the others). None in a
        single process, when no process trains image-to-text, or on a process without captions in this batch.
        One gather per step on every process, and no host-device sync (the counts stay on the device); with
        gradient accumulation each micro-batch is normalised by its own global token count."""
        if self.accelerator.num_processes == 1 or not self._captions_active(mode):
            return None
        device = self.accelerator.device
        batch = batches.get(IMAGE_TO_TEXT)
        labels = batch.get("labels") if batch else None
        samples = self.adapter.batch_size(batch) if labels is not None else 0
        tokens = (
            (labels[:, 1:] != IGNORE_INDEX).sum().float().to(device)  # the positions answer_loss scores
            if labels is not None
            else torch.zeros((), device=device)
        )
        return self._token_share(samples, tokens)

    def _loss_token_share(self, batches, mode: str) -> tuple[torch.Tensor, torch.Tensor | float] | None:
        """The same for a reconstruction loss that is a mean over items rather than samples (an adapter whose
        :meth:`~reca_hf.adapters.UMMAdapter.loss_tokens` says how many: BAGEL's VAE tokens), so that a
        multi-process step's loss is the mean over all processes' items, as BAGEL's authors divide by the global
        token count. None in a single process or for a per-sample loss; else every process gathers every step."""
        adapter = self.adapter
        if self.accelerator.num_processes == 1 or type(adapter).loss_tokens is UMMAdapter.loss_tokens:
            return None
        batch = batches.get(RECONSTRUCTION)
        samples = adapter.batch_size(batch) if batch else 0
        tokens = float(adapter.loss_tokens(batch)) if batch else 0.0
        return self._token_share(samples, torch.tensor(tokens, device=self.accelerator.device))

    def _token_share(self, samples: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float] | None:
        """``(share, factor)`` of a loss that is a mean over this process's ``tokens`` (see
        :meth:`_caption_token_share`); gathers the counts of every process."""
        device = self.accelerator.device
        local = torch.stack([torch.tensor(float(samples), device=device), tokens.float()])
        all_samples, all_tokens = self.accelerator.gather(local[None]).sum(0).unbind()
        if not samples:
            return None
        share = (tokens / samples) * (all_samples / all_tokens.clamp(min=1))
        if self.args.task_loss_reduction == "sample_mean":
            return share, 1.0
        return share, self.accelerator.num_processes * samples / all_samples

    def _captions_active(self, mode: str) -> bool:
        """Whether any process may score captions this step (the same answer on all: the collectives match)."""
        if self.task_ratios[IMAGE_TO_TEXT] > 0:
            return True
        return (
            mode == "eval"
            and isinstance(self.eval_dataset, EvalTasksDataset)
            and (IMAGE_TO_TEXT in self.eval_dataset.tasks)
        )

    def _record_task_losses(self, mode: str, losses: dict[str, torch.Tensor], batches) -> None:
        """Keep this step's per-task loss sums on the device and their sample counts on the host: nothing is read
        off the device (no host-device sync) until :meth:`_flush_task_losses`, at the next log or checkpoint."""
        device = self.accelerator.device
        sizes = [self.adapter.batch_size(batches[task]) if task in losses else 0 for task in TASKS]
        sums = [losses[task].detach().float().to(device) * size if task in losses else torch.zeros((), device=device)
                for task, size in zip(TASKS, sizes)]  # fmt: skip
        self._pending_losses[mode].append((torch.stack(sums), sizes))

    def _flush_task_losses(self, mode: str) -> None:
        """Gather the pending steps' task losses of every process (one collective for all of them, so every process
        must call it at the same points: log() and checkpoints) into the metrics and ``task_counts``."""
        device = self.accelerator.device
        skipped, self._pending_skipped = self._pending_skipped, []
        if skipped:  # several processes (each appends every step, so all gather): their bad rows since the last flush
            for found in gather_object(skipped):
                self._add_skipped(found)
        pending, self._pending_losses[mode] = self._pending_losses[mode], []
        if not pending:
            return
        sums = torch.stack([step_sums for step_sums, _ in pending])  # (steps, tasks)
        counts = torch.tensor([sizes for _, sizes in pending], dtype=torch.float32, device=device)
        pairs = torch.stack([sums, counts], dim=-1)  # (steps, tasks, 2)
        gathered = self.accelerator.gather(pairs).view(-1, *pairs.shape).sum(0)  # summed over processes
        for step in gathered.tolist():
            for task, (total, count) in zip(TASKS, step):
                if count:
                    self._metrics[mode][f"{task}_loss"].append((total, count))
                if mode == "train":
                    self.task_counts[task] += int(count)

    @property
    def task_counts(self) -> dict[str, int]:
        """Training samples seen per task, over all processes and every resumed part of the run."""
        return self._totals().task_counts

    def _totals(self) -> RunTotals:
        # restore_callback_states_from_checkpoint=True replaces the callback by a new instance: look it up
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RunTotals):
                return callback
        return self.run_totals

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The FLOPs of the training step just run (the Trainer asks after each one, for ``total_flos``): every
        task's forward through trained and frozen modules and the backward autograd runs, as
        :class:`reca_hf.flops.FlopCounter` counted them (per task in ``task_flos``), instead of transformers'
        ``6 x parameters x input_ids``."""
        flops, self._step_flos = self._step_flos, 0
        self._window_flos += flops
        return flops

    def _throughput(self) -> dict[str, float]:
        """``mfu`` since the last training log: this process's counted FLOPs per second over its accelerator's peak
        (``peak_flops_per_second``); nothing without a known peak."""
        now = time.time()
        elapsed, flops = now - self._window_start, self._window_flos
        self._window_start, self._window_flos = now, 0
        if self.peak_flops_per_second is None or elapsed <= 0 or flops == 0:
            return {}
        return {"mfu": flops / elapsed / self.peak_flops_per_second}
