"""Resuming a run: ``resume_from_checkpoint`` ('latest', a folder, True) or ``resume_from_hub`` (the checkpoint a
run pushed) to one folder, and a resumed stream's position.

A mixin of :class:`~reca_hf.RecATrainer`; the trainer's ``train()`` calls :meth:`ResumeMixin._resolve_resume`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .callbacks import StreamPosition
from .config import RESUME_LATEST
from .hub import ADAPTER_FILES, MODEL_FILES

logger = logging.getLogger(__name__)

RESUME_FROM_HUB_DIR = "_resume_from_hub"  # under output_dir; "_*" keeps it out of the output dir's pushes


class ResumeMixin:
    """Where a run resumes from, and where in its data (the trainer provides ``_stream_position`` and
    ``_epochs``, its :class:`StreamPosition` and :class:`~reca_hf.callbacks.PromptEpochCallback`, or None)."""

    def _resolve_resume(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``resume_from_checkpoint`` as the stock Trainer takes it: 'true' / 'latest' (any case) and True become
        the newest checkpoint in output_dir, an error naming the folder when there is none; 'false' is None.
        Without one, ``resume_from_hub`` downloads the pushed checkpoint and resumes from it."""
        if args:
            kwargs["resume_from_checkpoint"], args = args[0], args[1:]
        resume = kwargs.get("resume_from_checkpoint")
        if isinstance(resume, str) and resume.strip().lower() in ("false", "none", ""):
            resume = None
        if resume is True or (isinstance(resume, str) and resume.strip().lower() in RESUME_LATEST):
            output_dir = self.args.output_dir
            resume = last_complete_checkpoint(output_dir)
            if resume is None:
                raise ValueError(
                    f"resume_from_checkpoint={kwargs['resume_from_checkpoint']!r}: {output_dir} holds no checkpoint-N "
                    "folder to resume from (a complete one has its weights and trainer_state.json). Give a checkpoint "
                    "folder's path, or train without resume_from_checkpoint."
                )
        elif isinstance(resume, str) and not Path(resume).is_dir():
            raise ValueError(
                f"resume_from_checkpoint={resume!r}: no such folder. Give a checkpoint folder (e.g. "
                f"{Path(self.args.output_dir) / 'checkpoint-500'}), or 'latest' for the newest one in output_dir."
            )
        if resume is None and self.args.resume_from_hub:
            resume = download_checkpoint(self.args.resume_from_hub, Path(self.args.output_dir) / RESUME_FROM_HUB_DIR,
                                         token=self.args.hub_token, revision=self.args.hub_revision)  # fmt: skip
        kwargs["resume_from_checkpoint"] = resume
        return args, kwargs

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):  # fmt: skip
        """The Trainer's (epochs trained, batches to skip), but for a resumed stream from its saved position: the
        pass it was in and the batches of that pass already trained on (see :class:`StreamPosition`)."""
        epochs, batches = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        saved = (self.state.stateful_callbacks or {}).get(StreamPosition.__name__)
        if self._stream_position is not None:  # restore_callback_states_from_checkpoint may have replaced it
            self._stream_position = next(c for c in self.callback_handler.callbacks if isinstance(c, StreamPosition))
        if self._stream_position is not None and resume_from_checkpoint is not None and isinstance(saved, dict):
            position = saved.get("attributes", {})
            epochs = max(0, int(position.get("epoch", 0)))
            self._stream_position.epoch = epochs - 1  # on_epoch_begin counts the resumed pass again
            if not self.args.ignore_data_skip:
                done = self.state.global_step - int(position.get("epoch_start_step", 0))
                batches = done * self.args.gradient_accumulation_steps
        if self._epochs is not None:
            self._epochs.next_epoch = epochs
        return epochs, batches


CHECKPOINT_WEIGHTS = (*MODEL_FILES, ADAPTER_FILES[0])  # a full model's weights, or a LoRA adapter's


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that holds weights and ``trainer_state.json`` (the
    Trainer writes it last), or None. Newer incomplete ones (a save cut short by a full disk or a kill) are
    passed over with a warning naming them."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    newest_first = sorted(
        (path for path in folder.iterdir() if path.is_dir() and re.fullmatch(r"checkpoint-\d+", path.name)),
        key=lambda path: int(path.name.split("-")[1]),
        reverse=True,
    )
    for index, checkpoint in enumerate(newest_first):
        weights = any((checkpoint / name).is_file() for name in CHECKPOINT_WEIGHTS)
        if weights and (checkpoint / "trainer_state.json").is_file():
            if index:
                logger.warning(
                    "Resuming from %s: the newer %s %s incomplete (no weights or no trainer_state.json, e.g. a save "
                    "cut short by a full disk); delete %s once you no longer need %s.",
                    checkpoint, ", ".join(p.name for p in newest_first[:index]), "is" if index == 1 else "are",
                    "it" if index == 1 else "them", "it" if index == 1 else "them",
                )  # fmt: skip
            return str(checkpoint)
    return None


def download_checkpoint(repo_id: str, folder: str | Path, token: str | None = None, revision: str | None = None) -> str:
    """Download the checkpoint a run pushed to ``repo_id`` (``last-checkpoint/``, else its newest
    ``checkpoint-N/``) into ``folder``; returns the checkpoint folder to resume from."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    folders = {name.split("/", 1)[0] for name in files if "/" in name}
    if "last-checkpoint" in folders:
        name = "last-checkpoint"
    else:
        steps = [f for f in folders if re.fullmatch(r"checkpoint-\d+", f)]
        if not steps:
            raise ValueError(
                f"resume_from_hub={repo_id!r}: the repo holds no last-checkpoint/ or checkpoint-N/ folder. Runs push "
                "one with hub_strategy='checkpoint' (or 'all_checkpoints') and a save_strategy."
            )
        name = max(steps, key=lambda f: int(f.rsplit("-", 1)[1]))
    snapshot_download(repo_id, revision=revision, token=token, local_dir=folder, allow_patterns=[f"{name}/*"])
    checkpoint = Path(folder) / name
    logger.info("Resuming from %s/%s, downloaded into %s", repo_id, name, checkpoint)
    return str(checkpoint)
