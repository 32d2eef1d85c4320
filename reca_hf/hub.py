"""The Hub side of a RecA run: run metadata and model cards on disk, background-push bookkeeping, `reca push` and
`reca card`.

A run's card is rendered from plain files, never from live objects: ``reca_run.json`` (written beside every card:
the settings, the parameter table, the adapter kind, the base model, user-supplied evaluation results) and
``trainer_state.json`` (the logged losses, drawn into ``training_loss.png``). So ``reca card OUTPUT_DIR`` renders the
same card the trainer wrote, without loading any weights.

The stock Trainer pushes checkpoints in the background (``upload_folder(run_as_future=True)``) and never reads the
futures' exceptions. :class:`PushTracker` attaches a done-callback to each of them: a failure is logged at once and
counted, and the checkpoint folder stays in :attr:`PushTracker.unpushed`, which checkpoint rotation never deletes and
the final push retries. :class:`HubResilienceMixin` puts that (and ``hub_optional``) into a Trainer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import threading
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from transformers.trainer_utils import HubStrategy

from .adapters.targets import TOKEN_KINDS
from .callbacks import GRID_FILE, TEXT_TO_IMAGE_FILE
from .cards import EVAL_RESULTS_FOLDER, eval_result_files, render_model_card

logger = logging.getLogger(__name__)

RUN_FILE = "reca_run.json"
CARD_FILE = "README.md"
LOSS_PLOT_FILE = "training_loss.png"
PROBE_PLOT_FILE = "collapse_probe.png"
STATE_FILE = "trainer_state.json"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")  # fmt: skip
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "reca_adapter.json")
CHECKPOINT_PREFIX = "checkpoint"
# Never uploaded from the top of an output dir: checkpoint folders travel separately (hub_strategy), "_*" as in
# the stock Trainer.
IGNORE_PATTERNS = ["_*", f"{CHECKPOINT_PREFIX}-*"]


class HubPushError(RuntimeError):
    """A push that did not reach the Hub. The message names what is still only local and how to retry."""


def retry_command(output_dir: str | Path, repo_id: str | None) -> str:
    """The command that pushes a finished run again."""
    return f"reca push {shlex.quote(str(output_dir))} --repo-id {repo_id or 'NAMESPACE/NAME'}"


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub call raises: httpx errors (``HfHubHTTPError`` is one) and OS errors."""
    from huggingface_hub.utils import httpx  # the httpx huggingface_hub runs on

    return (httpx.HTTPError, OSError)


def is_unreachable(error: BaseException) -> bool:
    """True for a network failure or a server-side error (5xx, 429); False for a refusal such as a bad token."""
    from huggingface_hub.utils import httpx

    if isinstance(error, httpx.TransportError | ConnectionError | TimeoutError):
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``, for logs and error messages."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")


# ---- background pushes ---------------------------------------------------------------------------


