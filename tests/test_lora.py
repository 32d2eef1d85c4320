"""LoRA: targets per mode, a frozen base, generation scoping, saving, loading, merging and publishing checks."""

import json
import logging
import re

import pytest
import torch
from peft import LoraConfig, PeftModel

from reca_hf import RecAConfig, RecATrainer, load_reca_adapter
from reca_hf.adapters import JanusAdapter, get_adapter
from reca_hf.testing import tiny_umm

GENERATION = r"model\.generation_(aligner\.(fc1|hidden_layers\.0)|head\.(proj_out|vision_head))"
LLM = r"model\.language_model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def _lora_size(model, pattern, r=16):
    """Parameters rank-r LoRA adds to the Linear layers whose full name matches ``pattern``."""
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]
    assert layers
    return sum(r * (m.in_features + m.out_features) for m in layers)


def _trainer(make_args, shapes, model=None, processor=None, peft_config=None, **overrides):
    if model is None:
        model, processor = tiny_umm("janus")
    values = dict(use_peft=True, learning_rate=2e-2, lora_dropout=0.0, collapse_action="off")
    args = make_args(**{**values, **overrides})
    return RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor, peft_config=peft_config)


def _batch(trainer, shapes):
    collator = trainer.data_collator
    rows = [{"image": shapes[i]["image"], "__reca_index__": i} for i in range(4)]
    return {k: v for k, v in collator(rows).items() if isinstance(v, torch.Tensor)}


def _loss(model, batch):
    model.eval()
    with torch.no_grad():
        return get_adapter(model).loss(model, batch)


def _text_logits(model, processor, shapes):
    inputs = processor(
        text=["<image_placeholder>\na red circle", "<image_placeholder>\nthe shape on the left"],
        images=[shapes[0]["image"], shapes[1]["image"]],
        return_tensors="pt",
        padding=True,
    )
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    """A "generation+llm" adapter trained for 4 steps (every LoRA B moved off zero) and saved, with its base."""
    tmp_path = tmp_path_factory.mktemp("trained")
    model, processor = tiny_umm("janus")
    args = RecAConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, save_strategy="no",
                      report_to="none", dataloader_pin_memory=False, num_reconstruction_images=0, seed=0,
                      use_peft=True, lora_target_modules="generation+llm", learning_rate=2e-2, lora_dropout=0.0,
                      collapse_action="off")  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    trainer.save_model()
    return trainer, tmp_path / "run"


@pytest.mark.parametrize(
    ("targets", "pattern"),
    [
        ("generation", GENERATION),
        ("generation+llm", f"{GENERATION}|{LLM}"),
        (["q_proj", "v_proj"], r"model\.language_model\.layers\.\d\.self_attn\.[qv]_proj"),
        (r"model\.generation_head\.vision_head", r"model\.generation_head\.vision_head"),
    ],
    ids=["generation", "generation+llm", "list", "regex"],
)
def test_trainable_parameters_per_mode(make_args, shapes, targets, pattern):
    trainer = _trainer(make_args, shapes, lora_target_modules=targets)
    base = tiny_umm("janus")[0]
    trainable = {n: p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name for name in trainable), trainable
    assert sum(trainable.values()) == _lora_size(base, pattern)
    table = trainer.parameter_table
    assert table["understanding"]["trainable"] == table["tokenizers"]["trainable"] == 0
    # A list never reaches the vision tower's own q_proj / v_proj.
    assert not any("vision_model" in name or "vqmodel" in name for name in trainable)


def test_lora_run_keeps_the_base_bitwise_and_skips_the_shared_llm_warning(make_args, shapes, caplog):
    model, processor = tiny_umm("janus")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        trainer = _trainer(make_args, shapes, model, processor, lora_target_modules="generation+llm")
    assert "image-to-text" not in caplog.text  # understanding cannot change, so no shared-LLM warning
    trainer.train()
    lora = {n: p for n, p in trainer.model.named_parameters() if ".lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    for name, parameter in trainer.model.get_base_model().named_parameters():
        if ".lora_" not in name:
            assert not parameter.requires_grad, name
            assert torch.equal(parameter, before[name.replace(".base_layer", "")]), name
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in lora.items())


def test_generation_llm_adapter_leaves_text_logits_bitwise_base(trained, shapes):
    trainer, folder = trained
    base, processor = tiny_umm("janus")
    expected = _text_logits(base, processor, shapes)
    assert torch.equal(_text_logits(trainer.model, processor, shapes), expected)
    loaded = load_reca_adapter(folder, tiny_umm("janus")[0])
    assert torch.equal(_text_logits(loaded, processor, shapes), expected)
    # ... while the generation path does use the LLM update, and without the scoping text would change too.
    batch = _batch(trainer, shapes)
    assert not torch.allclose(_loss(loaded, batch), _loss(base, batch))
    from reca_hf.lora import unscope

    assert not torch.equal(_text_logits(unscope(loaded), processor, shapes), expected)


