"""Property-based fuzzing of the data path: any image (size, mode, format, aspect ratio, truncated or random
bytes) and any caption fed to the collator of every registered adapter gives a batch of the right shapes or
the documented error (BadImageError for images, ValueError naming the row for captions), nothing else."""

import io
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from reca_hf.adapters import get_adapter, tiny_builders
from reca_hf.collator import RecACollator
from reca_hf.data import SourceRows
from reca_hf.images import BadImageError
from reca_hf.tasks import IMAGE_TO_TEXT, INDEX_KEY, RECONSTRUCTION, TASK_KEY, TASKS, TEXT_TO_IMAGE
from reca_hf.testing import tiny_umm

pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # corrupt inputs are the point
ADAPTERS = sorted(tiny_builders())  # every registered tiny architecture
EXAMPLES_PER_ADAPTER = 120
FORMAT_MODES = (
    [("PNG", m) for m in ("1", "L", "P", "RGB", "RGBA", "LA", "I;16")]
    + [("JPEG", m) for m in ("L", "RGB", "CMYK")]
    + [("WEBP", m) for m in ("RGB", "RGBA")]
    + [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "F"), ("TIFF", "I;16"), ("TIFF", "CMYK"), ("TIFF", "RGBA")]
    + [("PIL", m) for m in ("F", "I", "I;16", "LA", "P", "RGBA", "YCbCr", "HSV")]  # in-memory images
)


@cache
def _collator(arch: str) -> RecACollator:
    model, processor = tiny_umm(arch)
    return RecACollator(get_adapter(model, processor), cond_dropout_prob=0.0, max_image_pixels=300 * 300)


@cache
def _skipping_collator(arch: str) -> RecACollator:
    model, processor = tiny_umm(arch)
    return RecACollator(
        get_adapter(model, processor), cond_dropout_prob=0.0, max_image_pixels=300 * 300, bad_image_policy="skip"
    )


def _picture(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("F", "I", "I;16", "1"):
        return image.convert("L").convert(mode)
    return image.convert(mode)


@st.composite
def image_values(draw):
    """``(value, genuine)``: a dataset value and whether it is an intact image within the pixel limit."""
    fmt, mode = draw(st.sampled_from(FORMAT_MODES))
    width, height = draw(st.integers(1, 400)), draw(st.integers(1, 400))  # aspect ratios 1:400 to 400:1
    picture = _picture(mode, width, height, draw(st.integers(0, 2**16)))
    small = width * height <= 300 * 300
    if fmt == "PIL":
        return picture, small
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncated", "random"]))
    if damage == "truncated":
        data = data[: int(len(data) * draw(st.floats(0, 0.98)))]
    elif damage == "random":
        data = draw(st.binary(max_size=3000))
    return {"bytes": data, "path": None}, small and damage == "none"


captions = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=30)}
        ),
        max_size=4,
    ),
)


def _caption_ok(caption) -> bool:
    if isinstance(caption, str):
        return bool(caption.strip())
    answers = [m for m in caption if m["role"] == "assistant"]
    return bool(answers)


rows = st.lists(
    st.tuples(image_values(), captions, st.sampled_from(TASKS)),
    min_size=1,
    max_size=3,
)