class PushTracker:
    """Bookkeeping of a run's background pushes.

    Every push future gets a done-callback: a failure is logged when it happens (``reca_hf.hub`` logger, ERROR) and
    counted in :attr:`failures`. A checkpoint folder stays in :attr:`unpushed` from the moment its push starts until
    every one of its uploads succeeded; a failed one stays there until the final push retries it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, set[concurrent.futures.Future]] = {}
        self._failed: set[str] = set()
        self._recorded: list[threading.Event] = []
        self.unpushed: set[str] = set()
        self.failures: list[tuple[str, BaseException]] = []

    @staticmethod
    def key(folder: str | Path) -> str:
        return os.path.abspath(folder)

    def unpushed_now(self) -> set[str]:
        """A copy of :attr:`unpushed` (callbacks change it from upload threads)."""
        with self._lock:
            return set(self.unpushed)

    @property
    def failure_count(self) -> int:
        with self._lock:
            return len(self.failures)

    def begin(self, folder: str | Path) -> None:
        """A checkpoint's push starts: it is unpushed until its uploads succeed."""
        with self._lock:
            self.unpushed.add(self.key(folder))

    def fail(self, folder: str | Path, error: BaseException, what: str = "push") -> None:
        """Record a push that failed before any upload started (e.g. the repo could not be created)."""
        key = self.key(folder)
        with self._lock:
            self.unpushed.add(key)
            self._failed.add(key)
            self.failures.append((f"{Path(key).name} ({what})", error))
        logger.error("Hub push of %s failed (%s): %s; the folder is kept and the final push retries it.",
                     Path(key).name, what, describe_error(error))  # fmt: skip

    def track(self, folder: str | Path, futures: list[concurrent.futures.Future], what: str = "push") -> None:
        """Watch the upload futures of a checkpoint's push."""
        key = self.key(folder)
        with self._lock:
            self.unpushed.add(key)
            self._pending.setdefault(key, set()).update(futures)
        for future in futures:
            recorded = threading.Event()  # set once the callback has run: a future is done before its callbacks
            with self._lock:
                self._recorded.append(recorded)
            future.add_done_callback(lambda done, key=key, recorded=recorded: self._done(key, done, what, recorded))

    def _done(self, key: str, future: concurrent.futures.Future, what: str, recorded: threading.Event) -> None:
        try:
            error = concurrent.futures.CancelledError() if future.cancelled() else future.exception()
            with self._lock:
                pending = self._pending.get(key, set())
                pending.discard(future)
                if error is not None:
                    self._failed.add(key)
                    self.failures.append((f"{Path(key).name} ({what})", error))
                elif not pending and key not in self._failed:
                    self.unpushed.discard(key)
                    self._pending.pop(key, None)
            if error is not None:
                logger.error("Background Hub push of %s failed: %s. The folder is kept on disk (save_total_limit will "
                             "not delete it) and the final push retries it.", Path(key).name, describe_error(error))  # fmt: skip
        finally:
            recorded.set()

    def running(self) -> bool:
        """Whether an upload is still in flight (it may be reading the output dir or a checkpoint folder)."""
        with self._lock:
            return any(not future.done() for futures in self._pending.values() for future in futures)

    def settled(self, folders) -> None:
        """These checkpoints reached the Hub (by a retry, or a final push that supersedes them)."""
        with self._lock:
            for folder in folders:
                key = self.key(folder)
                self.unpushed.discard(key)
                self._failed.discard(key)
                self._pending.pop(key, None)

    def wait(self) -> None:
        """Block until every tracked upload has finished and its outcome is recorded."""
        with self._lock:
            events, self._recorded = self._recorded, []
        for event in events:
            event.wait()

    def failed(self) -> list[str]:
        """Checkpoint folders with a failed upload that no retry has made good yet, oldest first."""
        with self._lock:
            return sorted(self._failed & self.unpushed, key=checkpoint_step)

    def summary(self) -> str:
        with self._lock:
            return "; ".join(f"{what}: {describe_error(error)}" for what, error in self.failures)


def checkpoint_step(folder: str) -> int:
    """The step of a ``checkpoint-<step>`` folder (-1 for any other name)."""
    suffix = Path(folder).name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def rotate_checkpoints(
    run_dir: str,
    limit: int | None,
    best: str | None,
    keep: set[str],
    use_mtime: bool = True,
    prefix: str = CHECKPOINT_PREFIX,
) -> None:
    """``transformers.trainer_utils.rotate_checkpoints``, sparing also every folder in ``keep`` (unpushed ones)."""
    from transformers.trainer_utils import sort_checkpoints

    if not limit or limit <= 0:
        return
    checkpoints = sort_checkpoints(run_dir, prefix, use_mtime=use_mtime)
    if len(checkpoints) <= limit:
        return
    keep = {os.path.abspath(folder) for folder in keep}
    protected = {os.path.abspath(checkpoints[-1])} | keep
    if best is not None:
        protected.add(os.path.abspath(best))
    remaining = len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= limit:
            break
        if os.path.abspath(checkpoint) in protected:
            if os.path.abspath(checkpoint) in keep:
                logger.warning("Keeping %s beyond save_total_limit=%d: its push to the Hub has not succeeded.",
                               checkpoint, limit)  # fmt: skip
            continue
        shutil.rmtree(checkpoint, ignore_errors=True)
        remaining -= 1


