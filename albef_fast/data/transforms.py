"""Image pipelines of ALBEF (REFERENCE §3.3), re-done so that every random draw comes from one RNG
object passed in per sample (never the global `random`/numpy/torch state).

Why: ALBEF draws its augmentation from the global torch RNG (RandomResizedCrop, flip) and the global
numpy RNG (RandomAugment) inside DataLoader workers, so which augmentation a sample gets depends on
the worker count and on the worker's history, and a resumed run cannot replay it. Here the loader
gives each sample its own `random.Random` (seeded from the sample seed, see `dataset.py`), so the
augmentation of a given step is a pure function of (image, seed).

Pipelines (all bicubic resizing, CLIP normalisation):

* ``pretrain``: RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3)) with torchvision's
  `get_params` procedure (10 attempts, then the central fallback) -> horizontal flip p=0.5 ->
  RandomAugment(N=2, M=7) over ALBEF's ten ops -> ToTensor -> Normalize.
* ``none``: Resize((size, size)) -> ToTensor -> Normalize. This is also the evaluation transform, and
  the one the demo uses (its captions say left/right, so flips and crops would make them false).

RandomAugment (ALBEF `dataset/randaugment.py`): N ops are drawn uniformly *with replacement*, each one
is applied with probability 0.5, at level M=7 of 10: Brightness/Sharpness factor 7/10*1.8+0.1 = 1.36;
ShearX/ShearY factor 0.21 (random sign); TranslateX/TranslateY 7 px (random sign; ALBEF uses
translate_const=10 whatever the image size); Rotate 21 degrees (random sign); fill (128, 128, 128).

Known differences from ALBEF (distributional equivalence is the goal, not pixel parity):

* ALBEF runs RandomAugment with OpenCV/numpy on the uint8 array; here the PIL implementations behind
  torchvision.transforms.functional are used. Rounding differs by at most a grey level or so; resampling
  of the geometric ops is bilinear in both, but PIL and OpenCV place pixel centres half a pixel apart.
* ALBEF's Sharpness casts the blended float image to uint8 *without clipping*, so over-bright pixels
  wrap around (a bug); PIL's ImageEnhance clips. Its 3x3 smoothing kernel (1,1,1;1,5,1;1,1,1)/13 and
  the untouched one-pixel border are the same as PIL's.
* Shears are anchored at the top-left corner as OpenCV's `warpAffine([[1, f, 0], [0, 1, 0]])` does
  (`center=[0, 0]`), not at the image centre as torchvision's RandomAffine would be. The sign
  convention of the shear/translate/rotate direction is irrelevant because the sign is drawn 50/50.
* AutoContrast and Equalize: PIL's `ImageOps` versions, per channel as in ALBEF.
* Translate is an integer pad + crop (7 px is a whole number of pixels), identical to a bilinear warp.
* ToTensor + Normalize is fused into one multiply-add ((x/255 - mean)/std == x*a - b); values agree
  with torchvision's pair to ~1e-6.
* The order of the random draws (not their distribution) differs from ALBEF: e.g. the sign of an
  op's magnitude is drawn only when the op is applied, as in ALBEF, but from the per-sample RNG.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Augment = Literal["pretrain", "none"]
AUGMENTS: tuple[str, ...] = get_args(Augment)

# RandomResizedCrop arguments of ALBEF pretraining.
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# RandomAugment arguments of ALBEF pretraining (N=2, M=7, MAX_LEVEL=10).
RA_NUM_OPS = 2
RA_MAGNITUDE = 7
RA_MAX_LEVEL = 10
RA_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
# Ops whose magnitude gets a random sign (drawn only when the op is applied, as ALBEF does).
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
_LEVEL = RA_MAGNITUDE / RA_MAX_LEVEL
ENHANCE_FACTOR = _LEVEL * 1.8 + 0.1  # 1.36
SHEAR_FACTOR = _LEVEL * 0.3  # 0.21 = tan(shear angle)
TRANSLATE_PX = round(_LEVEL * 10)  # 7 px (ALBEF's translate_const=10, independent of the image size)
ROTATE_DEG = _LEVEL * 30.0  # 21 degrees
FILL = [128.0, 128.0, 128.0]
# torchvision's affine takes the shear as an angle and applies tan(angle).
_SHEAR_DEG = math.degrees(math.atan(SHEAR_FACTOR))
_BILINEAR = InterpolationMode.BILINEAR
_BICUBIC = InterpolationMode.BICUBIC

# (x/255 - mean)/std == x*_SCALE + _NEG_SHIFT, precomputed once as (3, 1, 1) for broadcasting.
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD], dtype=torch.float32).view(3, 1, 1)
_NEG_SHIFT = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=torch.float32).view(3, 1, 1)


def random_resized_crop_params(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` procedure with the draws taken from `rng`.

    Args:
        width, height: size of the source image in pixels.
        rng: the per-sample RNG.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
    Returns:
        (top, left, crop_height, crop_width) in pixels.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)  # inclusive bounds == torch.randint(0, height - h + 1)
            left = rng.randint(0, width - w)
            return top, left, h, w
    # Fallback: central crop clamped to the ratio range (same as torchvision).
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _translate(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """Shift by whole pixels, exposing FILL: pad on one side, crop back to size.

    Pixel-identical to `TF.affine(img, 0, [dx, dy], 1, [0, 0], BILINEAR, FILL)` for integer shifts (the
    bilinear samples land on pixel centres) and ~8x faster than PIL's generic affine warp."""
    width, height = img.size
    padded = TF.pad(img, [max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)], fill=128)
    return TF.crop(padded, max(-dy, 0), max(-dx, 0), height, width)


