"""What `reca train` would fail on outside the recipe itself, checked by `reca validate` without training: a
`report_to` tracker that is not installed, a Hub model or dataset that cannot be reached, a push without a token.

Each check returns ``(errors, notes)``: an error names the field and its fix; a note says what could not be
checked (offline) rather than calling it fine.
"""

from __future__ import annotations

from pathlib import Path

from .data import SYNTHETIC, looks_local

DATASET_FIELDS = ("dataset_name", "i2t_dataset_name", "t2i_dataset_name", "eval_dataset_name")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "clearml": "clearml", "neptune": "neptune", "dvclive": "dvclive", "codecarbon": "codecarbon",
                    "swanlab": "swanlab", "trackio": "trackio"}  # fmt: skip


def tracker_errors(config) -> list[str]:
    """Trackers in ``report_to`` whose package is missing (transformers' own availability test)."""
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    wanted = [name for name in config.report_to or [] if name not in ("none", "all")]
    return [
        f"report_to={name!r}: {name} is not installed; pip install {TRACKER_PACKAGES.get(name, name)}, or remove "
        f"{name} from report_to"
        for name in wanted
        if name not in available
    ]


def push_errors(config) -> list[str]:
    """``push_to_hub`` without a Hub token (``hub_token``, ``HF_TOKEN`` or a saved login)."""
    from huggingface_hub import get_token

    if not config.push_to_hub or config.hub_token or get_token():
        return []
    return [
        "push_to_hub=True but no Hub token was found: run `hf auth login` (or set HF_TOKEN, or hub_token), or set "
        "push_to_hub: false and push later with `reca push`"
    ]


def hub_dataset_problems(config) -> tuple[list[str], list[str]]:
    """``(errors, notes)`` of the datasets named by Hub id: each must exist and be readable with the user's token;
    offline (``HF_HUB_OFFLINE``) or with the Hub out of reach, each is a note "not checked"."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from .hub import describe_error, hub_errors, is_unreachable

    errors, notes = [], []
    for field in DATASET_FIELDS:
        name = getattr(config, field, None)
        if not is_hub_id(name):
            continue
        if constants.HF_HUB_OFFLINE:
            notes.append(f"{field}={name!r}: not checked: offline (HF_HUB_OFFLINE is set)")
            continue
        try:
            HfApi(token=config.hub_token).dataset_info(name, timeout=10)
        except GatedRepoError:
            errors.append(f"{field}={name!r} is gated: accept its terms on the Hub and log in (hf auth login)")
        except RepositoryNotFoundError:
            errors.append(
                f"{field}={name!r}: no such dataset on the Hub (or it is private: log in with hf auth login); check "
                "the id, or give a local folder"
            )
        except hub_errors() as error:
            if not is_unreachable(error):
                errors.append(f"{field}={name!r}: the Hub refused it ({describe_error(error)}); check the id and token")
                continue
            notes.append(f"{field}={name!r}: not checked: the Hub could not be reached ({describe_error(error)})")
    return errors, notes


def is_hub_id(name: str | None) -> bool:
    """Whether a dataset name can only mean a Hub repo: ``owner/name`` or ``name``, not a local path or the
    synthetic set."""
    return bool(name) and name != SYNTHETIC and not looks_local(name) and not Path(name).expanduser().exists()


def offline_model_note(name: str) -> str | None:
    """The note for a Hub model whose config cannot be read because the Hub is switched off, else None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and is_hub_id(name):
        return f"model_name_or_path={name!r}: not checked: offline (HF_HUB_OFFLINE is set) and not in the cache; the checks that need its config were skipped"
    return None


def preflight(config) -> tuple[list[str], list[str]]:
    """``(errors, notes)`` of every check above."""
    errors, notes = hub_dataset_problems(config)
    return tracker_errors(config) + push_errors(config) + errors, notes