class HubResilienceMixin:
    """What a Trainer needs, beyond the stock one, to survive a failing Hub (mix in before ``Trainer``).

    * Background checkpoint pushes are tracked (:class:`PushTracker`): a failure is logged at once and counted
      (:attr:`hub_push_failures`), and the folder is kept on disk, also beyond ``save_total_limit``.
    * With ``hub_optional=True`` an unreachable Hub at start is logged, not raised; creating the repo is retried
      at every checkpoint and at the end.
    * :meth:`push_to_hub` first waits for the background pushes and uploads again the checkpoints whose push
      failed; a final failure raises :class:`HubPushError` naming ``reca push`` (with ``hub_optional``, an
      unreachable Hub is logged instead).
    * Nothing changes a folder a running upload reads. A background push of the output dir lists it recursively
      (``upload_folder`` walks every ``checkpoint-*`` folder before filtering them out) and then reads its
      top-level files: checkpoint rotation waits until no upload is in flight (the next save, at the latest the
      end of training), and with ``hub_always_push`` a save first waits for the running uploads before it writes
      into the output dir (without it, the stock Trainer skips a push while one runs, and the top-level card is
      left for the next save).
    """

    def __init__(self, *args, **kwargs):
        self._hub_pushes = PushTracker()
        self._rotation_due: tuple[str, int | None] | None = None  # (run dir, save_total_limit) deferred by an upload
        super().__init__(*args, **kwargs)

    @property
    def hub_push_failures(self) -> int:
        """How many background pushes (and repo creations) have failed in this run so far."""
        return self._hub_pushes.failure_count

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:
            if not (self.args.hub_optional and is_unreachable(error)):
                raise
            self.hub_model_id, self.push_in_progress = None, None
            logger.warning(
                "The Hub is unreachable (%s): training goes on without it (hub_optional=True). Creating the repo and "
                "pushing are retried at each checkpoint and at the end; every file stays in %s.",
                type(error).__name__, self.args.output_dir,
            )  # fmt: skip

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return super()._push_from_checkpoint(checkpoint_folder)
        if self.hub_model_id is None:  # the Hub was unreachable at start (hub_optional): try again
            try:
                super().init_hf_repo()
            except Exception as error:
                if not is_unreachable(error):
                    raise
                self._hub_pushes.fail(checkpoint_folder, error, "creating the repo")
                return
        before = {id(job) for job in self._push_jobs()}
        super()._push_from_checkpoint(checkpoint_folder)
        jobs = [job for job in self._push_jobs() if id(job) not in before]
        if jobs:
            self._hub_pushes.track(checkpoint_folder, jobs)
        elif self.args.hub_strategy == HubStrategy.ALL_CHECKPOINTS:
            # Skipped while an earlier push runs (hub_always_push=False): this folder has its own place in the repo.
            self._hub_pushes.begin(checkpoint_folder)

    def _push_jobs(self) -> list:
        return list(self.push_in_progress.jobs) if self.push_in_progress else []

    def output_dir_free(self) -> bool:
        """Before a save writes into the output dir: with ``hub_always_push``, wait for the uploads that may still
        read it. Returns whether the output dir may change now (False: an upload reads it, and the stock Trainer
        skips this checkpoint's push)."""
        if self.args.hub_always_push and self._hub_pushes.running():
            logger.info("Waiting for the running Hub upload before this checkpoint writes into the output dir.")
            self._hub_pushes.wait()
        return not self._hub_pushes.running()

    def _save_checkpoint(self, model, trial) -> None:
        # The stock rotation (save_total_limit) would delete a checkpoint whose push failed: it is switched off for
        # the stock save and run here instead, sparing every unpushed folder.
        self.output_dir_free()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            self._rotation_due = (self._get_output_dir(trial=trial), limit)
            if not self._hub_pushes.running():  # else an upload may be walking the folders: the next save rotates
                self._rotate()

    def _rotate(self) -> None:
        if self._rotation_due is not None:
            run_dir, limit = self._rotation_due
            self._rotation_due = None
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, self._hub_pushes.unpushed_now(),
                               use_mtime=True)  # fmt: skip

    def _finish_current_push(self) -> None:
        super()._finish_current_push()
        self._hub_pushes.wait()  # the end of train(): every push's outcome is recorded (and logged) before it returns
        if self.args.should_save:
            self._rotate()  # a rotation that a running upload deferred

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):  # fmt: skip
        """Upload the model, its card and the run's files; first wait for the background pushes and retry the
        checkpoints whose push failed. Raises :class:`HubPushError` (naming ``reca push``) when the push fails;
        with ``hub_optional=True`` an unreachable Hub is logged instead and None returned."""
        if not self.is_world_process_zero():
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        self._hub_pushes.wait()
        try:
            if self.hub_model_id is None:
                self.save_model(_internal_call=True)  # and its card: the stock push saves after creating the repo
                super().init_hf_repo(token=token, private=private)
            self._retry_unpushed_checkpoints(token, revision)
            result = super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        except hub_errors() as error:
            return self._final_push_failed(error)
        if blocking:
            self._hub_pushes.settled(self._hub_pushes.unpushed_now())  # the final push supersedes them
        else:
            self._hub_pushes.track(self.args.output_dir, [result], "final push")
        if self.hub_push_failures:
            logger.warning(
                "%d background push(es) to %s failed during training (%s); the final push sent their content.",
                self.hub_push_failures, self.hub_model_id, self._hub_pushes.summary(),
            )  # fmt: skip
        return result

    def _retry_unpushed_checkpoints(self, token: str | None, revision: str | None) -> None:
        """Checkpoint folders have their own place in the repo with hub_strategy 'checkpoint' (the newest, as
        last-checkpoint/) and 'all_checkpoints' (each): upload again what did not get there."""
        from huggingface_hub import HfApi

        strategy = self.args.hub_strategy
        unpushed = [f for f in self._hub_pushes.unpushed_now() if checkpoint_step(f) >= 0 and os.path.isdir(f)]
        unpushed.sort(key=checkpoint_step)
        if not unpushed or strategy not in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            return
        api = HfApi(token=token if token is not None else self.args.hub_token)
        if strategy == HubStrategy.CHECKPOINT:
            unpushed = unpushed[-1:]
        for folder in unpushed:
            name = "last-checkpoint" if strategy == HubStrategy.CHECKPOINT else os.path.basename(folder)
            logger.info("Retrying the push of %s to %s/%s", folder, self.hub_model_id, name)
            api.upload_folder(repo_id=self.hub_model_id, folder_path=folder, path_in_repo=name, revision=revision,
                              commit_message=f"{os.path.basename(folder)} (retried push)")  # fmt: skip
            self._hub_pushes.settled([folder])

    def _final_push_failed(self, error: BaseException):
        output_dir = self.args.output_dir
        repo = self.hub_model_id or self.args.hub_model_id
        kept = self._hub_pushes.failed()
        message = (
            f"The push to the Hub ({repo or 'repo not created'}) failed: {describe_error(error)}. Nothing is lost: "
            f"every file is in {output_dir}"
            + (f", including {len(kept)} checkpoint folder(s) whose push failed" if kept else "")
            + f". Retry with: {retry_command(output_dir, repo)}"
        )
        if self.hub_push_failures:
            message += (
                f" ({self.hub_push_failures} background push(es) failed during training: {self._hub_pushes.summary()})"
            )
        if self.args.hub_optional and is_unreachable(error):
            logger.error("%s (hub_optional=True: not raised)", message)
            return None
        raise HubPushError(message) from error


