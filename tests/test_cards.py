"""Model cards: rendering from run metadata (pure), the loss plot, what a run writes, and `reca card`."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from reca_hf import RecAConfig, RecATrainer
from reca_hf.cards import CITATION, render_model_card
from reca_hf.cli import main
from reca_hf.data import synthetic_shapes
from reca_hf.hub import loss_series, render_run_card, write_loss_plot
from reca_hf.testing import tiny_umm

SETTINGS = {"architecture adapter": "janus", "condition resolution": 384, "task mix": "reconstruction 100%"}


def _metadata(card) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


def _render(**overrides):
    values = dict(model_name="janus-pro-1b-reca", base_model="deepseek-community/Janus-Pro-1B", architecture="janus",
                  model_class="JanusForConditionalGeneration", settings=SETTINGS, tags=["custom"],
                  repo_id="you/janus-pro-1b-reca", datasets=["you/images"])  # fmt: skip
    return render_model_card(**{**values, **overrides})


def test_full_model_card_metadata_and_body():
    card = _render(license="mit", eval_results={"GenEval": 0.85, "DPGBench": 84.2}, loss_plot="training_loss.png",
                   grid_file="reconstructions.png", parameter_table={"generation": {"trainable": 5, "frozen": 0}})  # fmt: skip
    meta = _metadata(card)
    assert meta["base_model"] == "deepseek-community/Janus-Pro-1B" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["custom", "janus", "reca", "text-to-image", "unified-multimodal"]
    assert meta["datasets"] == ["you/images"] and meta["pipeline_tag"] == "any-to-any" and meta["license"] == "mit"
    results = meta["model-index"][0]["results"]
    assert [(r["dataset"]["name"], r["metrics"][0]["value"]) for r in results] == [
        ("GenEval", 0.85),
        ("DPGBench", 84.2),
    ]
    text = card.text
    assert "after **RecA** (Reconstruction Alignment" in text
    assert "| condition resolution | 384 |" in text and "| task mix | reconstruction 100% |" in text
    assert "| generation | 5 | 0 |" in text
    assert "![training loss per step](training_loss.png)" in text and "(reconstructions.png)" in text
    assert "| GenEval | 0.85 |" in text and "| DPGBench | 84.2 |" in text
    assert 'JanusForConditionalGeneration.from_pretrained("you/janus-pro-1b-reca")' in text
    assert 'generate(**inputs, generation_mode="image"' in text  # the usage generates an image
    assert "- transformers: " in text and CITATION in text


def test_optional_sections_are_left_out():
    card = _render(base_model="/some/local/folder", datasets=None)
    meta = _metadata(card)
    assert "base_model" not in meta and "datasets" not in meta and "model-index" not in meta and "license" not in meta
    for absent in ("## Training loss", "## Reconstructions", "## Evaluation", "## What was trained"):
        assert absent not in card.text


@pytest.mark.parametrize("scoped", [False, True])
def test_adapter_card(scoped):
    card = _render(
        lora={"lora_target_modules": "generation+llm" if scoped else "generation", "generation_scoped": scoped}
    )
    meta = _metadata(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "deepseek-community/Janus-Pro-1B"
    assert "LoRA adapter for [deepseek-community/Janus-Pro-1B]" in card.text
    assert 'load_reca_adapter("you/janus-pro-1b-reca")' in card.text
    assert 'AutoProcessor.from_pretrained("deepseek-community/Janus-Pro-1B")' in card.text
    assert ("PeftModel.from_pretrained(JanusForConditionalGeneration" in card.text) is not scoped
    assert ("text\noutputs stay exactly the base model's" in card.text) is scoped


def test_loss_plot_from_the_log_history(tmp_path):
    history = [
        {"step": 1, "loss": 4.0, "reconstruction_loss": 4.1, "image_to_text_loss": 3.9},
        {"step": 2, "loss": 3.0, "reconstruction_loss": 3.2, "grad_norm": 1.0},
        {"step": 2, "eval_reconstruction_loss": 3.5},
        {"step": 2, "train_loss": 3.5, "train_runtime": 1.0},
    ]
    series = loss_series(history)
    assert set(series) == {"loss", "reconstruction_loss", "image_to_text_loss", "eval_reconstruction_loss"}
    assert series["reconstruction_loss"] == [(1.0, 4.1), (2.0, 3.2)]
    path = write_loss_plot(history, tmp_path / "training_loss.png")
    assert Image.open(path).format == "PNG" and Image.open(path).size == (640, 360)
    assert write_loss_plot([{"step": 1, "grad_norm": 1.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_run_writes_its_card_from_metadata_and_reca_card_renders_it_again(make_args, shapes, tmp_path, capsys):
    model, processor = tiny_umm("janus")
    args = make_args(max_steps=2, save_strategy="steps", save_steps=2, collapse_action="off", dataset_name="you/shapes")
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    assert "reconstruction 100% (0 samples)" == trainer.run_settings()["task mix"]
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    trainer.create_model_card(license="apache-2.0")
    out = tmp_path / "run"
    run = json.loads((out / "reca_run.json").read_text())
    assert run["settings"]["task mix"] == "reconstruction 100% (8 samples)" and run["license"] == "apache-2.0"
    assert run["datasets"] == ["you/shapes"] and run["architecture"] == "janus"
    for folder in (out, out / "checkpoint-2"):  # the checkpoint got its card before it was (or would be) pushed
        assert {"README.md", "training_loss.png", "reca_run.json"} <= {p.name for p in folder.iterdir()}
    written = (out / "README.md").read_text()
    assert written == str(render_run_card(out))  # the card is a function of the files only

    (out / "README.md").unlink()
    (out / "training_loss.png").unlink()
    main(["card", str(out), "--eval-results", '{"GenEval": 0.5}'])
    assert "Wrote" in capsys.readouterr().out
    assert (out / "training_loss.png").is_file()
    text = (out / "README.md").read_text()
    assert "| GenEval | 0.5 |" in text and text.replace("| GenEval | 0.5 |", "") != written
    assert _metadata(text)["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    with pytest.raises(SystemExit, match="reca_run.json"):
        main(["card", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"eval_results\['GenEval'\]"):
        main(["card", str(out), "--eval-results", '{"GenEval": "high"}'])


def test_config_hub_fields(tmp_path):
    args = RecAConfig(output_dir=str(tmp_path), eval_results='{"GenEval": 0.85}', hub_optional=True)
    assert args.eval_results == {"GenEval": 0.85} and args.hub_optional
    with pytest.raises(ValueError) as error:
        RecAConfig(output_dir=str(tmp_path), eval_results={"GenEval": "high", "": 1})
    assert "eval_results['GenEval']='high'" in str(error.value) and "benchmark name ''" in str(error.value)
    with pytest.raises(ValueError, match="eval_results=.*not valid JSON"):
        RecAConfig(output_dir=str(tmp_path), eval_results="{GenEval")
    with pytest.raises(ValueError, match="eval_results=.*mapping"):
        RecAConfig(output_dir=str(tmp_path), eval_results=[0.85])


def _python_blocks(text: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.mark.parametrize("arch", ["janus", "emu3", "openuni"])
def test_the_rendered_cards_snippet_generates_an_image(arch, make_args, shapes, tmp_path, monkeypatch):
    """The card of a saved tiny run: its first code block, with the repo id replaced by the run folder, runs and
    writes an image (Janus: transformers' generate(generation_mode="image"); the others: reca_hf's sampler)."""
    model, processor = tiny_umm(arch)
    args = make_args(max_steps=1, collapse_action="off", hub_model_id="you/tiny-reca")
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "run"
    text = (out / "README.md").read_text()
    snippet = _python_blocks(text)[0]
    assert '"you/tiny-reca"' in snippet and ("generation_mode" in snippet) is (arch == "janus")
    if arch == "openuni":  # a shorter sampler on a CPU: the snippet's own call, with fewer steps
        snippet = snippet.replace("seed=0,", "seed=0, num_inference_steps=2,")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace('"you/tiny-reca"', repr(str(out))), "card", "exec"), {})
    image = Image.open(tmp_path / "sample.png")
    size = 32
    assert image.size == (size, size) and len(set(image.tobytes())) > 1


def test_card_metadata_names_every_training_dataset_the_license_and_eval_result_files(make_args, shapes, tmp_path):
    model, processor = tiny_umm("janus")
    args = make_args(max_steps=1, collapse_action="off", dataset_name="you/shapes", i2t_dataset_name="you/captions",
                     license="apache-2.0", base_model_id="deepseek-community/Janus-Pro-1B",
                     eval_results={"GenEval": {"value": 0.8, "dataset_id": "you/geneval", "task_id": "overall"},
                                   "DPG-Bench": 80.1})  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, i2t_dataset=shapes, processing_class=processor)
    trainer.create_model_card()
    out = tmp_path / "run"
    meta = _metadata((out / "README.md").read_text())
    assert meta["datasets"] == ["you/shapes", "you/captions"] and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "deepseek-community/Janus-Pro-1B" and meta["pipeline_tag"] == "any-to-any"
    assert [r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]] == [0.8, 80.1]
    # The Hub's current eval-results format, for the entry that names its benchmark dataset.
    assert sorted(p.name for p in (out / ".eval_results").iterdir()) == ["geneval.yaml"]
    assert yaml.safe_load((out / ".eval_results" / "geneval.yaml").read_text()) == [
        {"dataset": {"id": "you/geneval", "task_id": "overall"}, "value": 0.8}
    ]
    main(["card", str(out), "--license", "mit"])
    assert _metadata((out / "README.md").read_text())["license"] == "mit"
    assert json.loads((out / "reca_run.json").read_text())["license"] == "mit"


def test_base_model_is_found_for_local_folders(tmp_path):
    from reca_hf.cards import known_base_model

    cache = tmp_path / "hub" / "models--deepseek-community--Janus-Pro-1B" / "snapshots" / "abc123"
    cache.mkdir(parents=True)
    assert known_base_model(str(cache)) == "deepseek-community/Janus-Pro-1B"
    run = tmp_path / "earlier-run"
    run.mkdir()
    (run / "reca_run.json").write_text(json.dumps({"base_model": "deepseek-community/Janus-Pro-7B"}))
    assert known_base_model(str(run)) == "deepseek-community/Janus-Pro-7B"
    assert known_base_model(str(tmp_path)) == str(tmp_path) and known_base_model("tiny:janus") == "tiny:janus"


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_an_adapter_cards_snippet_applies_the_adapter_and_generates(make_args, shapes, tmp_path, monkeypatch):
    model, processor = tiny_umm("janus")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    args = make_args(max_steps=1, use_peft=True, collapse_action="off", hub_model_id="you/tiny-lora")
    trainer = RecATrainer(str(tmp_path / "base"), args=args, train_dataset=shapes)
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "run"
    snippet = _python_blocks((out / "README.md").read_text())[0]
    assert "load_for_generation" in snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace('"you/tiny-lora"', repr(str(out))), "card", "exec"), {})
    assert Image.open(tmp_path / "sample.png").size == (32, 32)


def test_reca_push_license(hub, make_args, shapes, tmp_path):
    model, processor = tiny_umm("janus")
    trainer = RecATrainer(model, args=make_args(max_steps=1, collapse_action="off"), train_dataset=shapes,
                          processing_class=processor)  # fmt: skip
    trainer.save_model()
    trainer.create_model_card()
    main(["push", str(tmp_path / "run"), "--repo-id", "loopback-user/tiny-reca", "--license", "apache-2.0"])
    from huggingface_hub import ModelCard

    assert ModelCard.load("loopback-user/tiny-reca").data.license == "apache-2.0"


def test_the_loss_axis_names_the_adapters_loss(tmp_path, monkeypatch):
    from reca_hf.hub import loss_axis_label

    assert loss_axis_label("flow", ["reconstruction_loss"]) == "flow-matching MSE"
    assert loss_axis_label("flow", ["reconstruction_loss", "image_to_text_loss"]) == (
        "reconstruction: flow-matching MSE; image-to-text: cross-entropy (nats)"
    )
    assert loss_axis_label("autoregressive_tokens", ["image_to_text_loss"]) == "cross-entropy of the image tokens (nats)"
    assert loss_axis_label(None, ["loss"]) == "loss"  # a record from before the kind was kept claims no unit
    labels = []
    monkeypatch.setattr("matplotlib.axes.Axes.set_ylabel", lambda self, text, **kwargs: labels.append(text))
    model, processor = tiny_umm("flow")
    args = RecAConfig(output_dir=str(tmp_path / "run"), max_steps=2, logging_steps=1, report_to="none",
                      save_strategy="no", num_reconstruction_images=0, collapse_action="off",
                      per_device_train_batch_size=4, dataloader_pin_memory=False)  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=synthetic_shapes(8, size=32), processing_class=processor)
    trainer.train()
    trainer.save_model()
    assert json.loads((tmp_path / "run" / "reca_run.json").read_text())["generation_target"] == "flow"
    assert labels and labels[-1] == "flow-matching MSE"


def test_a_card_written_at_a_checkpoint_says_the_run_had_not_ended(make_args, shapes, tmp_path):
    """A run that dies after a checkpoint leaves a card saying where it was, not a finished run's card; a run
    that ends and saves says the steps it trained."""
    from transformers import TrainerCallback

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("the machine went away")

    model, processor = tiny_umm("janus")
    args = make_args(max_steps=4, save_strategy="steps", save_steps=2, collapse_action="off")
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor, callbacks=[Die()])
    with pytest.raises(RuntimeError, match="went away"):
        trainer.train()
    settings = json.loads((tmp_path / "run" / "reca_run.json").read_text())["settings"]
    assert settings["steps"].startswith("2 of 4 (written during training")
    assert "2 of 4 (written during training" in (tmp_path / "run" / "README.md").read_text()
    finished = RecATrainer(model, args=make_args(max_steps=2, collapse_action="off"), train_dataset=shapes,
                           processing_class=processor)  # fmt: skip
    finished.train()
    finished.save_model()
    assert json.loads((tmp_path / "run" / "reca_run.json").read_text())["settings"]["steps"] == 2


def test_the_card_states_the_final_losses_and_the_detectors_verdict(make_args, shapes, tmp_path):
    model, processor = tiny_umm("janus")
    args = make_args(max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=4, collapse_probe_steps=2,
                     collapse_probe_images=2, num_reconstruction_images=0)  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, eval_dataset=shapes.select(range(4)),
                          processing_class=processor)  # fmt: skip
    trainer.train()
    trainer.save_model()
    settings = json.loads((tmp_path / "run" / "reca_run.json").read_text())["settings"]
    last = [log for log in trainer.state.log_history if "reconstruction_loss" in log][-1]
    assert settings["final training loss"] == f"reconstruction {last['reconstruction_loss']:.4g} (step 4)"
    assert settings["final eval loss"].startswith("reconstruction ") and settings["final eval loss"].endswith("(step 4)")
    assert settings["collapse detector"].startswith("did not fire: ")
    assert "of the predictions followed a swapped-in condition" in settings["collapse detector"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "did not fire" in card and "final training loss" in card
    probe = json.loads((tmp_path / "run" / "reca_run.json").read_text())["collapse_probe"]
    assert probe["metric"] == "swap_copy_rate" and probe["threshold"] == 0.5 and probe["fired_at_step"] is None
    assert Image.open(tmp_path / "run" / "collapse_probe.png").format == "PNG"
    assert "## Collapse probe" in card and "(collapse_probe.png)" in card and "swap_copy_rate: the share" in card
    assert f'from_pretrained("{tmp_path / "run"}"' in card  # a card not pushed yet: its snippet loads the folder
    off = RecATrainer(model, args=make_args(max_steps=1, collapse_action="off"), train_dataset=shapes,
                      processing_class=processor)  # fmt: skip
    assert off.run_settings()["collapse detector"] == "off"