def test_save_and_load_round_trip_gives_the_same_loss(trained, shapes):
    trainer, folder = trained
    for name in ("adapter_model.safetensors", "adapter_config.json", "reca_adapter.json"):
        assert (folder / name).is_file(), name
    settings = json.loads((folder / "reca_adapter.json").read_text())
    assert settings["adapter"] == "janus" and settings["lora_target_modules"] == "generation+llm"
    assert settings["generation_scoped"] is True
    assert (settings["condition_resolution"], settings["generation_resolution"], settings["num_prompts"]) == (
        32,
        32,
        385,
    )
    batch = _batch(trainer, shapes)
    expected = _loss(trainer.model, batch)
    loaded = load_reca_adapter(str(folder), base_model=tiny_umm("janus")[0])
    assert isinstance(loaded, PeftModel)
    assert torch.equal(_loss(loaded, batch), expected)


def test_generation_adapter_round_trips_through_plain_peft_and_merges(make_args, shapes, tmp_path):
    trainer = _trainer(make_args, shapes, lora_target_modules="generation")
    trainer.train()
    trainer.save_model()
    folder = tmp_path / "run"
    batch = _batch(trainer, shapes)
    expected = _loss(trainer.model, batch)
    plain = PeftModel.from_pretrained(tiny_umm("janus")[0], str(folder))
    assert torch.equal(_loss(plain, batch), expected)
    merged = load_reca_adapter(folder, tiny_umm("janus")[0], merge=True)
    assert not isinstance(merged, PeftModel)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_loss(merged, batch), expected, rtol=1e-5, atol=1e-6)


def test_merging_a_generation_llm_adapter_keeps_generation_and_says_what_it_costs(trained, shapes, caplog):
    trainer, folder = trained
    batch = _batch(trainer, shapes)
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        merged = load_reca_adapter(folder, tiny_umm("janus")[0], merge=True)
    assert "understanding" in caplog.text
    torch.testing.assert_close(_loss(merged, batch), _loss(trainer.model, batch), rtol=1e-5, atol=1e-6)


def test_hub_id_of_a_locally_loaded_base(make_args, shapes, tmp_path):
    model, processor = tiny_umm("janus")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")

    def train(**overrides):
        trainer = RecATrainer(str(tmp_path / "base"), args=make_args(use_peft=True, max_steps=1, **overrides),
                              train_dataset=shapes)  # fmt: skip
        trainer.train()
        trainer.save_model()
        return json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]

    # No hub id given: the local folder is recorded (the adapter works here) and publishing is refused.
    assert train() == str(tmp_path / "base")
    assert isinstance(load_reca_adapter(tmp_path / "run"), PeftModel)  # the base found from the recorded folder
    with pytest.raises(ValueError, match="base_model_id"):
        RecATrainer(str(tmp_path / "base"), args=make_args(use_peft=True, push_to_hub=True), train_dataset=shapes)
    from reca_hf.lora import check_publishable

    with pytest.raises(ValueError, match="not a Hub id"):
        check_publishable(tmp_path / "run")
    # With base_model_id the adapter records the hub id, and may be published.
    assert train(base_model_id="deepseek-community/Janus-Pro-1B") == "deepseek-community/Janus-Pro-1B"
    check_publishable(tmp_path / "run")


def test_explicit_peft_config_wins_and_cannot_reach_the_vision_tower(make_args, shapes):
    config = LoraConfig(r=4, target_modules=["q_proj", "proj_out"])
    trainer = _trainer(make_args, shapes, peft_config=config, lora_target_modules="generation+llm")
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("generation_head.proj_out" in n for n in names) and any("self_attn.q_proj" in n for n in names)
    assert not any("vision_model" in n or "vqmodel" in n or "mlp" in n for n in names)
    assert config.exclude_modules is None  # the caller's config is not modified


def test_error_cases(make_args, shapes, monkeypatch):
    with pytest.raises(TypeError, match="PeftConfig"):
        _trainer(make_args, shapes, peft_config={"r": 8})
    peft_model = _trainer(make_args, shapes).model
    with pytest.raises(ValueError, match="merge"):
        _trainer(make_args, shapes, peft_model, tiny_umm("janus")[1], peft_config=LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"lora_target_modules=.*matches no layer"):
        _trainer(make_args, shapes, lora_target_modules=r"model\.no_such_module")
    with pytest.raises(ValueError, match="lora_target_modules"):
        _trainer(make_args, shapes, lora_target_modules=r"model\.vision_model\..*")  # protected, so no match
    # An architecture whose image tokens share the LLM's embeddings and head (Emu3) has no generation-only layer.
    monkeypatch.setattr(JanusAdapter, "lora_generation_targets", ())
    with pytest.raises(ValueError, match=r"no generation-only Linear.*'generation\+llm'"):
        _trainer(make_args, shapes, lora_target_modules="generation")