# ---- run metadata, the loss plot and the card ----------------------------------------------------


def loss_series(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) pairs of every logged loss: ``loss``, ``reconstruction_loss``, the other ``*_loss`` keys and
    their ``eval_`` versions (``train_loss``, the run's average, is left out)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for name, value in entry.items():
            if (name == "loss" or name.endswith("_loss")) and name != "train_loss" and step is not None:
                if isinstance(value, int | float):
                    series.setdefault(name, []).append((float(step), float(value)))
    return series


# What the reconstruction loss of each generation target kind is, for the loss plot's axis.
LOSS_NAMES = {
    "autoregressive_tokens": "cross-entropy of the image tokens (nats)",
    "masked_tokens": "cross-entropy of the masked image tokens (nats)",
    "diffusion": "diffusion loss (noise MSE + variational bound)",
    "flow": "flow-matching MSE",
}


def loss_axis_label(generation_target: str | None, series: list[str]) -> str:
    """The y-axis of the loss plot: the reconstruction loss's name (from the generation target kind), and the
    image-to-text loss's when it is plotted beside a continuous one; "loss" when the kind is unknown (a run
    record written before it was recorded)."""
    name = LOSS_NAMES.get(generation_target or "")
    if name is None:
        return "loss"
    text_too = any(key.removeprefix("eval_") == "image_to_text_loss" for key in series)
    if text_too and generation_target not in TOKEN_KINDS:
        return f"reconstruction: {name}; image-to-text: cross-entropy (nats)"
    return name


@contextlib.contextmanager
def _step_plot(path: str | Path, title: str, ylabel: str, height: float):
    """A figure of something against the step, saved as ``path`` (a PNG) when the block ends; yields its axes."""
    import matplotlib

    matplotlib.use("Agg")  # no display; before pyplot is imported anywhere in this process
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, height), dpi=100)
    try:
        yield axes
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel, fontsize=8)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)


