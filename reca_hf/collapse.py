"""Collapse detection while training: the condition-swap probes (token and loss) and :class:`CollapseDetector`,
which stops a RecA run that copies its condition instead of reconstructing from it."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from .adapters.base import UMMAdapter
from .adapters.helpers import cached_key, eval_mode
from .adapters.targets import LossNoise
from .config import COLLAPSE_ACTIONS
from .data import first_good_images, synthetic_shapes
from .images import ViewSpec, load_image
from .sharding import ShardedForward, from_rank_zero

# The detector's messages keep the logger name they had inside reca_hf.callbacks (filters and tests select it).
logger = logging.getLogger("reca_hf.callbacks")

DETECTOR_ACTIONS = tuple(action for action in COLLAPSE_ACTIONS if action != "off")  # "off" means no detector
DERIVED_PROBE_FACTOR = 2  # a derived condition is probed this many times as often
PROBE_SEED = 20250909  # synthetic probe images: a seed no training set of synthetic shapes uses by default


def has_target_logits(adapter: UMMAdapter) -> bool:
    """Whether the adapter exposes teacher-forced token logits (the token swap probe needs them)."""
    return type(adapter).target_logits is not UMMAdapter.target_logits


PLATEAU_RATIO = 0.25  # loss signal: the logged loss falls below this fraction of its earlier plateau...
FLOOR_RATIO = 0.1  # ...or below this fraction of the uniform-guess loss, ln(codebook size)
COPY_THRESHOLD = 0.5  # probe signal: at least this share of the predictions follows the swapped-in condition
# Loss-probe signal: the own-condition loss at most a fifth of the swapped one. Calibrated on the tiny flow UMM
# (`benchmarks/bottleneck_ablation.py --kind flow`, three seeds): a model copying the target's own latents reads
# 0.93-0.97 once its loss has fallen (the detector's loss signal); one reading a resized, blurred or another
# image's condition at most 0.29, and a model reconstructing from the condition's meaning 0.5-0.65 (the tiny
# OpenUni demo, 300-600 steps). 0.8 sits between, with 0.15 to spare on the meaning side.
GAIN_THRESHOLD = 0.8
_PLATEAU_WINDOW = 3  # the plateau is the highest median of this many consecutive logged losses


def _own_and_swapped(adapter: UMMAdapter, model, conditions: list, targets: list, instruction: str) -> tuple:
    """The probe's two batches: each image with its own condition, and with the next image's (cyclically), and the
    partner of each row. The frozen towers' outputs (:meth:`UMMAdapter.frozen_features`) are computed once and
    passed precomputed to both passes, those of the condition view (``condition_*``) permuted for the swap; an
    adapter without them has its swapped batch prepared from the swapped views."""
    device = next(model.parameters()).device
    partner = [(i + 1) % len(conditions) for i in range(len(conditions))]

    def prepared(views: list) -> dict:
        batch = adapter.prepare(views, targets, [instruction] * len(targets))
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    own = prepared(conditions)
    frozen = getattr(adapter, "frozen_features", None)
    features = frozen(model, own) if frozen is not None else {}
    condition = {cached_key(name): value for name, value in features.items() if name.startswith("condition")}
    target = {cached_key(name): value for name, value in features.items() if not name.startswith("condition")}
    if not condition:
        return {**own, **target}, {**prepared([conditions[j] for j in partner]), **target}, partner
    own = {**own, **condition, **target}
    rows = {**condition, "condition_pixel_values": own["condition_pixel_values"]}
    # A list holds one entry per row (views of different sizes, the keep fit), a tensor one row per sample
    swapped = {key: [value[j] for j in partner] if isinstance(value, list) else value[partner]
               for key, value in rows.items()}  # fmt: skip
    return own, {**own, **swapped}, partner


@torch.no_grad()
def swap_probe(adapter: UMMAdapter, model, images: list, views: ViewSpec, instruction: str | None = None):
    """The condition-swap probe: does the model reconstruct its target, or copy its condition?

    Image ``j = i + 1`` (cyclically) lends its condition view to image ``i``, whose target stays
    teacher-forced. Where the two images' target tokens differ, the argmax predictions are counted as
    following ``j`` (``swap_copy_rate``: the model copies whatever condition it gets) or ``i``
    (``swap_target_rate``: it predicts from the target's own prefix). Returns both rates and the
    teacher-forced accuracy with the right conditions (``own_accuracy``).
    """
    pictures = [load_image(image) for image in images]
    if len(pictures) < 2:
        raise ValueError("the condition-swap probe needs at least two images")
    instruction = instruction if instruction is not None else getattr(adapter, "default_instruction", "")
    conditions = [views.condition_view(p) for p in pictures]
    targets = [views.target_view(p) for p in pictures]
    with eval_mode(model):
        own, swapped, partner = _own_and_swapped(adapter, model, conditions, targets, instruction)
        own_logits, codes = adapter.target_logits(model, own)
        swapped_logits, _ = adapter.target_logits(model, swapped)
    own_predictions, swapped_predictions = own_logits.argmax(-1), swapped_logits.argmax(-1)
    partner_codes = codes[partner]
    differ = codes != partner_codes
    counted = max(int(differ.sum()), 1)
    return {
        "swap_copy_rate": float(((swapped_predictions == partner_codes) & differ).sum()) / counted,
        "swap_target_rate": float(((swapped_predictions == codes) & differ).sum()) / counted,
        "own_accuracy": float((own_predictions == codes).float().mean()),
    }


PROBE_NOISE = LossNoise(seed=0, timesteps=(0.5, 0.75, 0.9))  # mid and high noise: x_t alone hides the target


@torch.no_grad()
def condition_swap_loss(
    adapter: UMMAdapter, model, images: list, views: ViewSpec, noise: LossNoise | None = None
) -> dict[str, float]:
    """The loss-based condition-swap probe, for every kind of generation target.

    Each image's target is scored twice under identical noise (the same seed, noise levels and masks): once
    with its own condition, once with the next image's (cyclically). ``condition_gain = 1 - own / swapped``:
    near 0 the condition is ignored, near 1 it determines the target. A model that copies its condition
    drives its own loss toward 0 (for flow and epsilon targets at every noise level above 0), so its gain
    approaches 1. Each of ``noise.timesteps`` (default 0.5, 0.75, 0.9: where the noisy input alone does not
    reveal the target) is scored separately and the losses are summed. Forward passes only, so every rank of
    a sharded run can take part with the same images.
    """
    noise = noise or PROBE_NOISE
    pictures = [load_image(image) for image in images]
    if len(pictures) < 2:
        raise ValueError("the condition-swap probe needs at least two images")
    instruction = getattr(adapter, "default_instruction", "")
    conditions = [views.condition_view(p) for p in pictures]
    targets = [views.target_view(p) for p in pictures]
    levels = noise.timesteps or (None,)
    own = other = 0.0
    with eval_mode(model):
        own_batch, other_batch, _ = _own_and_swapped(adapter, model, conditions, targets, instruction)
        for level in levels:
            fixed = LossNoise(noise.seed, timesteps=None if level is None else (level,), mask_ratio=noise.mask_ratio)
            own += float(adapter.loss(model, own_batch, reduction="none", noise=fixed).float().mean())
            other += float(adapter.loss(model, other_batch, reduction="none", noise=fixed).float().mean())
    own, other = own / len(levels), other / len(levels)
    return {"condition_gain": 1.0 - own / other if other > 0 else 0.0, "swap_own_loss": own, "swap_other_loss": other}


class CollapseDetector(TrainerCallback):
    """Detects the copy-and-paste collapse of RecA while training (on by default in `RecATrainer`).

    A falling loss alone is ambiguous: a model that memorises a small dataset drives it down too. So two
    signals must agree:

    * **loss**: a logged ``reconstruction_loss`` below ``plateau_ratio`` (0.25) times its earlier plateau
      (the highest median of three consecutive logged losses so far), or below ``floor_ratio`` (0.1) times
      a reference: the uniform-guess loss ``ln(codebook size)`` for token targets, the first logged loss
      for continuous (diffusion, flow) targets;
    * **condition-swap probe** on a few held-out images, every ``probe_steps`` steps and at the first log
      where the loss signal appears. Token targets (adapters with ``target_logits``) use :func:`swap_probe`:
      at least ``copy_threshold`` (0.5) of the predictions follow the swapped-in condition, and more of them
      than follow the target. Every other target uses :func:`condition_swap_loss`: a ``condition_gain`` of
      at least ``gain_threshold``. A memorising model has nothing to copy on images it has never seen; a
      copying one copies them all.

    Logged with the next training log: the token probe's ``collapse_score`` (0 healthy .. 1 copying: the copy
    rate), ``swap_copy_rate`` and ``swap_target_rate``; the loss probe's ``condition_gain`` (how much the model
    uses its condition, which RecA raises; also logged as ``collapse_score``, its older name, for dashboards that
    read it), ``swap_own_loss`` and ``swap_other_loss``. On
    detection it logs a warning naming the cause and the fix; with ``action="stop"`` it also saves a checkpoint
    and ends training.

    In a multi-process run rank 0 probes and every rank acts on its reading (they stop at the same step); under
    FSDP and DeepSpeed, where no rank holds the whole model, every rank runs the probe (forward passes only) on
    the same images through ``sharded_forward``, which `RecATrainer` sets.

    Args:
        adapter, views, probe_images: what the default probe runs on (``views`` as the collator's).
        action: "warn" or "stop".
        probe: a replacement probe, ``probe(model) -> dict`` with either the token readings or
            ``condition_gain``.
        uniform_loss: the loss signal's reference; by default ``ln(codebook size)`` for token targets.
    """

    def __init__(
        self,
        adapter: UMMAdapter | None = None,
        views: ViewSpec | None = None,
        probe_images: list | None = None,
        action: str = "warn",
        probe_steps: int = 200,
        plateau_ratio: float = PLATEAU_RATIO,
        floor_ratio: float = FLOOR_RATIO,
        copy_threshold: float = COPY_THRESHOLD,
        probe=None,
        uniform_loss: float | None = None,
        gain_threshold: float = GAIN_THRESHOLD,
    ):
        if action not in DETECTOR_ACTIONS:
            raise ValueError(f"CollapseDetector action={action!r}: choose {' or '.join(map(repr, DETECTOR_ACTIONS))}")
        self._probe_needs_model = probe is None
        if probe is None:
            if adapter is None or views is None or not probe_images or len(probe_images) < 2:
                raise ValueError("CollapseDetector needs a probe, or an adapter, views and two or more probe_images")
            probe_images = [load_image(image) for image in probe_images]
            function = swap_probe if has_target_logits(adapter) else condition_swap_loss
            probe = lambda model: function(adapter, model, probe_images, views)  # noqa: E731
        codebook = adapter.generation_target.codebook_size if adapter is not None else None
        if uniform_loss is None and codebook:
            uniform_loss = math.log(codebook)
        self.probe = probe
        self.action = action
        self.probe_steps = probe_steps
        self.plateau_ratio = plateau_ratio
        self.floor_ratio = floor_ratio
        self.copy_threshold = copy_threshold
        self.gain_threshold = gain_threshold
        self.uniform_loss = uniform_loss
        self.losses: list[tuple[int, float]] = []
        self.plateau: float | None = None
        self.loss_signal = False
        self.history: list[dict[str, float]] = []  # one entry per probe run, with its step
        self.fired_at_step: int | None = None
        self._probe_due = False
        self._pending: dict[str, float] = {}
        self._warned_no_model = False
        # Set by RecATrainer under FSDP and DeepSpeed: runs probe(model) on every rank with whole parameters.
        self.sharded_forward: ShardedForward | None = None

    @classmethod
    def for_run(cls, args, adapter: UMMAdapter, views: ViewSpec, eval_dataset=None) -> CollapseDetector | None:
        """The detector a :class:`~reca_hf.RecAConfig` asks for (None when ``collapse_action`` or
        ``collapse_probe_images`` turn it off): it probes the first eval images, or synthetic shapes the model has
        never seen without an eval set, every ``collapse_probe_steps`` steps (twice as often for a derived
        condition)."""
        if args.collapse_action == "off":
            return None
        if args.collapse_probe_images == 0:  # the documented way to turn the probe off, as collapse_action='off'
            logger.info("Collapse detector off: collapse_probe_images=0.")
            return None
        if args.collapse_probe_images < 2:
            logger.warning(
                "Collapse detector off: collapse_probe_images=%d, and the condition-swap probe needs at least two "
                "images (one lends its condition to another). Set collapse_probe_images to 2 or more (default 8), or "
                "collapse_action='off' to turn the detector off on purpose.",
                args.collapse_probe_images,
            )
            return None
        count = args.collapse_probe_images
        if eval_dataset is not None and not isinstance(eval_dataset, torch.utils.data.IterableDataset):
            images = first_good_images(eval_dataset, args.image_columns["eval"], count, "eval", args)
        else:
            images = []
        if len(images) < 2:  # no held-out images: shapes this model has never seen
            images = synthetic_shapes(count, size=views.generation_resolution, seed=PROBE_SEED)["image"]
        probe_steps = args.collapse_probe_steps
        if adapter.condition_relation == "derived":  # copyable by learning: probe twice as often
            probe_steps = max(1, probe_steps // DERIVED_PROBE_FACTOR)
        return cls(adapter, views, images, action=args.collapse_action, probe_steps=probe_steps)

    # ---- the rule, as plain functions of what was observed ----

    def observe_loss(self, step: int, loss: float) -> bool:
        """Record a logged reconstruction loss; returns whether the loss signal is on."""
        self.losses.append((step, float(loss)))
        recent = sorted(value for _, value in self.losses[-_PLATEAU_WINDOW:])
        if len(recent) == _PLATEAU_WINDOW:
            median = recent[_PLATEAU_WINDOW // 2]
            self.plateau = median if self.plateau is None else max(self.plateau, median)
        reference = self.uniform_loss if self.uniform_loss is not None else self.losses[0][1]
        below_plateau = self.plateau is not None and loss < self.plateau_ratio * self.plateau
        below_floor = loss < self.floor_ratio * reference
        signal = bool(below_plateau or below_floor)
        if signal and not self.loss_signal:
            self._probe_due = True  # probe at once rather than waiting for the next scheduled probe
        self.loss_signal = signal
        return signal

    def observe_probe(self, step: int, result: dict[str, float]) -> bool:
        """Record a probe result; returns whether collapse is detected (both signals agree)."""
        if "condition_gain" in result:
            gain = float(result["condition_gain"])
            # Named for what it measures (RecA raises it); collapse_score, its 0.x name (max(gain, 0)), is still logged
            # for the dashboards and scripts that read it, but the plot and the card show condition_gain.
            metrics = {"collapse_score": max(gain, 0.0), **{k: float(v) for k, v in result.items()}}
            copying = gain >= self.gain_threshold
        else:
            copy_rate, target_rate = float(result["swap_copy_rate"]), float(result["swap_target_rate"])
            metrics = {"collapse_score": copy_rate, "swap_copy_rate": copy_rate, "swap_target_rate": target_rate}
            copying = copy_rate >= self.copy_threshold and copy_rate > target_rate
        self.history.append({"step": step, **metrics, "loss_signal": float(self.loss_signal)})
        self._pending.update(metrics)
        detected = self.loss_signal and copying
        if detected and self.fired_at_step is None:
            self.fired_at_step = step
        return detected

    def describe(self) -> dict[str, Any] | None:
        """What the probe's readings are, for the probe plot and the card: the logged metric, its plot label, the
        threshold at which it reads as copying, and what it measures in words (None before the first probe)."""
        if not self.history:
            return None
        if "condition_gain" in self.history[-1]:
            return {"metric": "condition_gain", "label": "condition_gain: use of the condition (RecA raises it)",
                    "threshold": self.gain_threshold, "fired_at_step": self.fired_at_step,
                    "meaning": "condition_gain: how much lower the reconstruction loss is with each image's own "
                    "condition than with another image's. It rises as the model learns to use its condition, which "
                    "is what RecA trains; it signals copying only near 1 and together with a collapsing loss."}  # fmt: skip
        return {"metric": "swap_copy_rate", "label": "swap_copy_rate: share copying a swapped-in condition",
                "threshold": self.copy_threshold, "fired_at_step": self.fired_at_step,
                "meaning": "swap_copy_rate: the share of the predicted image tokens that follow another image's "
                "condition swapped in, instead of the image being reconstructed. A model that copies its condition "
                "follows the swap; one that reconstructs from its understanding does not."}  # fmt: skip

    def verdict(self) -> str:
        """What the detector concluded, in words (the card's "collapse detector" line)."""
        if not self.history:
            return "on; no probe had run yet"
        last = self.history[-1]
        if "condition_gain" in last:
            reading = (f"condition_gain {last['condition_gain']:.2f} (how much lower the loss is with the image's own "
                       f"condition than with another's; copying reads at least {self.gain_threshold})")  # fmt: skip
        else:
            reading = (f"{last['swap_copy_rate']:.0%} of the predictions followed a swapped-in condition (copying: at "
                       f"least {self.copy_threshold:.0%})")  # fmt: skip
        if self.fired_at_step is not None:
            return (f"fired at step {self.fired_at_step}: the loss collapsed and the probe found the model copying its "
                    f"condition; last probe (step {last['step']}): {reading}")  # fmt: skip
        return (f"did not fire: {len(self.history)} probes, none with both signals (a collapsing loss and a copying "
                f"probe); last probe (step {last['step']}): {reading}")  # fmt: skip

    def pop_metrics(self) -> dict[str, float]:
        """The probe metrics not yet logged (the trainer adds them to its next training log)."""
        metrics, self._pending = self._pending, {}
        return metrics

    # ---- Trainer events ----

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reconstruction_loss" in logs:
            self.observe_loss(state.global_step, logs["reconstruction_loss"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (self._probe_due or state.global_step % self.probe_steps == 0):
            return
        if model is None and self._probe_needs_model and self.sharded_forward is None:
            if not self._warned_no_model:
                logger.warning(
                    "Collapse probe skipped at step %d: the trainer passed its callbacks no model to probe; the "
                    "detector watches nothing until it does. Pass probe= (a function of nothing but the model you "
                    "hold) to CollapseDetector, or use RecATrainer.",
                    state.global_step,
                )
                self._warned_no_model = True
            return
        self._probe_due = False
        first = self.fired_at_step is None
        # Sharded (FSDP, DeepSpeed): every rank probes together through sharded_forward. Otherwise rank 0 probes
        # alone. Either way every rank acts on rank 0's reading, so that all stop at the same step.
        if self.sharded_forward is not None:
            reading = self.sharded_forward(self.probe)
        else:
            reading = self.probe(model) if state.is_world_process_zero else None
        detected = self.observe_probe(state.global_step, from_rank_zero(reading))  # logged with the next log
        if not detected:
            return
        if first and state.is_world_process_zero:
            logger.warning(
                "RecA collapse detected at step %d: the reconstruction loss fell to %.3g (plateau %.3g), and %s: "
                "it copies its condition instead of understanding it. Cause: the condition view carries the target "
                "(same representation, no information bottleneck). Fix: lower condition_resolution (e.g. 'auto', "
                "at most half the generation resolution) with condition_bottleneck='resize', or use "
                "condition_bottleneck='blur'; do not set allow_shortcut.%s",
                state.global_step,
                self.losses[-1][1] if self.losses else float("nan"),
                self.plateau or float("nan"),
                self._evidence(self.history[-1]),
                " Stopping after a checkpoint (collapse_action='stop')." if self.action == "stop" else "",
            )
        if self.action == "stop":
            control.should_save = True
            control.should_training_stop = True

    @staticmethod
    def _evidence(reading: dict[str, float]) -> str:
        if "swap_copy_rate" in reading:
            return (
                f"given another image's condition the model predicts that image's tokens "
                f"{100 * reading['swap_copy_rate']:.0f}% of the time"
            )
        return (
            f"its loss with the image's own condition is {100 * reading['condition_gain']:.0f}% lower than with "
            "another image's (condition_gain)"
        )