def test_config_fields_are_validated(tmp_path):
    with pytest.raises(ValueError) as error:
        RecAConfig(output_dir=str(tmp_path), use_peft=True, lora_r=0, lora_dropout=1.5,
                   lora_target_modules="(", base_model_id=str(tmp_path))  # fmt: skip
    for field in ("lora_r=0", "lora_dropout=1.5", "lora_target_modules='('", "base_model_id="):
        assert field in str(error.value)
    args = RecAConfig(output_dir=str(tmp_path), use_peft=True, lora_target_modules=("q_proj", "v_proj"))
    assert args.lora_target_modules == ["q_proj", "v_proj"]


def test_activation_checkpointing_gives_the_same_gradients(make_args, shapes):
    def grad_norm(**overrides):
        trainer = _trainer(make_args, shapes, lora_target_modules="generation+llm", max_steps=1, learning_rate=0.0,
                           cond_dropout_prob=0.0, **overrides)  # fmt: skip
        trainer.train()
        return trainer.state.log_history[0]["grad_norm"]

    plain = grad_norm()
    assert plain > 0
    assert grad_norm(activation_checkpointing=True) == pytest.approx(plain, rel=1e-4)
    reentrant = {"use_reentrant": True}
    assert grad_norm(activation_checkpointing=True, activation_checkpointing_kwargs=reentrant) == pytest.approx(
        plain, rel=1e-4
    )


def test_lora_recipe_trains_validates_and_writes_an_adapter_card(tmp_path, capsys):
    from reca_hf.cli import main

    out = tmp_path / "demo"
    main(["train", "recipes/janus/tiny_demo_lora.yaml", "--max_steps", "2", "--output_dir", str(out),
          "--num_reconstruction_images", "0"])  # fmt: skip
    for name in ("adapter_model.safetensors", "adapter_config.json", "reca_adapter.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "load_reca_adapter" in card
    model = load_reca_adapter(out)  # the recorded base is 'tiny:janus', rebuilt in code
    assert isinstance(model, PeftModel)
    main(["validate", "recipes/janus/tiny_demo_lora.yaml"])
    assert "OK" in capsys.readouterr().out


def test_emu3_has_no_generation_only_layers_and_is_told_what_to_use(make_args, shapes, caplog):
    model, processor = tiny_umm("emu3")
    with pytest.raises(ValueError, match=r"no generation-only Linear layers.*'generation\+llm'"):
        _trainer(make_args, shapes, model, processor, lora_target_modules="generation")
    # The suggested mode works, unscoped: one forward serves both paths, which the trainer says.
    with caplog.at_level("WARNING", logger="reca_hf.lora"):
        trainer = _trainer(make_args, shapes, model, processor, lora_target_modules="generation+llm")
    assert "cannot be switched off for understanding" in caplog.text
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(
        re.search(r"text_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_", n) for n in trainable
    )  # that it trains and saves: the adapter battery's short LoRA run (tests/test_adapters.py)
    targets = r"model\.text_model\.layers\.\d+\.self_attn\.[qkvo]_proj"  # a regex of the user's own also works
    trainer = _trainer(make_args, shapes, tiny_umm("emu3")[0], processor, lora_target_modules=targets)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"text_model\.layers\.\d+\.self_attn\.[qkvo]_proj\.lora_", n) for n in trainable)


def test_a_loaded_adapter_trains_further_with_its_base_frozen(trained, make_args, shapes):
    _, folder = trained
    model = load_reca_adapter(folder, tiny_umm("janus")[0])
    trainer = RecATrainer(model, args=make_args(max_steps=1, collapse_action="off"), train_dataset=shapes,
                          processing_class=tiny_umm("janus")[1])  # fmt: skip
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    trainer.train()


def test_image_to_text_loss_goes_through_the_scoped_text_path(trained, shapes):
    """The adapter's image-to-text loss runs the model's text path, so under a "generation+llm" LoRA it is the base
    model's loss exactly (as the saved adapter's text output is), and image-to-text data cannot train the LoRA
    through a path that is off at inference. Without the scoping it would differ."""
    trainer, folder = trained
    base, processor = tiny_umm("janus")
    rows = [{"image": shapes[i]["image"], "caption": shapes[i]["caption"], "__reca_index__": i,
             "__reca_task__": "image_to_text"} for i in range(4)]  # fmt: skip
    batch = trainer.data_collator(rows)["image_to_text"]
    adapter = get_adapter(base)

    def text_loss(model):
        model.eval()
        with torch.no_grad():
            return adapter.image_to_text_loss(model, batch)

    expected = text_loss(base)
    loaded = load_reca_adapter(folder, tiny_umm("janus")[0])
    assert torch.equal(text_loss(trainer.model), expected)
    assert torch.equal(text_loss(loaded), expected)
    from reca_hf.lora import unscope

    assert not torch.equal(text_loss(unscope(loaded)), expected)
