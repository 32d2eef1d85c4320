"""Pushing runs to a loopback Hub through the real clients: the Trainer's pushes, their failures, `reca push`."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import threading

import pytest
import torch
import transformers.trainer

from reca_hf import RecATrainer, load_reca_adapter
from reca_hf.cli import main
from reca_hf.hub import HubPushError, rotate_checkpoints
from reca_hf.testing import tiny_umm

REPO = "loopback-user/tiny-reca"
SECRET = "hf_reca_secret_token_0123456789"


def _trainer(make_args, shapes, model=None, **overrides):
    if model is None:
        model, processor = tiny_umm("janus")
    else:
        processor = tiny_umm("janus")[1]
    values = dict(push_to_hub=True, hub_model_id=REPO, collapse_action="off", max_steps=2, logging_steps=1)
    return RecATrainer(
        model, args=make_args(**{**values, **overrides}), train_dataset=shapes, processing_class=processor
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    expected = a.state_dict()
    return all(torch.equal(tensor, expected[name]) for name, tensor in b.state_dict().items())


def test_push_a_full_model_and_load_it_back(hub, make_args, shapes, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import JanusForConditionalGeneration

    trainer = _trainer(make_args, shapes, save_strategy="steps", save_steps=2, hub_private_repo=True,
                       num_reconstruction_images=2, eval_results={"GenEval": 0.85})  # fmt: skip
    trainer.train()
    trainer.save_model()  # the final push
    assert hub.repo(REPO).private
    titles = [commit.title for commit in hub.commits(REPO)]
    assert titles[:2] == ["Model save", "Training in progress, step 2"]
    files = hub.files(REPO)
    for name in ("model.safetensors", "config.json", "README.md", "training_loss.png", "reconstructions.png",
                 "reca_run.json", "reca_parameters.json"):  # fmt: skip
        assert name in files, name
    assert not any(name.startswith("checkpoint-") for name in files)
    assert _same_weights(trainer.model, JanusForConditionalGeneration.from_pretrained(REPO))

    card = ModelCard.load(REPO)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "any-to-any"
    assert {"reca", "unified-multimodal", "text-to-image", "janus"} <= set(card.data.tags)
    assert card.data.base_model is None  # a tiny model built in code has no Hub id
    assert card.data.eval_results[0].dataset_name == "GenEval" and card.data.eval_results[0].metric_value == 0.85
    assert "![training loss per step](training_loss.png)" in card.text and "reconstructions.png" in card.text
    assert f'from_pretrained("{REPO}")' in card.text
    # The checkpoint carried its own card, written before its push.
    assert (tmp_path / "run" / "checkpoint-2" / "README.md").is_file()
    assert (tmp_path / "run" / "checkpoint-2" / "training_loss.png").is_file()


@pytest.mark.filterwarnings("ignore::UserWarning:peft")  # peft looks the base config up to compare vocabularies
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_push_a_lora_adapter_and_apply_it(hub, make_args, shapes):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import JanusForConditionalGeneration

    base, processor = tiny_umm("janus")
    base.push_to_hub("loopback-user/tiny-janus")
    processor.push_to_hub("loopback-user/tiny-janus")
    trainer = _trainer(make_args, shapes, use_peft=True, base_model_id="loopback-user/tiny-janus", learning_rate=2e-2,
                       lora_dropout=0.0, hub_model_id="loopback-user/tiny-reca-lora")  # fmt: skip
    trainer.train()
    trainer.push_to_hub()
    files = hub.files("loopback-user/tiny-reca-lora")
    assert {"adapter_model.safetensors", "adapter_config.json", "reca_adapter.json", "README.md"} <= set(files)
    card = ModelCard.load("loopback-user/tiny-reca-lora")
    assert card.data.library_name == "peft" and card.data.base_model == "loopback-user/tiny-janus"
    assert 'load_reca_adapter("loopback-user/tiny-reca-lora")' in card.text

    head = "model.generation_head.vision_head"
    x = torch.randn(3, trainer.model.get_submodule("base_model.model." + head).in_features)
    expected = trainer.model.get_submodule("base_model.model." + head)(x)
    for loaded in (
        load_reca_adapter("loopback-user/tiny-reca-lora"),
        PeftModel.from_pretrained(
            JanusForConditionalGeneration.from_pretrained("loopback-user/tiny-janus"), "loopback-user/tiny-reca-lora"
        ),
    ):
        layer = loaded.get_submodule("base_model.model." + head)
        assert torch.allclose(layer(x), expected, atol=1e-6)
        assert not torch.allclose(layer(x), layer.base_layer(x))  # the adapter is applied


def test_a_failed_checkpoint_push_is_surfaced_kept_and_made_good_by_the_final_push(
    hub, make_args, shapes, tmp_path, caplog, instant_retries
):
    trainer = _trainer(make_args, shapes, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=1,
                       hub_always_push=True)  # fmt: skip
    hub.fail_next("commit", status=500, times=6)  # the first checkpoint push: one try and 5 retries
    stock_rotation, seen_inside_a_save = transformers.trainer.rotate_checkpoints, []
    save_model = trainer.save_model

    def recording_save_model(*args, **kwargs):  # runs inside Trainer._save_checkpoint, before its rotation
        seen_inside_a_save.append(transformers.trainer.rotate_checkpoints)
        return save_model(*args, **kwargs)

    trainer.save_model = recording_save_model
    with caplog.at_level(logging.ERROR, logger="reca_hf"):
        trainer.train()
    # The unpushed checkpoint is spared without replacing anything in transformers' modules.
    assert len(seen_inside_a_save) == 4 and all(f is stock_rotation for f in seen_inside_a_save)
    assert trainer.args.save_total_limit == 1
    assert trainer.hub_push_failures == 1
    assert "Background Hub push of checkpoint-1 failed" in caplog.text and "500" in caplog.text
    run = tmp_path / "run"
    # save_total_limit=1 keeps checkpoint-1 (and any checkpoint whose push was still running at the next save).
    kept = sorted(p.name for p in run.glob("checkpoint-*"))
    assert kept[0] == "checkpoint-1" and kept[-1] == "checkpoint-4"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        trainer.push_to_hub()
    assert "1 background push(es)" in caplog.text and "the final push sent their content" in caplog.text
    assert hub.commits(REPO)[0].title == "End of training" and "model.safetensors" in hub.files(REPO)
    assert not trainer._hub_pushes.unpushed


def test_rotation_spares_unpushed_checkpoints(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    with caplog.at_level(logging.WARNING, logger="reca_hf"):
        rotate_checkpoints(str(tmp_path), 1, None, {str(tmp_path / "checkpoint-2")}, use_mtime=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert "Keeping" in caplog.text and "checkpoint-2" in caplog.text
    rotate_checkpoints(str(tmp_path), 1, None, set(), use_mtime=False)  # pushed at last: rotation takes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_all_checkpoints_strategy_retries_the_failed_checkpoint_folder(hub, make_args, shapes, instant_retries):
    trainer = _trainer(make_args, shapes, save_strategy="steps", save_steps=1, hub_strategy="all_checkpoints",
                       hub_always_push=True)  # fmt: skip
    # Each checkpoint pushes the model files, then its folder: fail the folder of checkpoint-1.
    hub.fail_next("commit", status=None)
    hub.fail_next("commit", status=500, times=6)
    trainer.train()
    assert trainer.hub_push_failures == 1
    assert not any(name.startswith("checkpoint-1/") for name in hub.files(REPO))
    trainer.push_to_hub()
    files = hub.files(REPO)
    assert "checkpoint-1/model.safetensors" in files and "checkpoint-2/model.safetensors" in files
    assert "checkpoint-1 (retried push)" in [commit.title for commit in hub.commits(REPO)]


def test_a_failed_final_push_keeps_everything_and_names_reca_push(hub, make_args, shapes, tmp_path, instant_retries):
    trainer = _trainer(make_args, shapes)
    trainer.train()
    hub.fail_next("commit", status=500, times=6)
    with pytest.raises(HubPushError, match=r"reca push .*run --repo-id loopback-user/tiny-reca") as failed:
        trainer.push_to_hub()
    assert "Nothing is lost" in str(failed.value)
    out = tmp_path / "run"
    assert {"model.safetensors", "README.md", "reca_run.json"} <= {p.name for p in out.iterdir()}
    assert "model.safetensors" not in hub.files(REPO)

    main(["push", str(out), "--repo-id", REPO])  # the retry the message names
    assert "model.safetensors" in hub.files(REPO)


def test_hub_optional_trains_through_an_unreachable_hub(hub, make_args, shapes, tmp_path, caplog):
    from huggingface_hub.utils import httpx

    with hub.refused():
        with pytest.raises(httpx.ConnectError):  # the stock behaviour: no Hub, no Trainer
            _trainer(make_args, shapes)
        with caplog.at_level(logging.WARNING, logger="reca_hf"):
            trainer = _trainer(make_args, shapes, hub_optional=True, save_strategy="steps", save_steps=1)
        assert "The Hub is unreachable" in caplog.text and trainer.hub_model_id is None
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="reca_hf"):
            trainer.train()  # each checkpoint retries creating the repo, fails, is counted and kept
            assert trainer.hub_push_failures == 2 and "creating the repo" in caplog.text
            assert trainer.push_to_hub() is None  # hub_optional: logged, not raised
        assert "reca push" in caplog.text
        assert not hub.repo_exists(REPO)
    out = tmp_path / "run"
    assert {"checkpoint-1", "checkpoint-2", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    trainer.push_to_hub()  # the Hub is back: the repo is created and everything is pushed
    assert "model.safetensors" in hub.files(REPO) and hub.repo_exists(REPO)


def test_hub_optional_recovers_when_the_hub_comes_back_during_training(hub, make_args, shapes):
    with hub.refused():
        trainer = _trainer(make_args, shapes, hub_optional=True, save_strategy="steps", save_steps=2)
    trainer.train()  # the checkpoint push creates the repo
    assert trainer.hub_model_id == REPO and trainer.hub_push_failures == 0
    assert "Training in progress, step 2" in [commit.title for commit in hub.commits(REPO)]


def test_the_token_is_in_no_file_and_no_log(hub, make_args, shapes, tmp_path, caplog, capsys):
    hub.tokens.add(SECRET)
    with caplog.at_level(logging.DEBUG):
        trainer = _trainer(make_args, shapes, hub_token=SECRET, save_strategy="steps", save_steps=1,
                           hub_strategy="checkpoint", num_reconstruction_images=2)  # fmt: skip
        trainer.train()
        trainer.save_state()
        trainer.push_to_hub()
        main(["card", str(tmp_path / "run")])
    assert trainer.args.hub_token == SECRET  # still used for pushing
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    for content in hub.files(REPO).values():
        assert SECRET.encode() not in content
    assert "last-checkpoint/training_args.bin" in hub.files(REPO)
    assert SECRET not in caplog.text and SECRET not in "".join(capsys.readouterr())
    saved = torch.load(tmp_path / "run" / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.hub_model_id == REPO


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_reca_push_full_and_adapter_only(hub, make_args, shapes, tmp_path, capsys):
    trainer = _trainer(make_args, shapes, push_to_hub=False, use_peft=True, base_model_id="org/base-model",
                       validation_prompts=["a red circle", "a blue square"])  # fmt: skip
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    trainer.create_model_card()
    out = tmp_path / "run"

    main(["push", str(out), "--repo-id", "loopback-user/full", "--private", "--eval-results", '{"DPGBench": 84.2}'])
    assert "Pushed" in capsys.readouterr().out and hub.repo("loopback-user/full").private
    full = hub.files("loopback-user/full")
    assert {"adapter_model.safetensors", "processor_config.json", "training_args.bin", "trainer_state.json",
            "text_to_image_before_after.png"} <= set(full)  # fmt: skip
    card = full["README.md"].decode()
    assert "| DPGBench | 84.2 |" in card and "loopback-user/full" in card and "library_name: peft" in card
    assert json.loads((out / "reca_run.json").read_text())["eval_results"] == {"DPGBench": 84.2}

    main(["push", str(out), "--repo-id", "loopback-user/adapter", "--adapter-only"])
    assert set(hub.files("loopback-user/adapter")) == {
        ".gitattributes", "adapter_model.safetensors", "adapter_config.json", "reca_adapter.json", "reca_run.json",
        "README.md", "training_loss.png", "text_to_image_before_after.png",
    }  # fmt: skip

    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path)}))
    with pytest.raises(SystemExit, match="not a Hub id"):
        main(["push", str(out), "--repo-id", "loopback-user/local-base", "--adapter-only"])
    assert not hub.repo_exists("loopback-user/local-base")


def test_reca_push_refusals_and_network_failure(hub, make_args, shapes, tmp_path):
    trainer = _trainer(make_args, shapes, push_to_hub=False, max_steps=1)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="holds no LoRA adapter"):
        main(["push", str(out), "--repo-id", REPO, "--adapter-only"])
    with pytest.raises(SystemExit, match="reca_run.json"):
        main(["push", str(tmp_path), "--repo-id", REPO])
    with hub.refused(), pytest.raises(SystemExit, match=r"failed \(ConnectError.*run again: reca push"):
        main(["push", str(out), "--repo-id", REPO])


def test_rotation_never_deletes_a_folder_a_running_upload_is_walking(hub, make_args, shapes, tmp_path, monkeypatch):
    """The race, made deterministic: the output dir's background upload lists the folder recursively (checkpoint
    folders included, filtered out only afterwards). Here it is held inside checkpoint-1 until the save of step 2
    (and its rotation, save_total_limit=1) is over; a rotation that deleted checkpoint-1 then would make it fail."""
    trainer = _trainer(make_args, shapes, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1,
                       hub_always_push=True)  # fmt: skip
    inside, saved = threading.Event(), threading.Event()
    scandir, rmtree = pathlib.Path._scandir, shutil.rmtree

    def held_scandir(path):
        if path.name == "checkpoint-1" and threading.current_thread() is not threading.main_thread():
            if trainer.state.global_step == 2:  # the push of checkpoint-2, walking the output dir
                inside.set()
                saved.wait(timeout=20)
        return scandir(path)

    def rmtree_once_inside(path, *args, **kwargs):
        if pathlib.Path(path).name == "checkpoint-1":
            inside.wait(timeout=20)  # delete only while the upload walks the folder: the race, every time
        return rmtree(path, *args, **kwargs)

    class Hold(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trainer._hub_pushes.wait()  # checkpoint-1 is pushed: rotation may delete it

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                saved.set()

    monkeypatch.setattr(pathlib.Path, "_scandir", held_scandir)
    monkeypatch.setattr(shutil, "rmtree", rmtree_once_inside)
    trainer.add_callback(Hold())
    trainer.train()
    assert inside.is_set() and saved.is_set()
    assert trainer.hub_push_failures == 0, trainer._hub_pushes.summary()
    assert hub.commits(REPO)[0].title == "Training in progress, step 2"
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]  # rotated at the end


def test_a_save_never_rewrites_files_a_running_upload_is_sending(hub, make_args, shapes, monkeypatch):
    """hub_always_push: the upload of step 1 reads reca_run.json only after the save of step 2 (or 3 s); the save
    must wait for it instead of rewriting the output dir's card underneath it."""
    from huggingface_hub._commit_api import CommitOperationAdd

    trainer = _trainer(make_args, shapes, max_steps=2, save_strategy="steps", save_steps=1, hub_always_push=True)
    saved, first = threading.Event(), []
    b64content = CommitOperationAdd.b64content

    def late_b64content(operation):
        if operation.path_in_repo == "reca_run.json" and not first:  # the first upload: the push of step 1
            first.append(operation)
            saved.wait(timeout=3)
        return b64content(operation)

    class Saved(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                saved.set()

    monkeypatch.setattr(CommitOperationAdd, "b64content", late_b64content)
    trainer.add_callback(Saved())
    trainer.train()
    commits = {commit.title: commit for commit in hub.commits(REPO)}
    assert set(commits) >= {"Training in progress, step 1", "Training in progress, step 2"}
    for step in (1, 2):
        run = json.loads(commits[f"Training in progress, step {step}"].files["reca_run.json"])
        assert run["settings"]["steps"].startswith(f"{step} of 2 (written during training")  # each its own step
