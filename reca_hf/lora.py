"""LoRA for RecA: target selection per adapter, generation scoping, and saving, publishing and loading adapters.

Two target modes come from the architecture adapter's declarations:

- ``"generation"``: LoRA on the generation-only Linear layers (``lora_generation_targets``). Understanding
  never runs through them, so it stays exactly the base model's.
- ``"generation+llm"``: also the shared LLM's projections (``lora_llm_targets``), *scoped to generation*:
  the model's text path (the forward of ``understanding_entry``) runs with every LoRA layer in it
  switched off, so text outputs are bitwise the base model's, while the generation path, which calls the
  LLM directly, sees the adapter. Hooks on that module do the switching; :func:`load_reca_adapter`
  reinstalls them from ``reca_adapter.json``, since PEFT's own files cannot record them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

from .adapters.base import UMMAdapter
from .adapters.helpers import unwrap_model
from .adapters.registry import adapter_class_for, get_adapter
from .config import LORA_TARGET_MODES, TINY_PREFIX
from .freeze import matches
from .loading import is_hub_id

logger = logging.getLogger(__name__)

TARGET_MODES = LORA_TARGET_MODES  # the choices of lora_target_modules, defined with the field
RECA_ADAPTER_FILE = "reca_adapter.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_TARGETS_ATTR = "reca_lora_target_modules"  # set on a PeftModel: the lora_target_modules it was built from
# PEFT's note at every save of an adapter whose base model's config it cannot read (offline, or a 'tiny:' spec).
PEFT_BASE_CONFIG_NOTE = r"Could not find a config file in .* - will assume that the vocabulary was not modified"


@contextlib.contextmanager
def peft_base_config_note(shown: bool):
    """Inside the block, PEFT's note that it cannot read the base model's config is silenced when it was ``shown``
    already: a run says it at its first save, not at every checkpoint and again at the final save. (Python's
    "once" filter cannot do it: any change to the filters, as every ``catch_warnings`` makes, forgets it.)"""
    with warnings.catch_warnings():
        if shown:
            warnings.filterwarnings("ignore", message=PEFT_BASE_CONFIG_NOTE, category=UserWarning, module=r"peft\.")
        yield


# ---- target selection ---------------------------------------------------------------------------


def _alternation(patterns) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


def protected_modules(adapter: UMMAdapter | type[UMMAdapter]) -> str:
    """A full-name regex of the modules LoRA must never touch: understanding-only modules and image tokenizers.

    Used as PEFT's ``exclude_modules``, which wins over ``target_modules``, so a list such as ``["q_proj"]``
    cannot reach the vision tower's ``q_proj`` by accident.
    """
    return rf"(?:{_alternation((*adapter.understanding_modules, *adapter.tokenizer_modules))})(?:\..*)?"


def resolve_target_modules(adapter: UMMAdapter | type[UMMAdapter], targets: str | list[str]) -> str | list[str]:
    """PEFT ``target_modules`` for a ``lora_target_modules`` value: a mode becomes the adapter's full-name
    regex; a regex or a list of names passes through."""
    if targets == "generation":
        if not adapter.lora_generation_targets:
            if adapter.lora_llm_targets and adapter.understanding_entry is not None:
                fix = (
                    "Use lora_target_modules='generation+llm': LoRA on the shared LLM, switched on for generation only."
                )
            elif adapter.lora_llm_targets:
                fix = (
                    "Use lora_target_modules='generation+llm': LoRA on the shared LLM's projections. "
                    f"{adapter.name} reads and writes images through one forward, so that LoRA cannot be switched "
                    "off for understanding: keep image-to-text data in the mix."
                )
            else:
                fix = "Give lora_target_modules as a list of module names or a regular expression."
            raise ValueError(
                f"lora_target_modules='generation': the {adapter.name} adapter has no generation-only Linear layers "
                f"(its image tokens share the LLM's embeddings and head). {fix}"
            )
        return _alternation(adapter.lora_generation_targets)
    if targets == "generation+llm":
        if not adapter.lora_llm_targets:
            raise ValueError(
                f"lora_target_modules='generation+llm': the {adapter.name} adapter declares no lora_llm_targets. "
                "Give lora_target_modules as a list of module names or a regular expression instead."
            )
        return _alternation((*adapter.lora_generation_targets, *adapter.lora_llm_targets))
    return targets


def lora_config(adapter: UMMAdapter, args) -> LoraConfig:
    """The `LoraConfig` that the `RecAConfig` LoRA fields describe.

    An adapter's ``lora_modules_to_save`` (trainable parts that are not Linear layers, e.g. OpenUni's
    meta-queries) become PEFT's ``modules_to_save``: trained in full and saved with the LoRA weights.
    """
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=resolve_target_modules(adapter, args.lora_target_modules),
        exclude_modules=protected_modules(adapter),
        modules_to_save=list(getattr(adapter, "lora_modules_to_save", ())) or None,
        bias="none",
    )


def _check_targets_exist(model: torch.nn.Module, adapter: UMMAdapter, config: LoraConfig, field: str) -> None:
    named = list(unwrap_model(model).named_modules())
    if any(check_target_module_exists(config, name) for name, _ in named if name):  # exclusions are falsy
        return
    protected = protected_modules(adapter)
    linear = [n for n, m in named if isinstance(m, torch.nn.Linear) and not re.fullmatch(protected, n)]
    raise ValueError(
        f"{field}={config.target_modules!r} matches no layer that may get LoRA (understanding-only modules and "
        "image tokenizers never do). A string is a full regular expression on module names, e.g. "
        f"{re.escape(linear[0] if linear else 'model.layers.0.q_proj')!r}; a list holds module names or suffixes."
    )


# ---- wrapping --------------------------------------------------------------------------------------


def prepare_peft_model(
    model: torch.nn.Module,
    adapter: UMMAdapter,
    args,
    peft_config: PeftConfig | None = None,
    model_id: str | None = None,
) -> torch.nn.Module:
    """Wrap ``model`` in LoRA when ``peft_config`` is given or ``args.use_peft`` is set; else return it as is.

    Every base parameter ends up frozen and only the adapter trains. ``model_id`` is the name the model was
    loaded from; with ``args.base_model_id`` it decides the ``base_model_name_or_path`` the adapter records.
    """
    if peft_config is not None and not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig), got {type(peft_config).__name__}; "
            "or leave it out and set use_peft=True with the lora_* fields of RecAConfig."
        )
    wants_new_adapter = peft_config is not None or args.use_peft
    if is_peft_model(model):
        if wants_new_adapter:
            raise ValueError(
                "the model is already a PeftModel and a new LoRA configuration was given: merge the existing "
                "adapter first (model = model.merge_and_unload(), or reca_hf.load_reca_adapter(..., merge=True)) "
                "and train the merged model, or drop peft_config/use_peft to keep training this adapter."
            )
        _train_only_the_adapter(model)
        return _checked_for_push(model, args)
    if not wants_new_adapter:
        return model

    if peft_config is None:
        config, targets, field = lora_config(adapter, args), args.lora_target_modules, "lora_target_modules"
    else:
        config, targets, field = copy.deepcopy(peft_config), "custom", "peft_config.target_modules"
        if isinstance(config, LoraConfig) and config.exclude_modules is None:
            config.exclude_modules = protected_modules(adapter)
    if isinstance(config, LoraConfig) and config.target_modules not in (None, INCLUDE_LINEAR_LAYERS_SHORTHAND):
        _check_targets_exist(model, adapter, config, field)
    model = get_peft_model(model, config)
    # get_peft_model records the name the model was loaded from, which may be a local folder.
    model.peft_config[model.active_adapter].base_model_name_or_path = _base_model_name(args, model_id, model)
    setattr(model, _TARGETS_ATTR, targets)
    if targets == "generation+llm":
        if adapter.understanding_entry is not None:
            scope_to_generation(model, adapter)
        else:
            logger.warning(
                "lora_target_modules='generation+llm' on %s: its images are read and written through one forward, "
                "so the LLM's LoRA cannot be switched off for understanding and text outputs change too. Keep "
                "image-to-text data in the mix (i2t_dataset, task_ratios).",
                adapter.name,
            )
    if args.activation_checkpointing:
        # Reentrant checkpointing needs inputs that require grad, which frozen embeddings do not give.
        model.enable_input_require_grads()
    return _checked_for_push(model, args)


def _train_only_the_adapter(model: PeftModel) -> None:
    """A PeftModel trained further: the freeze policy must not unfreeze its base, and a loaded adapter is frozen."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.set_requires_grad(model.active_adapters, requires_grad=True)