def write_loss_plot(
    log_history: list[dict[str, Any]], path: str | Path, generation_target: str | None = None
) -> Path | None:
    """Draw the logged losses against the step into a PNG, the axis named for the loss ``generation_target``
    trains with; None (and no file) when nothing was logged."""
    series = loss_series(log_history)
    if not series:
        return None

    def order(name: str) -> tuple:  # reconstruction first, the total after the task losses, eval last
        task = name.removeprefix("eval_")
        return (name.startswith("eval_"), task != "reconstruction_loss", task == "loss", name)

    with _step_plot(path, "RecA training loss", loss_axis_label(generation_target, list(series)), 3.6) as axes:
        for name in sorted(series, key=order):
            steps, values = zip(*series[name], strict=True)
            style = {"linestyle": "--", "marker": "o", "markersize": 3} if name.startswith("eval_") else {}
            if name.removeprefix("eval_") == "loss":
                style.update(color="0.4", linewidth=1.0)
            label = f"{name} (weighted total)" if name.removeprefix("eval_") == "loss" else name
            axes.plot(steps, values, label=label, **{"linewidth": 1.4, **style})
        # NaN and inf are gaps in a line: mark their steps, so that a diverged run never looks like a clean curve
        bad = sorted({step for points in series.values() for step, value in points if not math.isfinite(value)})
        for index, step in enumerate(bad):
            axes.axvline(step, color="red", alpha=0.5, linewidth=1.0, label="non-finite loss" if index == 0 else None)
    return Path(path)


