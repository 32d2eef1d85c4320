"""The frozen-tower cache (cache_frozen_features): hits, misses, invalidation, refusals, and losses equal to the
uncached ones for tiny Janus, Emu3 and OpenUni."""

from __future__ import annotations

import logging

import pytest
import torch

from reca_hf import RecACollator, RecAConfig, RecATrainer
from reca_hf.adapters import LossNoise, cached_key, get_adapter
from reca_hf.frozen_cache import FrozenFeatureCache, resolve_frozen_cache
from reca_hf.testing import tiny_umm
from tests.conftest import reca_args


class EncoderCalls:
    """Counts forward calls of a model's frozen encoders (forward hooks on the real modules)."""

    def __init__(self, *modules: torch.nn.Module):
        self.count = 0
        self.handles = [module.register_forward_hook(self._hook) for module in modules]

    def _hook(self, *_):
        self.count += 1


def janus_encoders(model):
    return EncoderCalls(model.model.vision_model, model.model.vqmodel.encoder)


def cache_args(tmp_path, **overrides):
    values = dict(
        cache_frozen_features="true",
        frozen_cache_dir=str(tmp_path / "cache"),
        collapse_action="off",
        max_steps=2,
    )
    return reca_args(tmp_path, **{**values, **overrides})


def _tensors(batch):
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _uncached(batch):
    return {k: v for k, v in batch.items() if not k.startswith("cached_")}


def _center_crop_openuni(seed: int = 0):
    model, processor = tiny_umm("openuni", seed)
    adapter = get_adapter(model, processor)
    adapter.target_fit = "center_crop"  # OpenUni's own random crop is refused (views drawn per epoch)
    return model, processor, adapter


