"""Honest throughput: the FLOPs a step runs (forward through trained and frozen modules, the backward autograd
runs), checked against counts worked out by hand from the shapes and configs, and the mfu built on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reca_hf import RecAConfig, RecATrainer
from reca_hf.data import synthetic_shapes
from reca_hf.flops import FlopCounter, peak_flops_per_second, resolve_peak_flops
from reca_hf.testing import tiny_umm


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, hidden):
        q, k = self.q_proj(hidden), self.k_proj(hidden)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ hidden


def _count(model, inputs) -> tuple[int, int]:
    counter = FlopCounter().attach(model)
    counter.start()
    model(inputs)
    counter.stop()
    return counter.forward, counter.backward


def test_the_backward_counted_is_the_one_autograd_runs():
    batch, length = 3, 5
    tokens = batch * length
    first, second = nn.Linear(8, 16), nn.Linear(16, 4)
    model = nn.Sequential(first, second)
    forward = 2 * 8 * 16 * tokens + 2 * 16 * 4 * tokens
    inputs = torch.randn(batch, length, 8)

    first.requires_grad_(False)  # frozen below a trained layer: no backward through it at all
    assert _count(model, inputs) == (forward, 2 * 16 * 4 * tokens)
    first.requires_grad_(True)
    second.requires_grad_(False)  # frozen above a trained layer: its input gradient runs, its weight one not
    assert _count(model, inputs) == (forward, 2 * 8 * 16 * tokens + 2 * 16 * 4 * tokens)
    second.requires_grad_(True)  # both trained: weight gradients of both, the input gradient of the second only
    assert _count(model, inputs) == (forward, 2 * 8 * 16 * tokens + 2 * 2 * 16 * 4 * tokens)
    with torch.no_grad():
        assert _count(model, inputs) == (forward, 0)

    conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)  # 4x4 output positions from 8x8
    assert _count(conv, torch.randn(2, 3, 8, 8)) == (2 * 6 * 3 * 9 * 2 * 16, 2 * 6 * 3 * 9 * 2 * 16)

    attention = _Attention(4)
    attention.requires_grad_(False)
    scores = 4 * batch * length * length * 4
    projections = 2 * 2 * 4 * 4 * tokens
    assert _count(attention, torch.randn(batch, length, 4)) == (projections + scores, 0)
    assert _count(attention, torch.randn(batch, length, 4, requires_grad=True)) == (
        projections + scores,
        projections + 2 * scores,
    )


def _llama_flops(config, rows: int, length: int) -> int:
    """Forward FLOPs of a Llama's decoder layers by hand: projections and MLP x tokens, plus attention scores."""
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    kv_width = config.num_key_value_heads * head_dim
    weights = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * config.intermediate_size
    scores = 4 * rows * length * length * config.num_attention_heads * head_dim
    return config.num_hidden_layers * (2 * weights * rows * length + scores)


def test_janus_image_to_text_flops_match_the_tiny_config(make_args):
    """A mixed Janus step: the image-to-text task's FLOPs against a count from the tiny config alone."""
    model, processor = tiny_umm("janus")
    data = synthetic_shapes(8, size=32, seed=0)
    args = make_args(max_steps=1, per_device_train_batch_size=4, collapse_action="off",
                     task_ratios={"reconstruction": 1, "image_to_text": 1})  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=data, i2t_dataset=data, processing_class=processor)
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *rest, **kwargs):
        seen.append(inputs)
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    batch = seen[0]["image_to_text"]
    rows, length = batch["input_ids"].shape
    vision = model.config.vision_config
    patches = rows * (batch["condition_pixel_values"].shape[-1] // vision.patch_size) ** 2
    width, mlp = vision.hidden_size, int(vision.hidden_size * vision.mlp_ratio)
    siglip = 2 * vision.num_channels * vision.patch_size**2 * width * patches  # the patch embedding
    siglip += vision.num_hidden_layers * (2 * (4 * width * width + 2 * width * mlp) * patches
                                          + 4 * patches * (patches // rows) * width)  # fmt: skip
    text = model.config.text_config
    aligner = 2 * (width * text.hidden_size + text.hidden_size * text.hidden_size) * patches  # fc1, hidden layer
    answers = rows * batch["answer_length"]
    head = 2 * text.hidden_size * text.vocab_size * answers
    # SigLIP and the aligner are frozen and see no gradient: forward only. The LLM is trained, and its first norm's
    # weight too, so every projection's input carries a gradient: backward twice the forward. The head (tied to
    # the frozen embedding table) is frozen but passes the gradient down: backward once its forward.
    assert not model.lm_head.weight.requires_grad and model.model.language_model.norm.weight.requires_grad
    expected = siglip + aligner + 3 * _llama_flops(text, rows, length) + 2 * head
    assert trainer.task_flos["image_to_text"] == expected
    assert trainer.task_flos["reconstruction"] > 0
    assert trainer.state.total_flos == sum(trainer.task_flos.values())


def test_mfu_is_logged_against_the_configured_peak(make_args, shapes):
    model, processor = tiny_umm("janus")
    args = make_args(max_steps=2, collapse_action="off", peak_flops_per_second=1e9)
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(0 < entry["mfu"] for entry in logs)
    quiet = RecATrainer(model, args=make_args(max_steps=1, collapse_action="off"), train_dataset=shapes,
                        processing_class=processor)  # fmt: skip
    quiet.train()  # on a CPU, 'auto' knows no peak: no mfu
    assert all("mfu" not in entry for entry in quiet.state.log_history)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("Some Future GPU", None),
    ],
)
def test_known_peaks(name, peak):
    assert peak_flops_per_second(name) == peak


def test_peak_flops_setting(tmp_path):
    assert RecAConfig(output_dir=str(tmp_path), peak_flops_per_second="312e12").peak_flops_per_second == 312e12
    assert RecAConfig(output_dir=str(tmp_path), peak_flops_per_second="none").peak_flops_per_second is None
    assert resolve_peak_flops(RecAConfig(output_dir=str(tmp_path))) is None  # 'auto' on a CPU
    assert resolve_peak_flops(RecAConfig(output_dir=str(tmp_path), peak_flops_per_second=5.0)) == 5.0
    with pytest.raises(ValueError, match=r"peak_flops_per_second='fast': use 'auto', null"):
        RecAConfig(output_dir=str(tmp_path), peak_flops_per_second="fast")
