"""`reca push` leaves a run as it found it when the push fails, refuses a folder without weights, and says each
problem once."""

import pytest

from reca_hf import RecATrainer
from reca_hf.cli import main
from reca_hf.testing import tiny_umm

REPO = "loopback-user/tiny-reca"


@pytest.fixture
def saved_run(make_args, shapes, tmp_path):
    model, processor = tiny_umm("janus")
    args = make_args(max_steps=1, logging_steps=1, collapse_action="off")
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    trainer.create_model_card()
    return tmp_path / "run"


def _files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_failed_push_changes_nothing_in_the_run(hub, saved_run):
    before = _files(saved_run)
    with hub.refused(), pytest.raises(SystemExit, match=r"Nothing was changed in .*run again: reca push") as caught:
        main(["push", str(saved_run), "--repo-id", REPO, "--eval-results", '{"GenEval": 0.9}'])
    assert _files(saved_run) == before  # the card, reca_run.json, the plot and no eval-results folder
    assert str(caught.value).count("reca push:") == 1
    main(["push", str(saved_run), "--repo-id", REPO, "--eval-results", '{"GenEval": 0.9}'])
    assert REPO in (saved_run / "README.md").read_text()  # a push that worked does update the card


def test_a_folder_without_weights_is_refused_by_name(hub, saved_run):
    (saved_run / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"holds no model weights \(model.safetensors.*trainer.save_model"):
        main(["push", str(saved_run), "--repo-id", REPO])
    assert not hub.repo_exists(REPO)


def test_a_missing_folder_is_said_once(tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["push", str(tmp_path / "nonexistent"), "--repo-id", REPO])
    message = str(caught.value)
    assert message.startswith("reca push: ") and message.count("reca push") == 1 and "is not a folder" in message
