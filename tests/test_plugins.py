"""Models and adapters from outside reca_hf: entry points, dotted paths, loading options, plain nn.Module models,
and the worked example in examples/custom_umm."""

import dataclasses
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from reca_hf import RecACollator, RecAConfig, RecATrainer
from reca_hf.adapters import FlowAdapter, JanusAdapter, LossNoise, base, get_adapter, registry, resolve_adapter_class
from reca_hf.cli import main, validate
from reca_hf.loading import load_model_and_processor, load_module, model_class_from_name, save_module_config
from reca_hf.models.tiny_flow import TinyFlowModel
from reca_hf.testing import tiny_umm

EXAMPLE = Path(__file__).parents[1] / "examples" / "custom_umm"

PLUGIN_SOURCE = """
from transformers import AutoConfig

from reca_hf.adapters import FlowAdapter
from reca_hf.models.tiny_flow import TinyFlowConfig


class ThirdPartyConfig(TinyFlowConfig):
    model_type = "third_party_flow"


AutoConfig.register("third_party_flow", ThirdPartyConfig, exist_ok=True)


class ThirdPartyAdapter(FlowAdapter):
    name = "third_party_flow"
    model_types = ("third_party_flow",)
"""


class RenamedFlowAdapter(FlowAdapter):
    """Named by dotted path in the tests below (not registered by its definition)."""

    name = "renamed_flow"
    model_types = ("renamed_flow",)


class ComposedFlowAdapter(FlowAdapter):
    """An adapter whose load() builds its model itself, as one of a model composed of parts would."""

    name = "composed_flow"
    model_types = ("reca_tiny_flow",)
    loads: list = []

    @classmethod
    def load(cls, name_or_path, dtype="float32", **kwargs):
        cls.loads.append((name_or_path, dtype, kwargs))
        return tiny_umm("flow", seed=3)


@pytest.fixture
def fresh_registry(monkeypatch):
    """The adapter registry as it is, restored after the test (plug-ins registered in it do not leak)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TINY_BUILDERS", dict(registry._TINY_BUILDERS))
    monkeypatch.setattr(registry, "_LOADED_ENTRY_POINTS", set(registry._LOADED_ENTRY_POINTS))


def _install(tmp_path, monkeypatch, entry_points: str, modules: dict[str, str]) -> None:
    """A distribution on sys.path as pip would leave it: modules and a dist-info with entry_points.txt."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
    info = tmp_path / "reca_thirdparty-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: reca-thirdparty\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[reca_hf.adapters]\n{entry_points}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def plugin(tmp_path, monkeypatch, fresh_registry):
    _install(tmp_path, monkeypatch, "third_party_flow = reca_thirdparty_flow:ThirdPartyAdapter",
             {"reca_thirdparty_flow": PLUGIN_SOURCE})  # fmt: skip
    yield
    sys.modules.pop("reca_thirdparty_flow", None)


def _saved_flow_folder(folder: Path, model_type: str | None = None) -> Path:
    model, tokenizer = tiny_umm("flow")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if model_type is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return folder


def _recipe(tmp_path, **values) -> Path:
    path = tmp_path / "recipe.yaml"
    values = {
        "dataset_name": "synthetic_shapes",
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "dataloader_pin_memory": "false",
        **values,
    }
    path.write_text("\n".join(f"{key}: {value}" for key, value in values.items()) + "\n")
    return path


def test_an_adapter_installed_by_entry_point_is_found_by_get_adapter(plugin):
    assert "third_party_flow" not in registry._REGISTRY and "reca_thirdparty_flow" not in sys.modules  # lazily
    adapter = get_adapter(types.SimpleNamespace(model_type="third_party_flow", image_size=32))
    assert type(adapter).__name__ == "ThirdPartyAdapter" and adapter.name == "third_party_flow"
    assert resolve_adapter_class("third_party_flow") is type(adapter)