def test_janus_cached_losses_equal_uncached_and_a_second_run_encodes_nothing(tmp_path, shapes):
    model, processor = tiny_umm("janus")
    calls = janus_encoders(model)
    trainer = RecATrainer(model, cache_args(tmp_path), train_dataset=shapes, processing_class=processor)
    cache = trainer.setup_frozen_cache()
    assert cache is not None and cache.complete and cache.names == ["condition_features", "target_codes"]
    assert calls.count == 2 * 4  # built: 16 rows in batches of 4, each through SigLIP and the VQ encoder once
    batch = _tensors(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    assert batch[cached_key("condition_features")].shape[:2] == (4, 16)
    assert batch[cached_key("target_codes")].dtype == torch.long
    calls.count = 0
    with torch.no_grad():
        cached = trainer.adapter.loss(model, batch, reduction="none")
        assert calls.count == 0  # the loss read the cache
        uncached = trainer.adapter.loss(model, _uncached(batch), reduction="none")
        assert calls.count == 2
    torch.testing.assert_close(cached, uncached)

    again = RecATrainer(model, cache_args(tmp_path), train_dataset=shapes, processing_class=processor)
    calls.count = 0
    assert again.setup_frozen_cache().directory == cache.directory  # a hit
    assert calls.count == 0
    again.train()  # setup again (a hit), then two steps that never run the frozen encoders
    assert calls.count == 0 and again.state.global_step == 2


def test_a_cached_run_logs_the_losses_of_an_uncached_one(tmp_path, shapes):
    losses = {}
    for mode in ("false", "true"):
        model, processor = tiny_umm("janus")
        args = cache_args(tmp_path / mode, cache_frozen_features=mode, max_steps=3)
        trainer = RecATrainer(model, args, train_dataset=shapes, processing_class=processor)
        trainer.train()
        assert (trainer.frozen_cache is not None) == (mode == "true")
        losses[mode] = [log["reconstruction_loss"] for log in trainer.state.log_history if "reconstruction_loss" in log]
    assert len(losses["true"]) == 3
    torch.testing.assert_close(losses["true"], losses["false"])


def source_calls(model, adapter):
    """Forward calls of every module (and submodule) the adapter's cacheable features come from."""
    from reca_hf.freeze import matches

    patterns = [p for patterns in adapter.frozen_feature_sources.values() for p in patterns]
    return EncoderCalls(*[module for name, module in model.named_modules() if name and matches(name, patterns)])


@pytest.mark.parametrize("arch", ["janus", "emu3", "openuni"])
def test_cached_losses_equal_uncached(tmp_path, shapes, arch):
    if arch == "openuni":
        model, processor, adapter = _center_crop_openuni()
    else:
        model, processor = tiny_umm(arch)
        adapter = get_adapter(model, processor)
    args = cache_args(tmp_path)
    collator = RecACollator.from_config(adapter, args)
    trainer = RecATrainer(model, args, data_collator=collator, train_dataset=shapes, processing_class=processor)
    cache = trainer.setup_frozen_cache()
    assert cache.names == list(adapter.frozen_feature_sources)
    batch = _tensors(collator([trainer.train_dataset[i] for i in range(4)]))
    calls = source_calls(model, adapter)
    noise = LossNoise(seed=5)
    with torch.no_grad():
        cached = adapter.loss(model, batch, reduction="none", noise=noise)
        assert calls.count == 0
        uncached = adapter.loss(model, _uncached(batch), reduction="none", noise=noise)
        assert calls.count > 0
    torch.testing.assert_close(cached, uncached)


def _cache_dir(tmp_path, shapes, model, processor, **overrides):
    trainer = RecATrainer(model, cache_args(tmp_path, **overrides), train_dataset=shapes, processing_class=processor)
    return trainer, trainer.setup_frozen_cache()


@pytest.mark.parametrize(
    "change", ["revision", "weights", "condition_resolution", "condition_bottleneck", "blur_factor", "dataset"]
)
def test_a_changed_setting_never_reads_a_stale_entry(tmp_path, shapes, change):
    """Each change is a new key: the features are computed afresh, and what the batch reads is the new model's
    or setting's output, not the first run's."""
    from reca_hf.data import synthetic_shapes

    model, processor = tiny_umm("janus")
    overrides, dataset = {"condition_bottleneck": "blur", "blur_factor": 2}, shapes
    _, first = _cache_dir(tmp_path, shapes, model, processor, **overrides)
    if change == "revision":
        model.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"
    elif change == "weights":
        model = tiny_umm("janus", seed=1)[0]
    elif change == "condition_resolution":
        overrides["condition_resolution"] = 16
    elif change == "condition_bottleneck":
        overrides["condition_bottleneck"] = "resize"
    elif change == "blur_factor":
        overrides["blur_factor"] = 4
    else:
        dataset = synthetic_shapes(16, size=32, seed=7)
    calls = janus_encoders(model)
    trainer, second = _cache_dir(tmp_path, dataset, model, processor, **overrides)
    assert second.directory != first.directory and calls.count > 0  # a miss: computed afresh
    batch = _tensors(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        fresh = trainer.adapter.frozen_features(model, _uncached(batch))
    torch.testing.assert_close(batch[cached_key("condition_features")], fresh["condition_features"])
    assert torch.equal(batch[cached_key("target_codes")], fresh["target_codes"])


def test_a_trainable_source_is_refused_with_true_and_left_out_with_auto(tmp_path, shapes, caplog):
    model, processor = tiny_umm("janus")
    args = cache_args(tmp_path, freeze=["model.vqmodel"])  # the vision tower and aligner train
    trainer = RecATrainer(model, args, train_dataset=shapes, processing_class=processor)
    with pytest.raises(ValueError, match=r"cache_frozen_features='true': condition_features comes from model\.vision"):
        trainer.setup_frozen_cache()
    trainer.args.cache_frozen_features = "auto"
    with caplog.at_level(logging.INFO, logger="reca_hf"):
        names = resolve_frozen_cache("auto", trainer.adapter, model, trainer.views, shapes, lambda names: 1.0)
    assert names == ("target_codes",)  # the VQ codes stay cacheable
    assert "condition_features not cached, its modules train" in caplog.text


def test_lora_on_a_source_module_is_trainable_there():
    from peft import LoraConfig, get_peft_model

    from reca_hf.frozen_cache import trainable_sources

    model, processor = tiny_umm("janus")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(target_modules=r"model\.aligner\.fc1", r=2))
    found = trainable_sources(model, get_adapter(model, processor))
    assert found["condition_features"] and all("lora" in name for name in found["condition_features"])
    assert found["target_codes"] == []


def test_random_crops_iterable_data_and_other_collators_are_refused(tmp_path, shapes, caplog):
    model, processor = tiny_umm("openuni")
    trainer = RecATrainer(model, cache_args(tmp_path), train_dataset=shapes, processing_class=processor)
    with pytest.raises(ValueError, match=r"cache_frozen_features='true': .*target_fit='random_crop'.*per crop seed"):
        trainer.setup_frozen_cache()
    trainer.args.cache_frozen_features = "auto"
    with caplog.at_level(logging.INFO, logger="reca_hf"):
        assert trainer.setup_frozen_cache() is None
    assert "Frozen-tower cache off" in caplog.text and "random_crop" in caplog.text
    adapter = trainer.adapter
    janus, janus_processor = tiny_umm("janus")
    with pytest.raises(ValueError, match="not a map-style dataset"):
        resolve_frozen_cache("true", get_adapter(janus, janus_processor), janus, None, shapes.to_iterable_dataset(),
                             lambda names: 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="its own data collator"):
        resolve_frozen_cache("true", get_adapter(janus), janus, None, shapes, lambda n: 1.0, collator_is_reca=False)
    assert resolve_frozen_cache("false", adapter, model, None, None, lambda names: 1.0) == ()


def test_auto_caches_where_the_frozen_share_is_large(tmp_path, shapes, caplog):
    model, processor = tiny_umm("janus")
    trainer = RecATrainer(model, cache_args(tmp_path), train_dataset=shapes, processing_class=processor)  # freezes
    adapter, views = trainer.adapter, trainer.views
    with caplog.at_level(logging.INFO, logger="reca_hf"):
        assert resolve_frozen_cache("auto", adapter, model, views, shapes, lambda names: 0.05) == ()
        assert resolve_frozen_cache("auto", adapter, model, views, shapes, lambda names: 0.5) == (
            "condition_features",
            "target_codes",
        )
    assert "off (cache_frozen_features='auto'): condition_features and target_codes take 5.0%" in caplog.text
    share = trainer._frozen_share(("condition_features", "target_codes"))
    vq_only = trainer._frozen_share(("target_codes",))
    assert 0 < vq_only < share < 1  # counted FLOPs: the tiny VQ encoder dominates this tiny model's step


def test_a_bad_image_is_left_out_under_skip_and_its_replacement_is_cached(tmp_path, shapes):
    model, processor = tiny_umm("janus")
    data = [{"image": b"not an image"}] + [{"image": shapes[i]["image"]} for i in range(7)]  # a plain list: hashed
    args = cache_args(tmp_path, bad_image_policy="skip")
    trainer = RecATrainer(model, args, train_dataset=data, processing_class=processor)
    cache = trainer.setup_frozen_cache()
    assert cache.index["rows"] == 7 and cache.lookup([0]) is None and cache.lookup([1]) is not None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])  # row 0 replaced by row 1
    assert cached_key("target_codes") in batch


