"""Pure image functions: decoding, mode normalisation, and the two views RecA needs.

The *condition view* is what the understanding encoder sees. It goes through the information
bottleneck: the smallest resolution the model understands at (``"resize"``), or a downscale followed
by an upscale back (``"blur"``: same token count, less information). Without it, a model whose
condition and target share one representation learns to copy pixels instead of semantics.
The *target view* is what the generation loss reconstructs, at the generation resolution.

Fit policies (``ViewSpec.target_fit``, ``ViewSpec.condition_fit``): how a non-square image becomes a square
view. ``"center_crop"`` cuts the centred square of the shorter side; ``"random_crop"`` cuts a square at a
position the collator draws from (seed, epoch, row), as OpenUni's authors do (the views of the grid and the
probe, which have no row, use the centred square); ``"pad"`` resizes the longer side to the view's resolution
and pads to a square with the model processor's background colour (what the Janus image processor does for
understanding); ``"stretch"`` resizes both sides to the resolution, ignoring the aspect (Harmon, Show-o); ``"keep"`` keeps the
aspect ratio and resizes the image into the view's bounds (:class:`KeepBounds`, :func:`keep_size`: the long side at
most the resolution, the short side at least a fraction of it, both multiples of the model's stride; BAGEL), so
views of one batch differ in size: only adapters with ``variable_size`` take it.
The target's default is ``"center_crop"``: no RecA author pads a generation target, and a generator trained
on grey bars learns to draw them. The condition shows what the target shows: under a cropping target fit it
is cut from the target's own square (so ``condition_fit`` has nothing left to fit), under ``"pad"`` and
``"stretch"`` targets it is the whole image under ``condition_fit`` (the understanding processor's way).

Condition sources (``ViewSpec.condition_source``): where the condition's pixels come from. ``"image"`` resizes
the source image with PIL (bicubic, antialiased, 8 bit), the way an understanding processor resizes a picture;
Janus and Emu3 keep it, since it is what their understanding path was trained on. ``"target"`` makes the condition
from the target view's float tensor (not re-quantised to 8 bit) with ``torch.nn.functional.interpolate`` at
``ViewSpec.condition_interpolation`` (bilinear without antialias unless set otherwise), as OpenUni's and Show-o's
authors make theirs (512 -> 448 for InternViT; 512 -> 256 for Show-o); at the generation resolution the condition
is the target tensor itself (Harmon). The blur bottleneck follows the source: down to the blur size and back up,
from the target tensor (Show-o's 512 -> 64 -> 512) or from the PIL view. A ``"target"`` condition is a float tensor
``(3, H, W)`` on the 0..1 scale; adapters turn either kind of view into model inputs with :func:`to_tensor`
(resampling commutes with per-channel normalisation, so normalising after the resize is the authors' before it,
up to float rounding) and read its size with :func:`view_size`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

BOTTLENECKS = ("resize", "blur", "none")
FITS = ("pad", "center_crop", "random_crop", "stretch", "keep")
TARGET_FITS = FITS  # the old name: the fits a target view can take (a condition view takes the same)
CROP_FITS = ("center_crop", "random_crop")  # the fits that cut a square of the shorter side
SHORTER_SIDE_FITS = (*CROP_FITS, "stretch")  # the fits whose view side comes from the image's shorter side
_HIGH_BIT_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own warning threshold: a 0.25 GiB RGB image
_DERIVE_RATIO = 2  # a smaller view is resized from a larger one at least this much larger (see ViewSpec.views)
CONDITION_SOURCES = ("image", "target")  # where a condition view's pixels come from (see the module docstring)
# Resamplers of a "target" condition: torch.nn.functional.interpolate modes, "_antialias" with antialias=True
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "bilinear_antialias", "bicubic_antialias")


@dataclass(frozen=True)
class KeepBounds:
    """Where the ``keep`` fit puts a view of resolution ``R`` (:func:`keep_size`): long side at most ``R``, short
    side at least ``min_short * R``, both sides multiples of ``multiple``, at most ``max_pixels`` pixels (None: no
    limit). An adapter declares one for its targets and one for its conditions."""

    multiple: int = 1
    min_short: float = 0.0
    max_pixels: int | None = None


def keep_size(width: int, height: int, resolution: int, bounds: KeepBounds) -> tuple[int, int]:
    """``(width, height)`` of the ``keep`` view of a ``width x height`` image: BAGEL's rule (its authors'
    ``MaxLongEdgeMinShortEdgeResize``). Scale so that the long side is at most ``resolution`` (never up) but the
    short side at least ``bounds.min_short * resolution`` (up if needed); round each side to the nearest multiple
    (at least one multiple); where that is over ``max_pixels``, scale by the pixel ratio (a ratio of areas, applied
    to the sides, as theirs) and round again; where the long side is then over ``resolution``, scale it back to it
    and round again. The short-side floor wins over the long-side bound only until that last step, so a very
    elongated image ends with its long side at ``resolution`` and its short side under the floor."""
    multiple = bounds.multiple

    def scaled(w: float, h: float, scale: float) -> tuple[int, int]:
        return tuple(max(multiple, int(round(round(v * scale) / multiple) * multiple)) for v in (w, h))

    scale = max(min(resolution / max(width, height), 1.0), bounds.min_short * resolution / min(width, height))
    w, h = scaled(width, height, scale)
    if bounds.max_pixels is not None and w * h > bounds.max_pixels:
        w, h = scaled(w, h, bounds.max_pixels / (w * h))
    if max(w, h) > resolution:
        w, h = scaled(w, h, resolution / max(w, h))
    return w, h


def keep(image: Image.Image, resolution: int, bounds: KeepBounds) -> Image.Image:
    """``image`` resized (bicubic) to its :func:`keep_size`."""
    size = keep_size(*image.size, resolution, bounds)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


class BadImageError(ValueError):
    """An image that cannot be used: undecodable, truncated, or over the pixel limit.

    ``file`` is the path it was read from, when the value held one.
    """

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


def source_file(value: Any) -> str | None:
    """The file a dataset value was read from (a path string or a ``datasets`` Image dict's path), if any."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return getattr(value, "filename", None) or None


def open_image(value: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open one dataset value lazily (header only), refusing images over ``max_pixels`` before decoding them.

    Accepts a PIL image, a file path, bytes, or a ``datasets`` Image dict (``{"bytes", "path"}``, what an
    ``Image(decode=False)`` column holds). Pillow's global bomb check is replaced by ``max_pixels`` here.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, (str, os.PathLike)):
            source = value
        elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path") is not None):
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        elif isinstance(value, (bytes, bytearray)):
            source = io.BytesIO(value)
        else:
            raise TypeError(
                f"expected a PIL image, a file path or a datasets Image dict with 'bytes' or 'path', "
                f"got {type(value).__name__}"
            )
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours below, with the field to set
        try:
            image = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    width, height = image.size
    if width * height > max_pixels:
        if image is not value:
            image.close()  # the file Pillow opened for the header
        raise BadImageError(
            f"{width}x{height} = {width * height} pixels is over max_image_pixels={max_pixels} (a decompression-bomb "
            "guard); raise max_image_pixels if such images are expected",
            source_file(value),
        )
    return image


def load_image(
    value: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft: int | None = None, fit: str = "pad"
) -> Image.Image:
    """Decode one dataset value (see :func:`open_image`) to an RGB image, EXIF orientation applied.

    ``draft``: the largest view side that will be made from the image. JPEGs are then decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) whose longer side (shorter side, for the crop fits, whose square is
    that side, and ``"stretch"``, which resizes it to the view side) is still at least ``draft``, several
    times faster than a full decode and, after the view's resize, within a few levels of it.
    """
    image = open_image(value, max_pixels)
    if draft is not None and image.format == "JPEG" and not isinstance(value, Image.Image):
        scale = draft / (min(image.size) if fit in SHORTER_SIDE_FITS else max(image.size))
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    try:
        image.load()  # decode now, so a truncated or corrupt file fails here and not later
    except Exception:
        if image is not value:
            image.close()  # a failed decode leaves the file Pillow opened
        raise
    return to_rgb(ImageOps.exif_transpose(image))


def decode_image(
    value: Any,
    where: str,
    column: str,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft: int | None = None,
    fit: str = "pad",
) -> Image.Image:
    """:func:`load_image`, any failure raised as a :class:`BadImageError` naming ``where`` (the dataset and row),
    the column and the file, with the fix."""
    try:
        return load_image(value, max_pixels, draft, fit)
    except Exception as error:
        file = source_file(value)
        raise BadImageError(
            f"{where}: column {column!r}{f' (file {file})' if file else ''} could not be decoded as an image "
            f"({type(error).__name__}: {error}); fix or remove that row, or set bad_image_policy: skip",
            file,
        ) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white, high bit depths are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _HIGH_BIT_MODES or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = _HIGH_BIT_MODES.get(image.mode) or max(float(array.max()), 1.0)
        array = np.clip(array / scale * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, resolution: int, background: tuple[int, int, int]) -> Image.Image:
    """Resize the longer side to ``resolution`` and centre the image on a square background."""
    return _pad(fit(image, resolution), resolution, background)


def center_square(image: Image.Image, position: float = 0.5) -> Image.Image:
    """A square of ``image``'s shorter side, at ``position`` (0: left or top .. 1: right or bottom; 0.5, the
    centre) along its longer side (the image itself when it is square)."""
    width, height = image.size
    if width == height:
        return image
    side = min(width, height)
    left, top = round((width - side) * position), round((height - side) * position)
    return image.crop((left, top, left + side, top + side))


def fit(image: Image.Image, resolution: int) -> Image.Image:
    """Resize (bicubic) so that the longer side is ``resolution``, keeping the aspect ratio."""
    width, height = image.size
    scale = resolution / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _pad(image: Image.Image, resolution: int, background: tuple[int, int, int]) -> Image.Image:
    if image.size == (resolution, resolution):
        return image
    canvas = Image.new("RGB", (resolution, resolution), tuple(background))
    canvas.paste(image, ((resolution - image.width) // 2, (resolution - image.height) // 2))
    return canvas


def blur(image: Image.Image, factor: int) -> Image.Image:
    """Downscale by ``factor`` and upscale back: same size and token count, less information."""
    width, height = image.size
    small = image.resize((max(1, width // factor), max(1, height // factor)), Image.Resampling.BICUBIC)
    return small.resize((width, height), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class ViewSpec:
    """How one image becomes its condition view and its target view (fits: see the module docstring)."""

    condition_resolution: int
    generation_resolution: int
    bottleneck: str = "resize"
    blur_factor: int = 4
    background: tuple[int, int, int] = (127, 127, 127)
    target_fit: str = "center_crop"  # one of FITS; a cropping fit cuts both views from one square
    condition_fit: str = "pad"  # one of FITS; used where the target does not crop (pad, stretch)
    condition_source: str = "image"  # one of CONDITION_SOURCES
    # The resampler of a "target" condition (one of INTERPOLATIONS; None there means "bilinear"); None for "image",
    # whose condition PIL resizes (bicubic, antialiased)
    condition_interpolation: str | None = None
    target_keep: KeepBounds = KeepBounds()  # the bounds of a "keep" target view
    condition_keep: KeepBounds = KeepBounds()  # and of a "keep" condition view

    def __post_init__(self):
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"condition_bottleneck={self.bottleneck!r}: choose one of {BOTTLENECKS}.")
        for name in ("target_fit", "condition_fit"):
            if getattr(self, name) not in FITS:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(FITS)}.")
        if self.condition_source not in CONDITION_SOURCES:
            raise ValueError(
                f"condition_source={self.condition_source!r}: choose one of {', '.join(CONDITION_SOURCES)}."
            )
        if self.condition_source == "target":
            if self.condition_interpolation is None:
                object.__setattr__(self, "condition_interpolation", "bilinear")
            elif self.condition_interpolation not in INTERPOLATIONS:
                raise ValueError(
                    f"condition_interpolation={self.condition_interpolation!r}: choose one of "
                    f"{', '.join(INTERPOLATIONS)}."
                )
        elif self.condition_interpolation is not None:
            raise ValueError(interpolation_error(self.condition_interpolation))

    @property
    def condition_resize(self) -> str:
        """How the condition view is made, in words (the model card's setting, the run record's)."""
        if self.condition_source == "image":
            return "the source image, resized by PIL (bicubic, antialiased, 8 bit)"
        mode, _, antialias = self.condition_interpolation.partition("_")
        return f"the target tensor, {mode} {'with' if antialias else 'without'} antialias"

    def square(self, image: Image.Image, resolution: int, fit_policy: str | None = None) -> Image.Image:
        """``image`` as a square of side ``resolution`` under ``fit_policy`` (default: the target fit; a random
        crop is centred here), without the bottleneck: the text-to-image target, the image-to-text image. Under
        ``"keep"`` not a square but the kept-aspect view (the target's bounds, or the condition's when
        ``fit_policy`` is given)."""
        bounds = self.target_keep if fit_policy is None else self.condition_keep
        fit_policy = fit_policy or self.target_fit
        if fit_policy == "keep":
            return keep(image, resolution, bounds)
        if fit_policy in CROP_FITS:
            return fit(center_square(image), resolution)
        if fit_policy == "stretch":
            return _resized(image, resolution, stretch=True)
        return pad_to_square(image, resolution, self.background)

    def condition_view(self, image: Image.Image) -> Image.Image:
        return self.views(image)[0]

    def target_view(self, image: Image.Image) -> Image.Image:
        return self.views(image)[1]

    @property
    def largest_side(self) -> int:
        """The largest view side: what an image needs to be decoded at (see :func:`load_image`'s ``draft``)."""
        return max(self.condition_resolution, self.generation_resolution)

    @property
    def keeps_aspect(self) -> bool:
        """Whether some view keeps the aspect ratio (``"keep"``), so that views of one batch differ in size."""
        return self.target_fit == "keep" or (self.condition_fit == "keep" and self.target_fit not in CROP_FITS)

    @property
    def uses_random_crop(self) -> bool:
        """Whether a view is cut at a position drawn per row (the collator's ``crop_position``)."""
        return "random_crop" in (self.target_fit, self.condition_fit)

    @property
    def decode_fit(self) -> str:
        """The fit that decides which side JPEG draft decoding keeps (see :func:`load_image`'s ``fit``)."""
        return self.target_fit if self.target_fit != "pad" else self.condition_fit

    def views(self, image: Image.Image, crop_position: float | None = None) -> tuple[Image.Image, Image.Image]:
        """``(condition view, target view)`` of ``image`` with as few resizes as exactness allows.

        Under a cropping ``target_fit`` both views come from one square: the centred one, or for
        ``"random_crop"`` the one at ``crop_position`` (centred when None), so the condition is cut from the
        target's crop. Views of one source and shape share one resize: a smaller view is resized from the
        larger one's content when that is at least twice its size (a bicubic downscale from 2x or more above
        the target size is within a level or two of one from the source), else from the source. Under
        ``condition_source="target"`` the target is resized from its square alone and the condition is made from
        its tensor (:meth:`condition_from_target`): a float tensor, not a PIL image.
        """
        target_square = condition_square = image
        target_fit, condition_fit = self.target_fit, self.condition_fit
        if target_fit in CROP_FITS:
            target_square = condition_square = center_square(image, _position(target_fit, crop_position))
            condition_fit = target_fit
        elif condition_fit in CROP_FITS:
            condition_square = center_square(image, _position(condition_fit, crop_position))
        stretch_target, stretch_condition = target_fit == "stretch", condition_fit == "stretch"
        resolution_c, resolution_g = self.condition_resolution, self.generation_resolution
        if self.keeps_aspect:  # each view resized once from its source, as BAGEL's authors make theirs
            target = self._view(target_square, resolution_g, target_fit, self.target_keep)
            if self.condition_source == "target":
                return self.condition_from_target(target), target
            condition = self._view(condition_square, resolution_c, condition_fit, self.condition_keep)
            return (blur(condition, self.blur_factor) if self.bottleneck == "blur" else condition), target
        if self.condition_source == "target":  # the target as the authors make it, then the condition from it
            target = _pad(_resized(target_square, resolution_g, stretch_target), resolution_g, self.background)
            return self.condition_from_target(target), target
        if condition_square is target_square and stretch_target == stretch_condition:
            larger, smaller = sorted((resolution_c, resolution_g), reverse=True)
            big = _resized(target_square, larger, stretch_target)
            source = big if larger >= _DERIVE_RATIO * smaller else target_square
            fitted = {larger: big, smaller: big if smaller == larger else _resized(source, smaller, stretch_target)}
            condition, target = fitted[resolution_c], fitted[resolution_g]
        else:
            condition = _resized(condition_square, resolution_c, stretch_condition)
            target = _resized(target_square, resolution_g, stretch_target)
        condition = _pad(condition, resolution_c, self.background)
        if self.bottleneck == "blur":
            condition = blur(condition, self.blur_factor)
        return condition, _pad(target, resolution_g, self.background)

    def _view(self, image: Image.Image, resolution: int, fit_policy: str, bounds: KeepBounds) -> Image.Image:
        """One view of ``image`` (already cut to its square under a crop fit) under ``fit_policy``."""
        if fit_policy == "keep":
            return keep(image, resolution, bounds)
        return _pad(_resized(image, resolution, fit_policy == "stretch"), resolution, self.background)

    def condition_from_target(self, target: Image.Image | torch.Tensor) -> torch.Tensor:
        """A ``"target"`` condition: the target view's float tensor (0..1, not re-quantised) resampled to the
        condition resolution at :attr:`condition_interpolation` (under a ``"keep"`` condition fit, to the
        :func:`keep_size` of the target's size), or under ``"blur"`` down to ``1 / blur_factor`` of that and back
        up; the tensor itself where the sizes agree. Returns ``(3, H, W)``."""
        pixels = target if isinstance(target, torch.Tensor) else to_tensor([target], (0.0,) * 3, (1.0,) * 3)[0]
        side = self.condition_resolution
        if self.condition_fit == "keep" and self.target_fit not in CROP_FITS:
            width, height = keep_size(pixels.shape[-1], pixels.shape[-2], side, self.condition_keep)
            size = (height, width)
        else:
            size = (side, side)
        if self.bottleneck == "blur":
            small = tuple(max(1, n // self.blur_factor) for n in size)
            pixels = resample(pixels, small, self.condition_interpolation)
        return resample(pixels, size, self.condition_interpolation)


def _position(fit_policy: str, crop_position: float | None) -> float:
    """Where a crop fit cuts its square: a random crop at ``crop_position``, everything else at the centre."""
    return crop_position if fit_policy == "random_crop" and crop_position is not None else 0.5


def _resized(image: Image.Image, resolution: int, stretch: bool) -> Image.Image:
    """``image`` resized to a ``resolution`` square (``stretch``), else with its longer side at ``resolution``."""
    if not stretch:
        return fit(image, resolution)
    size = (resolution, resolution)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def resample(pixels: torch.Tensor, side: int | tuple[int, int], interpolation: str) -> torch.Tensor:
    """``pixels`` ``(3, H, W)`` or ``(B, 3, H, W)`` resized to a ``side`` square (or to ``side = (H, W)``) by
    ``torch.nn.functional.interpolate`` (``interpolation``: one of :data:`INTERPOLATIONS`); the tensor itself when it
    already has that size."""
    size = tuple(side) if isinstance(side, tuple) else (side, side)
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    mode, _, antialias = interpolation.partition("_")
    batch = pixels if pixels.dim() == 4 else pixels[None]
    corners = False if mode in ("bilinear", "bicubic") else None  # the default, said aloud (no warning)
    out = F.interpolate(batch.float(), size=size, mode=mode, align_corners=corners, antialias=bool(antialias))
    return out if pixels.dim() == 4 else out[0]


def view_size(view: Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a view: a PIL image or a ``"target"`` condition tensor ``(3, H, W)``."""
    if isinstance(view, torch.Tensor):
        return int(view.shape[-1]), int(view.shape[-2])
    return view.size


def view_image(view: Image.Image | torch.Tensor) -> Image.Image:
    """A view as a PIL image, to look at (a ``"target"`` condition tensor is quantised to 8 bit for display only)."""
    return to_pil(view[None], (0.0,) * 3, (1.0,) * 3)[0] if isinstance(view, torch.Tensor) else view


def to_tensor(images: list[Image.Image | torch.Tensor], mean, std) -> torch.Tensor:
    """Stack views into a float tensor ``(B, 3, H, W)`` normalised as ``(x - mean) / std`` on the 0..1 scale.

    The one helper every adapter's ``prepare`` turns views into pixels with: RGB PIL images (``x = pixel / 255``)
    and ``"target"`` condition tensors ``(3, H, W)`` (already on the 0..1 scale, kept in float) alike.
    """
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    bias = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std
    if any(isinstance(image, torch.Tensor) for image in images):
        pixels = torch.stack([_unit_pixels(image) for image in images])
        return pixels.mul_(1.0 / std).add_(bias)
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).contiguous()
    return pixels.float().mul_(1.0 / (255.0 * std)).add_(bias)  # in place: one float pass after the cast


def to_tensors(images: list[Image.Image | torch.Tensor], mean, std) -> list[torch.Tensor]:
    """:func:`to_tensor` one view at a time: ``(3, H, W)`` each, for views of different sizes (the ``keep`` fit)."""
    return [to_tensor([image], mean, std)[0] for image in images]


def _unit_pixels(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """One view as ``(3, H, W)`` float32 on the 0..1 scale."""
    if isinstance(image, torch.Tensor):
        return image.detach().to(torch.float32).clone()
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255.0)


def to_pil(pixels: torch.Tensor, mean, std) -> list[Image.Image]:
    """Invert :func:`to_tensor` for ``(B, 3, H, W)`` or ``(B, H, W, 3)`` tensors."""
    if pixels.shape[1] == 3 and pixels.shape[-1] != 3:
        pixels = pixels.permute(0, 2, 3, 1)
    array = pixels.detach().float().cpu().numpy() * np.asarray(std) + np.asarray(mean)
    array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in array]


# ---- the bottleneck policy: which views a run may use -------------------------------------------
#
# RecA's method, not any architecture's: an architecture adapter supplies its facts (the representation
# its condition and target live in, its minimum understanding resolution, how sizes round), these rules
# decide what "auto" means and which condition views are refused.

AUTO = "auto"


def shortcut_problem(kind, condition: int, generation: int, bottleneck: str) -> str | None:
    """Why this view setting lets the model copy its condition into its target (None when it does not).

    ``kind`` is an architecture adapter (class or instance). Only same-space adapters can copy: their
    condition is the target's own tokens. A condition view at or above the generation resolution that is
    not blurred carries every target token.
    """
    if not kind.shares_representation() or bottleneck == "blur" or condition < generation:
        return None
    return (
        f"the {kind.name} adapter reads its condition in the same representation it generates "
        f"({kind.condition_space!r}), and a condition view at {condition} px with condition_bottleneck="
        f"{bottleneck!r} carries the target ({generation} px) token for token. The model then learns to copy "
        "its input instead of understanding it: the reconstruction loss collapses toward zero within a few "
        "thousand steps and generation ends up worse than before RecA. Fix: set condition_resolution to at "
        f"most {generation // 2} (or 'auto') with condition_bottleneck='resize' (preferred), or keep the "
        "resolution and set condition_bottleneck='blur' with blur_factor >= 4. For a deliberate ablation, "
        "set allow_shortcut=True."
    )


def shortcut_error(kind, condition: int, generation: int, bottleneck: str) -> str | None:
    """:func:`shortcut_problem` as an error message naming the two fields (None when there is no problem)."""
    problem = shortcut_problem(kind, condition, generation, bottleneck)
    if problem is None:
        return None
    return f"condition_resolution={condition}, condition_bottleneck={bottleneck!r}: {problem}"


def check_shortcut(kind, views: ViewSpec, allow_shortcut: bool = False) -> None:
    """Refuse (or, with ``allow_shortcut``, warn about) condition views the model could simply copy."""
    condition, generation = views.condition_resolution, views.generation_resolution
    problem = shortcut_problem(kind, condition, generation, views.bottleneck)
    if problem is None:
        return
    if not allow_shortcut:
        raise ValueError(shortcut_error(kind, condition, generation, views.bottleneck))
    message = "allow_shortcut=True: training without an information bottleneck on purpose; " + problem
    warnings.warn(message, UserWarning, stacklevel=4)
    logger.warning(message)


def auto_condition_resolution(kind, generation: int) -> int:
    """What ``condition_resolution="auto"`` means: the minimum understanding resolution, and for same-space
    adapters at most half the generation resolution per side (the guide's 512 -> 256), rounded down to a
    size the adapter accepts."""
    floor = kind.min_condition_resolution
    if kind.shares_representation():
        return min(floor, kind.round_condition_resolution(generation // 2))
    return floor


def interpolation_error(interpolation: str) -> str:
    """The error of a ``condition_interpolation`` set for a condition made from the source image."""
    return (
        f"condition_interpolation={interpolation!r} resamples a condition made from the target tensor "
        "(condition_source='target'); this run's condition comes from the source image (condition_source='image'), "
        "which PIL resizes (bicubic, antialiased) as the understanding processor does: leave condition_interpolation "
        "'auto', or set condition_source='target'."
    )


def resolve_condition_source(kind, source: str = AUTO, interpolation: str = AUTO) -> tuple[str, str | None]:
    """``(condition_source, condition_interpolation)`` with ``"auto"`` resolved from the adapter's
    ``condition_source`` and ``condition_interpolation``; the interpolation is None for ``"image"`` (a ValueError
    naming the field when one was set for it)."""
    source = kind.condition_source if source == AUTO else source
    if source not in CONDITION_SOURCES:
        raise ValueError(f"condition_source={source!r}: choose 'auto' or one of {', '.join(CONDITION_SOURCES)}.")
    if source == "image":
        if interpolation != AUTO:
            raise ValueError(interpolation_error(interpolation))
        return source, None
    return source, kind.condition_interpolation if interpolation == AUTO else interpolation


def resolve_views(
    adapter,
    condition_resolution: int | str = AUTO,
    generation_resolution: int | str = AUTO,
    bottleneck: str = "resize",
    blur_factor: int = 4,
    allow_shortcut: bool = False,
    target_fit: str = AUTO,
    condition_fit: str = AUTO,
    condition_source: str = AUTO,
    condition_interpolation: str = AUTO,
) -> ViewSpec:
    """The views of a run: ``"auto"`` resolved for this model (resolutions; fits, condition source and
    interpolation from the adapter's class attributes of those names), both resolutions checked, the shortcut
    guarded."""
    condition, generation = adapter.resolve_resolutions(condition_resolution, generation_resolution)
    fits = (
        adapter.target_fit if target_fit == AUTO else target_fit,
        adapter.condition_fit if condition_fit == AUTO else condition_fit,
    )
    errors = keep_errors(adapter, *fits)
    if errors:
        raise ValueError("\n".join(errors))
    source = resolve_condition_source(adapter, condition_source, condition_interpolation)
    views = ViewSpec(
        condition, generation, bottleneck, blur_factor, adapter.background_color, *fits, *source,
        target_keep=adapter.target_keep, condition_keep=adapter.condition_keep,
    )  # fmt: skip
    check_shortcut(adapter, views, allow_shortcut)
    return views


def keep_errors(adapter, target_fit: str = AUTO, condition_fit: str = AUTO) -> list[str]:
    """The fits set to ``"keep"`` (``"auto"`` resolved by the adapter) that an adapter stacking its views (not
    ``variable_size``) cannot take, each naming its field."""
    errors = []
    for name, fit_policy in (("target_fit", target_fit), ("condition_fit", condition_fit)):
        resolved = getattr(adapter, name) if fit_policy == AUTO else fit_policy
        if resolved == "keep" and not adapter.variable_size:
            errors.append(
                f"{name}='keep': the {adapter.name} architecture adapter batches views of one size (its prepare "
                "stacks them), and 'keep' gives every image its own size; choose 'center_crop', 'random_crop', "
                "'pad' or 'stretch' (or leave it 'auto')."
            )
    return errors


def views_from_config(adapter, args) -> ViewSpec:
    """:func:`resolve_views` from the view fields of a :class:`~reca_hf.RecAConfig`."""
    return resolve_views(
        adapter,
        args.condition_resolution,
        args.generation_resolution,
        args.condition_bottleneck,
        args.blur_factor,
        args.allow_shortcut,
        args.target_fit,
        args.condition_fit,
        args.condition_source,
        args.condition_interpolation,
    )