def test_an_adapter_installed_by_entry_point_is_found_by_reca_validate(plugin, tmp_path):
    assert "third_party_flow" not in registry._REGISTRY
    folder = _saved_flow_folder(tmp_path / "model", model_type="third_party_flow")  # tiny_umm lists the plug-ins
    registry._REGISTRY.pop("third_party_flow")
    registry._LOADED_ENTRY_POINTS.clear()
    assert validate(str(_recipe(tmp_path, model_name_or_path=str(folder)))) == []
    assert registry._REGISTRY["third_party_flow"].__name__ == "ThirdPartyAdapter"
    wrong = _recipe(tmp_path, model_name_or_path=str(folder), generation_resolution=30)
    assert any("generation_resolution=30" in error for error in validate(str(wrong)))  # the plug-in's own checks


def test_a_broken_entry_point_is_skipped_with_a_warning_naming_it(tmp_path, monkeypatch, fresh_registry, caplog):
    _install(tmp_path, monkeypatch, "broken = reca_no_such_module:Adapter\nthird_party_flow = "
             "reca_thirdparty_flow:ThirdPartyAdapter", {"reca_thirdparty_flow": PLUGIN_SOURCE})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        assert "third_party_flow" in registry.registered_adapters()
    assert "'broken' = 'reca_no_such_module:Adapter'" in caplog.text and "reca-thirdparty" in caplog.text
    sys.modules.pop("reca_thirdparty_flow", None)


def test_the_adapter_field_names_an_adapter_by_registry_name_or_dotted_path(fresh_registry):
    assert resolve_adapter_class("janus") is JanusAdapter
    assert resolve_adapter_class("reca_hf.adapters.janus:JanusAdapter") is JanusAdapter
    assert resolve_adapter_class("reca_hf.adapters.janus.JanusAdapter") is JanusAdapter
    with pytest.raises(ValueError, match="'nope' is not a registered architecture adapter; registered: .*janus"):
        resolve_adapter_class("nope")
    with pytest.raises(ValueError, match="adapter='reca_hf.nothing:Adapter' cannot be imported"):
        resolve_adapter_class("reca_hf.nothing:Adapter")
    with pytest.raises(TypeError, match="not a reca_hf.adapters.UMMAdapter subclass"):
        resolve_adapter_class("torch.nn:Linear")
    assert RecAConfig(output_dir="x", adapter="my_pkg.my_module:MyAdapter").adapter == "my_pkg.my_module:MyAdapter"
    with pytest.raises(ValueError, match="adapter='my adapter'"):
        RecAConfig(output_dir="x", adapter="my adapter")


def test_an_explicit_adapter_wins_over_detection_in_the_trainer(fresh_registry, make_args, shapes, caplog):
    model, tokenizer = tiny_umm("flow")
    args = make_args(adapter="tests.test_plugins:RenamedFlowAdapter", max_steps=1)
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=tokenizer)
    assert type(trainer.adapter) is RenamedFlowAdapter
    assert "handles model types renamed_flow, but this model's config says model_type='reca_tiny_flow'" in caplog.text
    assert registry._REGISTRY["renamed_flow"] is RenamedFlowAdapter  # registered, so detection finds it later