@pytest.mark.parametrize("arch", ADAPTERS)
@settings(max_examples=EXAMPLES_PER_ADAPTER, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(drawn=rows)
def test_every_input_gives_a_batch_or_the_documented_error(arch, drawn):
    collator = _collator(arch)
    adapter = collator.adapter
    drawn = [(value, caption, task) for value, caption, task in drawn if adapter.supports(task)]
    if not drawn:
        return
    examples = [
        {"image": value, "caption": caption, TASK_KEY: task, INDEX_KEY: i}
        for i, ((value, _), caption, task) in enumerate(drawn)
    ]
    try:
        batch = collator(examples)
    except BadImageError as error:
        assert not all(genuine for (_, genuine), _, _ in drawn), f"an intact image was refused: {error}"
        return
    except ValueError as error:
        assert "expected a non-empty caption string or chat messages" in str(error)
        assert any(not _caption_ok(c) for _, c, task in drawn if task != RECONSTRUCTION)
        return
    counts = {task: sum(t == task for _, _, t in drawn) for task in TASKS}
    views = collator.views
    if counts[RECONSTRUCTION] and views.keeps_aspect:  # the keep fit: one tensor per view, each within its bounds
        n = counts[RECONSTRUCTION]
        for key, side, bounds in (("condition_pixel_values", views.condition_resolution, views.condition_keep),
                                  ("target_pixel_values", views.generation_resolution, views.target_keep)):  # fmt: skip
            assert len(batch[key]) == n
            for view in batch[key]:
                height, width = view.shape[-2:]
                assert view.shape[0] == 3 and max(height, width) <= side
                assert height % bounds.multiple == 0 and width % bounds.multiple == 0
        assert adapter.batch_size(batch) == n and len(batch["instructions"]) == n
    elif counts[RECONSTRUCTION]:
        n, c, g = counts[RECONSTRUCTION], views.condition_resolution, views.generation_resolution
        assert batch["condition_pixel_values"].shape == (n, 3, c, c)
        assert batch["target_pixel_values"].shape == (n, 3, g, g)
        assert batch["input_ids"].shape[0] == n and len(batch["instructions"]) == n
    if counts[IMAGE_TO_TEXT]:
        n, u = counts[IMAGE_TO_TEXT], adapter.understanding_resolution
        sub = batch[IMAGE_TO_TEXT]
        assert sub["condition_pixel_values"].shape == (n, 3, u, u)
        assert sub["input_ids"].shape == sub["labels"].shape and sub["input_ids"].shape[0] == n
    if counts[TEXT_TO_IMAGE]:
        n, g = counts[TEXT_TO_IMAGE], views.generation_resolution
        assert batch[TEXT_TO_IMAGE]["target_pixel_values"].shape == (n, 3, g, g)
    for value in _tensors(batch):
        assert torch.isfinite(value).all() if value.is_floating_point() else True


def _tensors(batch):
    for value in batch.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list):
            yield from (item for item in value if isinstance(item, torch.Tensor))


@pytest.mark.parametrize("arch", ADAPTERS)
@settings(max_examples=EXAMPLES_PER_ADAPTER // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(drawn=st.lists(st.tuples(image_values(), st.sampled_from(TASKS)), min_size=1, max_size=4))
def test_skip_always_gives_a_whole_batch_with_its_own_captions(arch, drawn):
    """Under bad_image_policy=skip, any mix of good and bad rows (the dataset ends with one good row) comes out
    as a batch of exactly one example per row, each bad row replaced by a good one."""
    collator = _skipping_collator(arch)
    drawn = [(value, genuine, task) for (value, genuine), task in drawn if collator.adapter.supports(task)]
    good = {"bytes": _encoded(_picture("RGB", 20, 30, 0)), "path": None}
    dataset = SourceRows([{"image": value, "caption": "a red circle"} for value, _, _ in drawn]
                         + [{"image": good, "caption": "a red circle"}], "train")  # fmt: skip
    examples = [{**dataset[i], TASK_KEY: task, INDEX_KEY: i} for i, (_, _, task) in enumerate(drawn)]
    collator.add_sources({"train": dataset})
    before = collator.skipped_rows["train"]
    batch = collator(examples) if examples else {}
    counts = {task: sum(t == task for _, _, t in drawn) for task in TASKS}
    if counts[RECONSTRUCTION]:
        assert len(batch["condition_pixel_values"]) == counts[RECONSTRUCTION] == len(batch["instructions"])
        assert batch["dataset_index"].tolist() == [i for i, (_, _, t) in enumerate(drawn) if t == RECONSTRUCTION]
    for task, key in ((IMAGE_TO_TEXT, "condition_pixel_values"), (TEXT_TO_IMAGE, "target_pixel_values")):
        if counts[task]:
            assert batch[task][key].shape[0] == counts[task] == batch[task]["input_ids"].shape[0]
    if all(genuine for _, genuine, _ in drawn):
        assert collator.skipped_rows["train"] == before  # intact images are never skipped


def _encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
