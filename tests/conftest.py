import pytest

from reca_hf.data import synthetic_shapes
from reca_hf.testing import tiny_umm
from tests.hub_server import hub, hub_server, instant_retries  # noqa: F401 - fixtures: a loopback Hub for push tests


@pytest.fixture
def tiny_janus():
    """A fresh tiny random Janus and its processor (seed 0)."""
    return tiny_umm("janus")


@pytest.fixture(scope="session")
def shapes():
    """16 synthetic 32-px images with captions."""
    return synthetic_shapes(16, size=32, seed=0)


def reca_args(tmp_path, **overrides):
    from reca_hf import RecAConfig

    values = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        num_reconstruction_images=0,
        seed=0,
    )
    values.update(overrides)
    return RecAConfig(**values)


@pytest.fixture
def make_args(tmp_path):
    """``make_args(**overrides)``: a small, quiet RecAConfig writing under ``tmp_path / "run"``."""
    return lambda **overrides: reca_args(tmp_path, **overrides)