def test_the_trainer_and_reca_train_load_through_the_adapter(fresh_registry, make_args, shapes, tmp_path):
    ComposedFlowAdapter.loads.clear()
    args = make_args(adapter="tests.test_plugins:ComposedFlowAdapter", model_dtype="bfloat16", max_steps=1)
    trainer = RecATrainer("someone/composed-umm", args=args, train_dataset=shapes)
    assert type(trainer.adapter) is ComposedFlowAdapter and trainer.base_model_id == "someone/composed-umm"
    assert ComposedFlowAdapter.loads == [
        ("someone/composed-umm", "bfloat16", {"trust_remote_code": False, "revision": None})
    ]
    recipe = _recipe(tmp_path, adapter="tests.test_plugins:ComposedFlowAdapter", model_name_or_path="someone/x",
                     max_steps=1, max_train_samples=4, per_device_train_batch_size=4, collapse_action="'off'",
                     num_reconstruction_images=0)  # fmt: skip
    main(["train", str(recipe), "--model_revision", "v1", "--attn_implementation", "sdpa"])
    assert ComposedFlowAdapter.loads[-1] == (
        "someone/x",
        "float32",
        {"trust_remote_code": False, "revision": "v1", "attn_implementation": "sdpa"},
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_recipe_may_name_a_registered_adapter(tmp_path):
    assert validate(str(_recipe(tmp_path, adapter="janus", model_name_or_path="tiny:janus"))) == []
    errors = validate(str(_recipe(tmp_path, adapter="nope", model_name_or_path="tiny:janus")))
    assert any("adapter='nope' is not a registered architecture adapter" in error for error in errors)


def test_model_class_may_be_a_dotted_import_path():
    assert model_class_from_name("reca_hf.models.tiny_flow.TinyFlowModel") is TinyFlowModel
    assert model_class_from_name("reca_hf.models.tiny_flow:TinyFlowModel") is TinyFlowModel
    assert model_class_from_name("JanusForConditionalGeneration") is transformers.JanusForConditionalGeneration
    with pytest.raises(ValueError, match="model_class='reca_hf.models.nothing.Model' cannot be imported"):
        model_class_from_name("reca_hf.models.nothing.Model")


def test_loading_options_reach_from_pretrained(tmp_path, monkeypatch, make_args, shapes):
    folder = _saved_flow_folder(tmp_path / "model")
    calls = {}

    def spy(owner, key):
        original = owner.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            calls[key] = kwargs
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(from_pretrained))

    spy(TinyFlowModel, "model")
    spy(transformers.AutoProcessor, "processor")
    args = make_args(trust_remote_code=True, model_revision="main", attn_implementation="eager", max_steps=1)
    trainer = RecATrainer(str(folder), args=args, train_dataset=shapes)
    assert {k: calls["model"][k] for k in ("trust_remote_code", "revision", "attn_implementation")} == {
        "trust_remote_code": True, "revision": "main", "attn_implementation": "eager"}  # fmt: skip
    assert calls["processor"]["trust_remote_code"] is True and calls["processor"]["revision"] == "main"
    assert trainer.model.config._attn_implementation == "eager"
    calls.clear()
    load_model_and_processor(str(folder))
    assert calls["model"]["trust_remote_code"] is False and "attn_implementation" not in calls["model"]


@dataclasses.dataclass
class _LinearConfig:
    width: int = 3


class _Linear(torch.nn.Module):
    """A plain module without config_class: its config's class comes from the annotation of ``config``."""

    def __init__(self, config: _LinearConfig):
        super().__init__()
        self.config = config
        self.layer = torch.nn.Linear(config.width, 2)


def test_a_plain_module_folder_rebuilds_from_the_config_annotation_and_a_bad_config_warns(tmp_path, caplog):
    model = _Linear(_LinearConfig(width=5))
    assert save_module_config(model, tmp_path) == tmp_path / "config.json"
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    again = load_module(_Linear, str(tmp_path), torch.bfloat16)
    assert again.config == model.config and again.layer.weight.dtype == torch.bfloat16
    assert torch.equal(again.layer.weight, model.layer.weight.to(torch.bfloat16))
    model.config = types.SimpleNamespace(width=object())
    (tmp_path / "bad").mkdir()
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        assert save_module_config(model, tmp_path / "bad") is None
    assert "cannot be written as config.json" in caplog.text and not (tmp_path / "bad" / "config.json").exists()