def test_an_interrupted_build_leaves_no_index_and_is_redone(tmp_path, shapes):
    model, processor = tiny_umm("janus")
    trainer = RecATrainer(model, cache_args(tmp_path), train_dataset=shapes, processing_class=processor)
    cache = trainer.setup_frozen_cache()
    store = FrozenFeatureCache(cache.directory.with_name("other"))

    def failing(batches):
        yield next(iter(batches))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.build(failing(trainer._frozen_batches()), trainer._frozen_compute(("target_codes",)), {}, 16)
    assert not store.complete and not store.directory.exists()
    assert list(cache.directory.parent.iterdir()) == [cache.directory]  # no partial folder left behind


def test_the_config_field_takes_its_three_modes(tmp_path):
    assert RecAConfig(output_dir=str(tmp_path), cache_frozen_features=True).cache_frozen_features == "true"
    assert RecAConfig(output_dir=str(tmp_path)).cache_frozen_features == "false"
    assert RecAConfig(output_dir=str(tmp_path), cache_frozen_features="Auto").cache_frozen_features == "auto"
    with pytest.raises(ValueError, match="cache_frozen_features='sometimes': choose one of auto, true, false"):
        RecAConfig(output_dir=str(tmp_path), cache_frozen_features="sometimes")


def test_an_adapter_declaring_frozen_features_must_compute_them():
    from reca_hf.adapters import registered_adapters

    with pytest.raises(TypeError, match="declares frozen_feature_sources but does not implement frozen_features"):

        class Half(registered_adapters()["flow"]):
            name = "half"
            frozen_feature_sources = {"condition_features": ("vision_model",)}

    for name in ("janus", "emu3", "openuni"):  # every declared feature is computed, under its declared name
        model, processor = tiny_umm(name)
        adapter = get_adapter(model, processor)
        collator = RecACollator(adapter)
        rows, batch = collator.frozen_inputs([{"image": image, "__reca_row__": i} for i, image in
                                              enumerate(synthetic_images(2))])  # fmt: skip
        with torch.no_grad():
            assert set(adapter.frozen_features(model, batch)) == set(adapter.frozen_feature_sources)
        assert rows == [0, 1]


def synthetic_images(n: int):
    from reca_hf.data import synthetic_shapes

    return synthetic_shapes(n, size=32, seed=3)["image"]


def test_entries_are_found_across_shards(tmp_path, shapes, monkeypatch):
    import reca_hf.frozen_cache as frozen_cache

    monkeypatch.setattr(frozen_cache, "_SHARD_BYTES", 1)  # one shard per batch of 4
    model, processor = tiny_umm("janus")
    trainer = RecATrainer(model, cache_args(tmp_path), train_dataset=shapes, processing_class=processor)
    cache = trainer.setup_frozen_cache()
    assert len(cache.index["shards"]) == 4 and cache.index["rows"] == 16
    rows = [15, 0, 7, 4]  # from four shards, out of order
    batch = _tensors(trainer.data_collator([trainer.train_dataset[i] for i in rows]))
    with torch.no_grad():
        fresh = trainer.adapter.frozen_features(model, _uncached(batch))
    torch.testing.assert_close(batch[cached_key("condition_features")], fresh["condition_features"])
    assert torch.equal(batch[cached_key("target_codes")], fresh["target_codes"])
    assert cache.lookup([16]) is None and cache.lookup([-1]) is None


def test_in_a_task_mix_only_the_reconstruction_rows_read_the_cache(tmp_path, shapes):
    model, processor = tiny_umm("janus")
    args = cache_args(tmp_path, task_ratios={"reconstruction": 1, "image_to_text": 1})
    trainer = RecATrainer(model, args, train_dataset=shapes, i2t_dataset=shapes, processing_class=processor)
    trainer.setup_frozen_cache()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    reconstruction = batch["input_ids"].shape[0]
    assert 0 < reconstruction < 8 and batch[cached_key("target_codes")].shape[0] == reconstruction
    assert not any(key.startswith("cached_") for key in batch["image_to_text"])
    trainer.train()
    assert trainer.state.global_step == 2
