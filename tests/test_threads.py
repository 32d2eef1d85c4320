"""cpu_threads: a tiny model on the CPU runs one torch thread unless the user chose otherwise."""

import pytest
import torch

from reca_hf import RecAConfig, RecATrainer
from reca_hf.testing import tiny_umm
from reca_hf.threads import TINY_MODEL_PARAMETERS, resolve_cpu_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_gives_a_tiny_cpu_model_one_thread_and_leaves_the_rest():
    assert resolve_cpu_threads("auto", 10_000, on_cpu=True, environ={}) == 1
    assert resolve_cpu_threads("auto", 10_000, on_cpu=True, environ={"OMP_NUM_THREADS": "4"}) is None  # the user's
    assert resolve_cpu_threads("auto", TINY_MODEL_PARAMETERS, on_cpu=True, environ={}) is None  # a real model
    assert resolve_cpu_threads("auto", 10_000, on_cpu=False, environ={}) is None  # an accelerator
    assert resolve_cpu_threads(3, 10**9, on_cpu=False, environ={}) == 3
    assert resolve_cpu_threads(0, 10, on_cpu=True, environ={}) is None  # 0: torch's default


def test_the_trainer_applies_it(make_args, shapes, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    model, processor = tiny_umm("janus")
    RecATrainer(model, args=make_args(collapse_action="off"), train_dataset=shapes, processing_class=processor)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    RecATrainer(model, args=make_args(collapse_action="off", cpu_threads=0), train_dataset=shapes,
                processing_class=processor)  # fmt: skip
    assert torch.get_num_threads() == 2


def test_the_field_is_checked(tmp_path):
    assert RecAConfig(output_dir=str(tmp_path), cpu_threads="3").cpu_threads == 3
    with pytest.raises(ValueError, match="cpu_threads='many'"):
        RecAConfig(output_dir=str(tmp_path), cpu_threads="many")