def apply_op(img: Image.Image, name: str, rng: random.Random) -> Image.Image:
    """Apply one RandomAugment op of ALBEF's list at M=7 (signs drawn from `rng`).

    Args:
        img: RGB PIL image.
        name: one of `RA_OPS`.
        rng: the per-sample RNG (used for the random sign of the geometric ops).
    Returns:
        The transformed RGB PIL image, same size.
    """
    # ALBEF flips the sign of a magnitude with probability 0.5 (drawn only for the signed ops).
    sign = -1 if name in SIGNED_OPS and rng.random() > 0.5 else 1
    return apply_signed_op(img, name, sign)


def apply_signed_op(img: Image.Image, name: str, sign: int) -> Image.Image:
    """`apply_op` with the sign of the magnitude given (+1/-1; ignored by the unsigned ops)."""
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Brightness":
        return TF.adjust_brightness(img, ENHANCE_FACTOR)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, ENHANCE_FACTOR)
    if name == "ShearX":
        # Anchored at the top-left corner, as OpenCV's warpAffine with [[1, f, 0], [0, 1, 0]].
        return TF.affine(img, 0.0, [0, 0], 1.0, [sign * _SHEAR_DEG, 0.0], _BILINEAR, FILL, [0, 0])
    if name == "ShearY":
        return TF.affine(img, 0.0, [0, 0], 1.0, [0.0, sign * _SHEAR_DEG], _BILINEAR, FILL, [0, 0])
    if name == "TranslateX":
        return _translate(img, sign * TRANSLATE_PX, 0)
    if name == "TranslateY":
        return _translate(img, 0, sign * TRANSLATE_PX)
    if name == "Rotate":
        return TF.rotate(img, sign * ROTATE_DEG, _BILINEAR, fill=FILL)
    raise ValueError(f"unknown RandomAugment op {name!r}; valid ops: {', '.join(RA_OPS)}")


def random_augment(img: Image.Image, rng: random.Random, num_ops: int = RA_NUM_OPS) -> Image.Image:
    """ALBEF's RandomAugment(N=num_ops, M=7): draw N ops with replacement, apply each with p=0.5."""
    ops = [rng.choice(RA_OPS) for _ in range(num_ops)]
    for name in ops:
        if rng.random() > 0.5:  # ALBEF: `if np.random.random() > prob: continue`
            continue
        img = apply_op(img, name, rng)
    return img