def write_probe_plot(log_history: list[dict[str, Any]], path: str | Path, probe: dict[str, Any]) -> Path | None:
    """Draw the collapse probe's logged readings (``probe["metric"]``) against the step, with the threshold at
    which they read as copying and the step the detector fired, the line labelled with what it measures
    (``probe["label"]``); None (and no file) when no reading was logged."""
    metric = probe["metric"]
    label = probe.get("label") or metric  # a run recorded before labels: the metric's name
    points = [(entry["step"], float(entry[metric])) for entry in log_history if metric in entry and "step" in entry]
    if not points:
        return None
    steps, values = zip(*points, strict=True)
    with _step_plot(path, "Collapse probe", metric, 3.0) as axes:
        axes.plot(steps, values, marker="o", markersize=3, linewidth=1.4, label=label)
        axes.axhline(probe["threshold"], color="red", linestyle="--", linewidth=1.0,
                     label=f"copying at {probe['threshold']:g} (with a collapsing loss)")  # fmt: skip
        if probe.get("fired_at_step") is not None:
            axes.axvline(probe["fired_at_step"], color="red", alpha=0.5, label="detector fired")
        axes.set_ylim(min(0.0, min(values)) - 0.05, max(1.0, max(values)) + 0.05)
    return Path(path)


def read_log_history(output_dir: str | Path) -> list[dict[str, Any]] | None:
    """The log history of ``trainer_state.json`` in the folder, else in its newest checkpoint; None without one."""
    folder = Path(output_dir)
    candidates = [folder / STATE_FILE]
    candidates += sorted(
        folder.glob(f"{CHECKPOINT_PREFIX}-*/{STATE_FILE}"), key=lambda p: checkpoint_step(str(p.parent))
    )[::-1]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text()).get("log_history", [])
    return None


