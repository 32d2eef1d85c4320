"""Dataloader workers by default: the 'auto' worker count, persistent workers that follow the epoch, and a
collator light enough to pickle into them."""

import os
import pickle

import pytest
import torch

from reca_hf import RecAConfig, RecATrainer
from reca_hf.cli import parse_recipe
from reca_hf.config import auto_num_workers
from reca_hf.tasks import MixedTaskDataset, SharedEpoch
from reca_hf.testing import tiny_umm


@pytest.mark.parametrize(
    ("cores", "env", "expected"),
    [
        (2, {}, 0),  # a 2-core box: collate in the training process
        (3, {}, 1),
        (4, {}, 2),
        (16, {}, 8),  # capped at 8
        (64, {"LOCAL_WORLD_SIZE": "8"}, 6),  # 8 cores per process, minus 2
        (16, {"LOCAL_WORLD_SIZE": "8"}, 0),
        (32, {"WORLD_SIZE": "4"}, 6),  # no LOCAL_WORLD_SIZE: the world size is the safe guess
        (32, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "2"}, 8),  # the local count wins
    ],
)
def test_auto_workers_follow_the_cores_per_local_process(monkeypatch, cores, env, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert auto_num_workers() == expected
    if not env:  # a config under a launcher's variables would set up torch.distributed: the function alone there
        assert RecAConfig(output_dir="out").dataloader_num_workers == expected  # the default is 'auto'


def test_workers_turn_on_persistence_and_prefetch_unless_set(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    auto = RecAConfig(output_dir=str(tmp_path))
    assert (auto.dataloader_num_workers, auto.dataloader_persistent_workers, auto.dataloader_prefetch_factor) == (
        4,
        True,
        2,
    )
    none = RecAConfig(output_dir=str(tmp_path), dataloader_num_workers=0)
    assert (none.dataloader_persistent_workers, none.dataloader_prefetch_factor) == (False, None)
    own = RecAConfig(output_dir=str(tmp_path), dataloader_num_workers=2, dataloader_persistent_workers=False,
                     dataloader_prefetch_factor=6)  # fmt: skip
    assert (own.dataloader_persistent_workers, own.dataloader_prefetch_factor) == (False, 6)
    with pytest.raises(ValueError, match=r"dataloader_num_workers='many': use 'auto', 0"):
        RecAConfig(output_dir=str(tmp_path), dataloader_num_workers="many")


def test_auto_workers_from_the_command_line_and_a_recipe(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(5)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = str(tmp_path / "run")
    assert parse_recipe(None, ["--output_dir", out, "--dataloader_num_workers", "auto"]).dataloader_num_workers == 3
    assert parse_recipe(None, ["--output_dir", out, "--dataloader_num_workers", "1"]).dataloader_num_workers == 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {out}\ndataloader_num_workers: auto\n")
    config = parse_recipe(str(recipe))
    assert (config.dataloader_num_workers, config.dataloader_persistent_workers) == (3, True)


def test_the_trainers_collator_pickles_without_the_model(make_args, shapes):
    model, processor = tiny_umm("janus")
    trainer = RecATrainer(model, args=make_args(), train_dataset=shapes, processing_class=processor)
    payload = pickle.dumps(trainer.data_collator)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(payload) < weights / 4  # the processor and prompts, never the weights
    copy = pickle.loads(payload)
    assert copy.adapter.model is None
    rows = [{**shapes[i], "__reca_index__": i} for i in range(2)]
    expected, got = trainer.data_collator(rows), copy(rows)
    assert expected["instructions"] == got["instructions"]
    assert all(torch.equal(expected[k], got[k]) for k, v in expected.items() if isinstance(v, torch.Tensor))


class _Epochs(torch.utils.data.Dataset):
    def __init__(self):
        self.shared = SharedEpoch()

    @property
    def epoch(self):
        return self.shared.get()

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return self.epoch


def test_persistent_workers_see_each_new_epoch():
    """The epoch set in the training process reaches workers that were started in an earlier epoch."""
    dataset = _Epochs()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(3):
        dataset.shared.set(epoch)
        seen += [int(x) for batch in loader for x in batch]
    assert seen == [0, 0, 1, 1, 2, 2]
    mixed = MixedTaskDataset({"reconstruction": list(range(4))}, {"reconstruction": 1.0})
    mixed.set_epoch(5)
    assert pickle.loads(pickle.dumps(mixed)).epoch == 5