@dataclass(frozen=True, slots=True)
class AugParams:
    """Every random draw of the pretraining augmentation of one sample, in source-image pixels.

    The PIL pipeline and the DALI graph both apply these, so one seed gives the same crop, flip and
    RandomAugment ops on every backend (only the pixel arithmetic differs).
    """

    top: int
    left: int
    height: int
    width: int
    """Crop box of RandomResizedCrop in the source image (before the resize to size x size)."""
    flip: bool
    ops: tuple[tuple[str, int], ...]
    """The RandomAugment ops that are applied, in order, each with its sign (+1/-1; +1 for unsigned ops)."""


def draw_pretrain_params(width: int, height: int, rng: random.Random) -> AugParams:
    """Draw the pretraining augmentation of an image of `width` x `height` pixels from `rng`.

    The draws happen in exactly the order of the original composition (crop, flip, the N op choices,
    then per op the apply coin and, if applied and signed, the sign), so that `ImageTransform` output
    is unchanged by this factoring.

    Args:
        width, height: source image size in pixels.
        rng: the per-sample RNG.
    Returns:
        AugParams.
    """
    top, left, h, w = random_resized_crop_params(width, height, rng)
    flip = rng.random() < 0.5  # torchvision RandomHorizontalFlip: `if torch.rand(1) < p`
    names = [rng.choice(RA_OPS) for _ in range(RA_NUM_OPS)]
    ops = []
    for name in names:
        if rng.random() > 0.5:  # ALBEF: `if np.random.random() > prob: continue`
            continue
        sign = (-1 if rng.random() > 0.5 else 1) if name in SIGNED_OPS else 1  # ALBEF's 50/50 negation
        ops.append((name, sign))
    return AugParams(top, left, h, w, flip, tuple(ops))


def apply_pretrain_params(img: Image.Image, params: AugParams, size: int) -> Tensor:
    """Apply drawn pretraining params with PIL (the CPU twin of the DALI graph).

    Args:
        img: RGB PIL image, the size the params were drawn for.
        params: from `draw_pretrain_params`.
        size: output side.
    Returns:
        (3, size, size) float32, CLIP-normalised.
    """
    p = params
    img = TF.resized_crop(img, p.top, p.left, p.height, p.width, [size, size], _BICUBIC)
    if p.flip:
        img = TF.hflip(img)
    for name, sign in p.ops:
        img = apply_signed_op(img, name, sign)
    return to_normalized_tensor(img)


def to_normalized_tensor(img: Image.Image) -> Tensor:
    """ToTensor + CLIP Normalize in one pass.

    Args:
        img: RGB PIL image of size (W, H).
    Returns:
        (3, H, W) float32, contiguous.
    """
    width, height = img.size
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3); np.array copies (writable)
    out = torch.empty((3, height, width), dtype=torch.float32)
    # One fused multiply-add writes the contiguous CHW float tensor straight from the HWC uint8 view
    # (`out=` keeps it contiguous; without it the result would inherit the permuted strides).
    torch.addcmul(_NEG_SHIFT, hwc.permute(2, 0, 1), _SCALE, out=out)
    return out


class ImageTransform:
    """The ALBEF image pipeline for one resolution, with explicit per-sample randomness.

    Args:
        size: output side in pixels (images come out square, size x size).
        augment: "pretrain" (crop + flip + RandomAugment) or "none" (resize only; also the eval transform).
    """

    def __init__(self, size: int, augment: Augment) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augment {augment!r}; valid values: {', '.join(map(repr, AUGMENTS))}")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.augment: Augment = augment

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, augment={self.augment!r})"

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Tensor:
        """Transform one image.

        Args:
            img: PIL image (converted to RGB if it is not).
            rng: the per-sample `random.Random` that owns every random draw; required for "pretrain",
                ignored (may be None) for "none". The `random` module itself is refused: it is global state.
        Returns:
            (3, size, size) float32, CLIP-normalised.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        size = self.size
        if self.augment == "none":
            img = TF.resize(img, [size, size], _BICUBIC)
            return to_normalized_tensor(img)
        if not isinstance(rng, random.Random):
            raise TypeError(
                "the 'pretrain' transform needs a per-sample random.Random instance, "
                f"got {type(rng).__name__}"
            )
        return apply_pretrain_params(img, draw_pretrain_params(*img.size, rng), size)