def read_run(output_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The ``reca_run.json`` of a saved run, ``overrides`` (those not None) replacing its fields."""
    folder = Path(output_dir)
    path = folder / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {RUN_FILE}: it is not a RecA run saved by reca_hf (the trainer writes {RUN_FILE} beside "
            "every model card it writes)"
        )
    return {**json.loads(path.read_text()), **{k: v for k, v in overrides.items() if v is not None}}


def render_run_card(output_dir: str | Path, **overrides: Any) -> ModelCard:
    """The card of the run saved in ``output_dir``, from its ``reca_run.json`` (``overrides`` replace its fields,
    e.g. ``repo_id`` or ``eval_results``); the plots and the grids appear when their PNGs are in the folder."""
    return _render(Path(output_dir), read_run(output_dir, **overrides))


def _render(folder: Path, run: dict[str, Any]) -> ModelCard:
    return render_model_card(
        model_name=run["model_name"],
        base_model=run.get("base_model"),
        architecture=run["architecture"],
        model_class=run["model_class"],
        settings=run["settings"],
        tags=run.get("tags") or [],
        repo_id=run.get("repo_id"),
        datasets=run.get("datasets"),
        parameter_table=run.get("parameter_table"),
        grid_file=GRID_FILE if (folder / GRID_FILE).is_file() else None,
        text_to_image_file=TEXT_TO_IMAGE_FILE if (folder / TEXT_TO_IMAGE_FILE).is_file() else None,
        loss_plot=LOSS_PLOT_FILE if (folder / LOSS_PLOT_FILE).is_file() else None,
        probe_plot=PROBE_PLOT_FILE if (folder / PROBE_PLOT_FILE).is_file() and run.get("collapse_probe") else None,
        probe_caption=(run.get("collapse_probe") or {}).get("meaning"),
        local_path=run.get("output_dir"),
        lora=run.get("lora"),
        eval_results=run.get("eval_results"),
        license=run.get("license"),
        pipeline_tag=run.get("pipeline_tag") or "any-to-any",
    )


def write_run_card(output_dir: str | Path, run: dict[str, Any], log_history: list[dict[str, Any]] | None) -> ModelCard:
    """Write ``reca_run.json``, ``training_loss.png`` (when losses were logged) and ``README.md`` into a folder."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(run, indent=2, default=str) + "\n"
    (folder / RUN_FILE).write_text(text)
    if log_history:
        write_loss_plot(log_history, folder / LOSS_PLOT_FILE, run.get("generation_target"))
        if run.get("collapse_probe"):
            write_probe_plot(log_history, folder / PROBE_PLOT_FILE, run["collapse_probe"])
    for name, results in eval_result_files(run.get("eval_results")).items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(results)
    card = _render(folder, json.loads(text))  # exactly what the file says, as `reca card` would render it
    card.save(folder / CARD_FILE)
    return card


def update_run_card(output_dir: str | Path, **overrides: Any) -> ModelCard:
    """Re-render a saved run's card (and its loss plot, from ``trainer_state.json``) in place: ``reca card``.

    ``overrides`` (e.g. ``eval_results``, ``repo_id``) are also written back into ``reca_run.json``.
    """
    return write_run_card(output_dir, read_run(output_dir, **overrides), read_log_history(output_dir))


# ---- `reca push` -----------------------------------------------------------------------------------


def push_run(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    adapter_only: bool = False,
    token: str | None = None,
    eval_results: dict[str, Any] | None = None,
    license: str | None = None,  # noqa: A002 - the card field's name
    commit_message: str = "Upload RecA run with reca_hf",
):
    """Push a saved run (its top-level files, not its checkpoint folders) to ``repo_id``, regenerating its card.

    ``adapter_only`` pushes only the LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``,
    ``reca_adapter.json``), ``reca_run.json`` and the card with its images; it is refused for a run without an
    adapter. Any adapter whose recorded base model is not a Hub id is refused (nobody else could apply it).
    Returns the ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    from .lora import ADAPTER_CONFIG_FILE, check_publishable

    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the output_dir of a saved run")
    has_adapter = (folder / ADAPTER_CONFIG_FILE).is_file()
    if adapter_only and not has_adapter:
        raise ValueError(
            f"--adapter-only: {folder} holds no LoRA adapter ({ADAPTER_CONFIG_FILE} is missing); push the full "
            "model without --adapter-only"
        )
    read_run(folder)  # a run saved by reca_hf, or an error saying it is not one
    if not has_adapter and not any((folder / name).is_file() for name in MODEL_FILES):
        raise FileNotFoundError(
            f"{folder} holds no model weights ({', '.join(MODEL_FILES)}); save the model first "
            "(trainer.save_model(), as reca train does at the end) or give the folder that holds them"
        )
    check_publishable(folder)
    allow = None
    if adapter_only:
        allow = [*ADAPTER_FILES, RUN_FILE, CARD_FILE, LOSS_PLOT_FILE, PROBE_PLOT_FILE, GRID_FILE, TEXT_TO_IMAGE_FILE,
                 f"{EVAL_RESULTS_FOLDER}/*"]  # fmt: skip
    with _restored_on_failure(folder, [RUN_FILE, CARD_FILE, LOSS_PLOT_FILE, PROBE_PLOT_FILE], EVAL_RESULTS_FOLDER):
        update_run_card(folder, repo_id=repo_id, eval_results=eval_results, license=license)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            allow_patterns=allow,
            ignore_patterns=IGNORE_PATTERNS,
        )


@contextlib.contextmanager
def _restored_on_failure(folder: Path, names: list[str], subfolder: str):
    """Put ``folder``'s files ``names`` and ``subfolder`` back as they were if the block raises: a failed push
    leaves the run as it found it (its card does not name a repo that was never made)."""
    saved = {name: (folder / name).read_bytes() if (folder / name).is_file() else None for name in names}
    tree = folder / subfolder
    backup = None
    if tree.is_dir():
        backup = folder / f"_{subfolder}.reca-push-backup"  # `_*` is never pushed
        shutil.copytree(tree, backup, dirs_exist_ok=True)
    try:
        yield
    except BaseException:
        for name, content in saved.items():
            if content is None:
                (folder / name).unlink(missing_ok=True)
            else:
                (folder / name).write_bytes(content)
        shutil.rmtree(tree, ignore_errors=True)
        if backup is not None:
            backup.rename(tree)
        raise
    finally:
        if backup is not None and backup.exists():
            shutil.rmtree(backup)