def _checked_for_push(model, args):
    if args.push_to_hub:  # fail before training, not after it
        check_publishable(model)
    return model


def _base_model_name(args, model_id: str | None, model) -> str | None:
    """The hub id of the base model when it is known, else the local folder or 'tiny:' spec it came from."""
    loaded_from = unwrap_model(model).name_or_path or None
    for name in (args.base_model_id, model_id, loaded_from):
        if is_hub_id(name):
            return name
    for name in (model_id, loaded_from):
        if name and (name.startswith(TINY_PREFIX) or Path(name).expanduser().exists()):
            return name
    return None


# ---- generation scoping ----------------------------------------------------------------------------


def _text_path_enter(module: torch.nn.Module, args) -> None:
    # peft's public switches (disable_adapter, enable_adapters) also flip requires_grad on the adapter
    # weights and re-enable every adapter on exit; the per-layer flag turns the layers off and nothing else.
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    module._reca_saved_adapter_states.append([(layer, layer._disable_adapters) for layer in layers])
    for layer in layers:
        layer._disable_adapters = True


def _text_path_exit(module: torch.nn.Module, args, output) -> None:
    if module._reca_saved_adapter_states:
        for layer, disabled in module._reca_saved_adapter_states.pop():
            layer._disable_adapters = disabled


