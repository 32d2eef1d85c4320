"""The swap probes run the frozen towers once: the results equal those of encoding every pass anew."""

import pytest

from reca_hf.adapters import get_adapter
from reca_hf.callbacks import condition_swap_loss, has_target_logits, swap_probe
from reca_hf.data import synthetic_shapes
from reca_hf.testing import tiny_umm


@pytest.mark.parametrize("arch", ["janus", "emu3", "flow", "openuni"])
def test_probe_with_encodings_once_equals_encoding_each_pass(monkeypatch, arch):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    images = synthetic_shapes(4, size=adapter.default_views().generation_resolution, seed=1)["image"]
    probe = swap_probe if has_target_logits(adapter) else condition_swap_loss
    calls = []
    frozen_features = adapter.frozen_features

    def counted(model, batch, names=None):
        calls.append(1)
        return frozen_features(model, batch, names)

    monkeypatch.setattr(adapter, "frozen_features", counted)
    once = probe(adapter, model, images, adapter.default_views())
    assert calls == [1]  # the frozen towers run once for the own and the swapped passes (and every noise level)
    monkeypatch.setattr(adapter, "frozen_features", lambda model, batch, names=None: {})  # each pass encodes anew
    every_pass = probe(adapter, model, images, adapter.default_views())
    assert once == pytest.approx(every_pass, rel=1e-5, abs=1e-6)