@pytest.fixture
def my_umm(monkeypatch, fresh_registry):
    """The example's module, imported from examples/custom_umm (its adapter registers into a fresh registry)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "my_umm", raising=False)
    import my_umm

    yield my_umm
    sys.modules.pop("my_umm", None)


def test_a_plain_nn_module_model_trains_saves_and_reloads_through_the_trainer(my_umm, make_args, shapes, tmp_path):
    model, tokenizer = tiny_umm("my_umm")
    assert not isinstance(model, transformers.PreTrainedModel)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = make_args(max_steps=2, output_dir=str(tmp_path / "out"))
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    assert not torch.equal(model.head[0].weight, before["head.0.weight"])  # it trained
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["model_type"] == "my_umm"
    saved = load_file(out / "model.safetensors")
    reloaded, processor = load_model_and_processor(str(out))  # the adapter found again from config.json
    assert type(reloaded) is my_umm.MyUMM and reloaded.config == model.config
    state = reloaded.state_dict()
    assert state.keys() == model.state_dict().keys() == saved.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    adapter = get_adapter(reloaded, processor)
    batch = RecACollator(adapter, cond_dropout_prob=0.0)([shapes[i] for i in range(4)])
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    noise = LossNoise(3, timesteps=(0.5, 0.9))
    assert torch.equal(
        adapter.loss(reloaded.eval(), batch, noise=noise), adapter.loss(model.eval(), batch, noise=noise)
    )


@pytest.mark.slow
def test_a_plain_nn_module_model_resumes_from_its_checkpoint(my_umm, make_args, shapes, tmp_path):
    def run(resume):
        model, tokenizer = tiny_umm("my_umm")
        args = make_args(max_steps=4, save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "run"))
        RecATrainer(model, args=args, train_dataset=shapes, processing_class=tokenizer).train(
            resume_from_checkpoint=resume
        )
        return model.state_dict()

    straight = run(None)
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "config.json").read_text())["model_type"] == "my_umm"
    resumed = run(True)  # from checkpoint-2
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


def test_reca_validate_imports_the_example_adapter_from_beside_its_recipe(monkeypatch, fresh_registry):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_umm", raising=False)
    assert validate(str(EXAMPLE / "recipe.yaml")) == []
    assert str(EXAMPLE.resolve()) in sys.path and registry._REGISTRY["my_umm"].__module__ == "my_umm"
    sys.modules.pop("my_umm", None)


def test_the_custom_umm_example_is_one_short_file_with_its_adapter(my_umm):
    lines = (EXAMPLE / "my_umm.py").read_text().splitlines()
    assert len(lines) <= 200
    assert issubclass(my_umm.MyUMMAdapter, base.UMMAdapter) and registry._REGISTRY["my_umm"] is my_umm.MyUMMAdapter
    recipe = (EXAMPLE / "recipe.yaml").read_text()
    assert recipe.startswith("#") and "adapter: my_umm:MyUMMAdapter" in recipe


@pytest.mark.slow
def test_the_custom_umm_example_trains_with_reca_train_and_reloads(tmp_path, monkeypatch, fresh_registry, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the recipe's folder goes on it
    monkeypatch.delitem(sys.modules, "my_umm", raising=False)
    recipe, out = str(EXAMPLE / "recipe.yaml"), tmp_path / "run"
    main(["train", recipe, "--max_steps", "3", "--output_dir", str(out), "--logging_steps", "1"])
    for name in ("model.safetensors", "config.json", "trainer_state.json", "README.md", "reconstructions.png"):
        assert (out / name).is_file(), name
    assert "reconstruction_loss:" in capsys.readouterr().out
    assert validate(recipe) == []
    again = tmp_path / "again"
    main(["train", recipe, "--model_name_or_path", str(out), "--max_steps", "1", "--output_dir", str(again),
          "--num_reconstruction_images", "0"])  # fmt: skip
    trained = load_file(out / "model.safetensors")
    frozen = [k for k in trained if k.startswith(("vision.", "llm."))]
    assert frozen and all(torch.equal(load_file(again / "model.safetensors")[k], trained[k]) for k in frozen)
    sys.modules.pop("my_umm", None)