def _entry_module(model: torch.nn.Module, adapter: UMMAdapter | type[UMMAdapter] | None = None) -> torch.nn.Module:
    base = unwrap_model(model)
    adapter = adapter or adapter_class_for(base.config.model_type)
    if adapter.understanding_entry is None:
        raise ValueError(f"the {adapter.name} adapter declares no understanding_entry: LoRA cannot be scoped")
    return base.get_submodule(adapter.understanding_entry)


def scope_to_generation(model: torch.nn.Module, adapter: UMMAdapter | type[UMMAdapter] | None = None):
    """Switch the model's LoRA layers off inside its text path (the adapter's ``understanding_entry``).

    Text outputs are then bitwise the base model's; the generation path keeps the adapter. Idempotent;
    returns ``model``. :func:`load_reca_adapter` calls this for "generation+llm" adapters.
    """
    entry = _entry_module(model, adapter)
    if not is_generation_scoped(model, adapter):
        entry._reca_saved_adapter_states = []
        entry.register_forward_pre_hook(_text_path_enter)
        entry.register_forward_hook(_text_path_exit, always_call=True)
    return model


def unscope(model: torch.nn.Module, adapter: UMMAdapter | type[UMMAdapter] | None = None):
    """Remove the hooks of :func:`scope_to_generation` (LoRA then applies on every path); returns ``model``."""
    entry = _entry_module(model, adapter)
    for hooks, function in ((entry._forward_pre_hooks, _text_path_enter), (entry._forward_hooks, _text_path_exit)):
        for key in [key for key, hook in hooks.items() if hook is function]:
            del hooks[key]
            entry._forward_hooks_always_called.pop(key, None)
    return model


def is_generation_scoped(model: torch.nn.Module, adapter: UMMAdapter | type[UMMAdapter] | None = None) -> bool:
    """True when the model's text path runs with LoRA switched off."""
    base = unwrap_model(model)
    adapter = adapter or adapter_class_for(base.config.model_type)
    if adapter.understanding_entry is None:
        return False
    entry = base.get_submodule(adapter.understanding_entry)
    return any(hook is _text_path_enter for hook in entry._forward_pre_hooks.values())


def leaves_understanding_intact(model: torch.nn.Module, adapter: UMMAdapter) -> bool:
    """True when training ``model`` cannot change what its understanding path computes: a PeftModel whose
    trainable layers all sit in generation-only modules, or inside the scoped text path switched off."""
    if not is_peft_model(model):
        return False
    base = unwrap_model(model)
    scoped = is_generation_scoped(model, adapter)
    entry = adapter.understanding_entry
    trainable_modules = {name.rsplit(".", 2)[0] for name, p in base.named_parameters() if p.requires_grad}
    for name in trainable_modules:
        in_generation = matches(name, adapter.generation_modules)
        switched_off = scoped and entry is not None and matches(name, [re.escape(entry)])
        if not (in_generation or switched_off):
            return False
    return True


# ---- saving and publishing -------------------------------------------------------------------------


def lora_record(model: torch.nn.Module, adapter: UMMAdapter) -> dict[str, Any] | None:
    """The LoRA facts of a run, as ``reca_run.json`` records them (None for a full model): the base model the
    adapter records, the target mode and modules, the generation scoping and the LoRA hyperparameters."""
    if not is_peft_model(model):
        return None
    peft_model = unwrap_peft(model)
    config = peft_model.peft_config[peft_model.active_adapter]
    targets = getattr(config, "target_modules", None)
    return {
        "base_model": config.base_model_name_or_path,
        "lora_target_modules": getattr(peft_model, _TARGETS_ATTR, "custom"),
        "target_modules": sorted(targets) if isinstance(targets, set | list | tuple) else targets,
        "generation_scoped": is_generation_scoped(model, adapter),
        "understanding_entry": adapter.understanding_entry,
        "lora_r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "lora_dropout": getattr(config, "lora_dropout", None),
    }


lora_card_data = lora_record  # the old name (the card reads lora_target_modules and generation_scoped)


def write_reca_adapter_file(output_dir: str | Path, run: dict[str, Any]) -> Path:
    """Write ``reca_adapter.json`` beside the PEFT files, from the run's record (what ``reca_run.json`` holds):
    the architecture adapter's name, the LoRA targets and scoping, and the run's RecA settings (resolutions,
    prompts), so the LoRA adapter can be applied and its training read back."""
    record = {"reca_hf_version": run["reca_hf_version"], "adapter": run["architecture"], **run["lora"],
              **run["reca"]}  # fmt: skip
    path = Path(output_dir) / RECA_ADAPTER_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def check_publishable(target: torch.nn.Module | str | Path) -> None:
    """Refuse to publish a LoRA adapter (a PeftModel or a saved folder) whose base model is not a Hub id.

    Such an adapter records a path that exists only on this machine, so nobody else could apply it.
    Full models (no ``adapter_config.json``) pass.
    """
    if isinstance(target, str | Path):
        config_file = Path(target) / ADAPTER_CONFIG_FILE
        if not config_file.is_file():
            return
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    elif is_peft_model(target):
        peft_model = unwrap_peft(target)
        base = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
    else:
        return
    if not is_hub_id(base):
        raise ValueError(
            f"refusing to publish this LoRA adapter: its base model is {base!r}, not a Hub id, so nobody else "
            "could apply it. Set base_model_id to the base model's Hub id (e.g. RecAConfig(base_model_id="
            "'deepseek-community/Janus-Pro-7B') or --base_model_id on the command line) and train or save again."
        )


def unwrap_peft(model: torch.nn.Module) -> PeftModel:
    """The PeftModel under DDP / compile wrappers."""
    while not isinstance(model, PeftModel):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# ---- downloading and applying ----------------------------------------------------------------------


def read_reca_adapter_config(adapter: str | Path, revision: str | None = None) -> dict[str, Any] | None:
    """The ``reca_adapter.json`` of a local adapter folder or a Hub repository (None for a plain PEFT adapter)."""
    folder = Path(adapter).expanduser()
    if folder.is_dir():
        path = folder / RECA_ADAPTER_FILE
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(str(adapter), RECA_ADAPTER_FILE, revision=revision)).read_text())
    except EntryNotFoundError:
        return None


def apply_reca_adapter(
    adapter: str | Path,
    base_model: torch.nn.Module,
    merge: bool = False,
    *,
    settings: dict[str, Any] | None = None,
    revision: str | None = None,
) -> torch.nn.Module:
    """Apply the RecA LoRA adapter ``adapter`` (a Hub id or a local folder) to the loaded ``base_model``, with the
    generation scoping its ``reca_adapter.json`` (``settings``) records; :func:`reca_hf.factory.load_reca_adapter`
    loads the base model by name and calls this."""
    if settings is None:
        settings = read_reca_adapter_config(adapter, revision) or {}
    if is_peft_model(base_model):
        raise ValueError("base_model is already a PeftModel: merge it first (merge_and_unload()) or pass the base")
    kind = get_adapter(base_model)
    if settings.get("adapter") not in (None, kind.name):
        raise ValueError(f"this adapter was trained for {settings['adapter']!r} models, not {kind.name!r} ones")
    model = PeftModel.from_pretrained(base_model, str(adapter), revision=revision)
    setattr(model, _TARGETS_ATTR, settings.get("lora_target_modules", "custom"))
    scoped = bool(settings.get("generation_scoped"))
    if scoped:
        scope_to_generation(model, kind)
    if not merge:
        return model
    if scoped:
        unscope(model, kind)
        logger.warning(
            "Merged a 'generation+llm' adapter: its LLM update now also applies to text, so understanding "
            "outputs are no longer the base model's. Load with merge=False to keep them exact."
        )
    return model.merge_and_unload()


def __getattr__(name: str):
    # Loading an adapter with its base model by name moved to reca_hf.factory; it still imports from here.
    if name == "load_reca_adapter":
        from importlib import import_module

        return import_module("reca_hf.factory").load_reca_adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
