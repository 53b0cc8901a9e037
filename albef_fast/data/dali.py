"""NVIDIA DALI image pipeline: decoding and the ALBEF augmentation on the GPU ("mixed" decoding), or
the same graph on the CPU (device_id=None), which is how the unit tests exercise it without a GPU.

Output contract (same as the PIL twin `transforms.ImageTransform`): (B, 3, size, size) float32,
CLIP-normalised; on the GPU backend the tensor is already on the CUDA device.

Randomness. DALI's own random operators draw from a pipeline-wide generator, so a sample's
augmentation would depend on everything the pipeline processed before it and a resumed run could not
replay it. Here the graph has *no* random operator: every draw is made on the host by
`transforms.draw_pretrain_params` from the per-sample seed (the same function the PIL path uses) and
fed in with the encoded bytes, so one seed gives the same crop, flip and RandomAugment ops on every
backend. Only the pixel arithmetic differs (distributional parity, as PERFORMANCE.md §3 says).

The graph, per sample (pretrain):

    decode (mixed: nvJPEG / HW decoder; cpu: libjpeg-turbo etc.) -> RGB uint8 HWC
    -> resize of the crop box (roi) to size x size, cubic, antialiased    (RandomResizedCrop)
    -> flip (horizontal, per-sample flag)                                  (RandomHorizontalFlip)
    -> 2 x RandomAugment slot: a DALI conditional on the host-drawn op code
         AutoContrast: per-channel (x - min) * 255 / (max - min), identity for a flat channel
         Equalize:     PIL's ImageOps.equalize exactly: per-channel 256-bin histogram -> PIL's LUT
                       (`equalize_lut`) -> lookup, through DALI's DLPack python operator, once per batch
                       for the samples that drew it (`pil_equalize_batch`: one stack on the GPU)
                       (fn.equalize builds OpenCV's LUT, a different formula: mean ~6 grey levels off)
         Brightness:   fn.brightness(1.36)
         Sharpness:    3x3 correlation with 1.36*delta - 0.36*PIL's SMOOTH kernel (PIL blends the
                       smoothed image with factor 1.36; the blend is linear, so one kernel does it;
                       PIL keeps the one-pixel border, here the border is clamped)
         ShearX/Y, TranslateX/Y, Rotate: fn.warp_affine with the host-built 2x3 destination->source
                       matrix, bilinear, fill 128
    -> crop_mirror_normalize to CHW float32 with the CLIP mean/std (x 255).

"none" (evaluation): decode -> resize to size x size (cubic) -> normalise.

Robustness. DALI fails a whole batch on one undecodable sample, so the dataset validates every image
on the host first (header parse, truncation check, format whitelist; see `dataset.encoded_image`)
and replaces bad samples before they get here. If DALI still fails on a batch, the loader decodes
that batch with the PIL twin instead and counts it (`loader.DaliLoader`).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import sys
import weakref
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from albef_fast.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ENHANCE_FACTOR,
    RA_NUM_OPS,
    ROTATE_DEG,
    SHEAR_FACTOR,
    TRANSLATE_PX,
    Augment,
    AugParams,
)

__all__ = ["OP_CODES", "DaliImagePipeline", "affine_matrix", "dali_unavailable_reason", "equalize_lut", "pil_equalize",
           "pil_equalize_batch", "sample_inputs"]


def _disown_pipelines_after_fork() -> None:
    """In a child forked from a process that built DALI pipelines (DataLoader workers start by fork):
    take every pipeline's native handle away from it without shutting it down. The child holds copies of
    pipelines whose worker threads exist only in the parent; a pipeline that was garbage at the fork (a
    reference cycle, e.g. one dropped by `DaliImagePipeline.reset`) is finalised wherever the cycle
    collector next runs, and DALI's shutdown in the child then segfaults or hangs (seen as SIGSEGV in
    loader workers forked after DALI had run: tests/unit/test_data_dali.py reproduces it). Destroying a
    native pipeline also joins its threads, so each handle is leaked on purpose (one extra reference,
    never released, also not at interpreter exit). Our wrappers drop their pipeline and rebuild one if
    the child decodes. Uses DALI's registry of pipelines (`Pipeline._pipes`, weak references); nothing to
    do if DALI was never imported. The collector is off meanwhile, so nothing is finalised half-way."""
    module = sys.modules.get("nvidia.dali.pipeline")
    if module is None:
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for ref in list(getattr(getattr(module, "Pipeline", None), "_pipes", ())):
            pipe = ref()
            native = getattr(pipe, "_pipe", None)
            if native is not None:
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(native))
                pipe._pipe = None  # Pipeline._shutdown is then a no-op; the parent's pipeline is untouched
        for wrapper in list(_WRAPPERS):
            wrapper._pipe = None
    finally:
        if was_enabled:
            gc.enable()


_WRAPPERS: weakref.WeakSet = weakref.WeakSet()
"""Every DaliImagePipeline of this process (reset in a forked child)."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_pipelines_after_fork)

# Op codes fed to the graph (0 = slot not applied / Identity).
OP_CODES = {"Identity": 0, "AutoContrast": 1, "Equalize": 2, "Brightness": 3, "Sharpness": 4,
            "ShearX": 5, "ShearY": 5, "TranslateX": 5, "TranslateY": 5, "Rotate": 5}
_AFFINE = 5

# PIL's ImageFilter.SMOOTH kernel; Sharpness(f) = f * img + (1 - f) * smooth(img).
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float64) / 13.0
_SHARPEN = (ENHANCE_FACTOR * np.pad(np.ones((1, 1)), 1) + (1.0 - ENHANCE_FACTOR) * _SMOOTH).astype(np.float32)


def equalize_lut(hist: Tensor) -> Tensor:
    """The per-channel lookup table of PIL's `ImageOps.equalize` from the channels' histograms.

    PIL, per channel with histogram h (256 bins) of N pixels: if at most one bin is non-empty, or
    step = (N - h[last non-empty bin]) // 255 is 0, the identity; else
    lut[i] = (step // 2 + sum_{j < i} h[j]) // step, and `Image.point` clips it to 255 (it can reach
    256 at the last non-empty bin). Integer arithmetic throughout, so the result is exact. O(256*C) on
    the histogram's device, no host synchronisation.

    Args:
        hist: (C, 256) int64 pixel counts per channel and grey level.
    Returns:
        (C, 256) int64 in [0, 255].
    """
    if hist.dim() != 2 or hist.shape[1] != 256 or hist.dtype != torch.int64:
        raise ValueError(f"hist must be (C, 256) int64, got {tuple(hist.shape)} {hist.dtype}")
    C = hist.shape[0]
    nonempty = hist > 0
    last = 255 - nonempty.flip(1).long().argmax(1)  # the highest non-empty bin
    step = (hist.sum(1) - hist.gather(1, last[:, None])[:, 0]) // 255
    below = hist.cumsum(1) - hist  # sum_{j < i} h[j]
    lut = ((step[:, None] // 2 + below) // step.clamp(min=1)[:, None]).clamp(max=255)
    use = (nonempty.sum(1) > 1) & (step > 0)
    return torch.where(use[:, None], lut, torch.arange(256, device=hist.device).expand(C, 256))


def pil_equalize(image: Tensor) -> Tensor:
    """PIL's `ImageOps.equalize` of an (H, W, C) uint8 tensor, bit-exact; returns (H, W, C) uint8.

    The histogram and the lookup run in numpy for a CPU tensor (single-threaded: torch's intra-op threads
    cost more than they give on one image, 10-50 ms instead of ~2 ms on the loaded 2-core dev machine) and
    in torch on a CUDA tensor; `equalize_lut` is shared.
    """
    _check_hwc_uint8(image)
    if image.is_cuda:
        return _equalize_torch(image)
    a = image.numpy()
    hist = np.stack([np.bincount(a[..., c].ravel(), minlength=256) for c in range(a.shape[-1])])
    lut = equalize_lut(torch.from_numpy(hist.astype(np.int64))).numpy().astype(np.uint8)
    return torch.from_numpy(np.stack([lut[c][a[..., c]] for c in range(a.shape[-1])], -1))


def _check_hwc_uint8(image: Tensor) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"image must be (H, W, C) uint8, got {tuple(image.shape)} {image.dtype}")


def _equalize_torch(images: Tensor) -> Tensor:
    """`pil_equalize` of an (H, W, C) image or an (N, H, W, C) stack in torch ops only: one histogram
    and one lookup for the whole stack (the CUDA path; runs on any device)."""
    x = images.reshape(-1, *images.shape[-3:])
    N, C = x.shape[0], x.shape[-1]
    plane = (torch.arange(N, device=x.device)[:, None] * C + torch.arange(C, device=x.device)) * 256  # (N, C)
    idx = x.reshape(N, -1, C).long() + plane[:, None, :]
    hist = torch.bincount(idx.reshape(-1), minlength=256 * N * C).view(N * C, 256)
    return equalize_lut(hist).reshape(-1)[idx].reshape(images.shape).to(torch.uint8)


def pil_equalize_batch(images: list[Tensor]) -> list[Tensor]:
    """`pil_equalize` of each image of a list: CUDA images of one shape as one stack (a few launches per
    batch instead of per image), anything else image by image."""
    if images and images[0].is_cuda and len({tuple(im.shape) for im in images}) == 1:
        for im in images:
            _check_hwc_uint8(im)
        return list(_equalize_torch(torch.stack(images)).unbind(0))
    return [pil_equalize(im) for im in images]


def _equalize_dlpack(images):  # DALI's DLPack operator, the batch's Equalize samples; module scope for AutoGraph
    outs = pil_equalize_batch([torch.from_dlpack(im) for im in images])
    if outs and outs[0].is_cuda:  # DALI synchronised its stream before the call; the result must be ready on return
        torch.cuda.current_stream(outs[0].device).synchronize()
    return [torch.utils.dlpack.to_dlpack(out) for out in outs]


def dali_unavailable_reason() -> str | None:
    """None when `nvidia.dali` imports, else why not (for the backend log line)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return f"nvidia-dali is not importable ({type(e).__name__}: {e})"
    return None


def affine_matrix(name: str, sign: int, size: int) -> np.ndarray:
    """The destination->source 2x3 matrix of a geometric RandomAugment op on a size x size image.

    DALI's continuous coordinates put pixel centres at +0.5, so the rotation centre is (size/2, size/2).
    The directions match the PIL twin for the same sign (tests/unit/test_data_dali.py checks it).

    Args:
        name: ShearX, ShearY, TranslateX, TranslateY or Rotate.
        sign: +1 or -1, the drawn sign of the magnitude.
        size: image side in pixels.
    Returns:
        (2, 3) float32.
    """
    if name == "ShearX":  # anchored at the top-left corner (OpenCV warpAffine [[1, f, 0], [0, 1, 0]])
        m = [[1.0, sign * SHEAR_FACTOR, 0.0], [0.0, 1.0, 0.0]]
    elif name == "ShearY":
        m = [[1.0, 0.0, 0.0], [sign * SHEAR_FACTOR, 1.0, 0.0]]
    elif name == "TranslateX":  # content moves by +sign*7 px: source = destination - shift
        m = [[1.0, 0.0, -sign * TRANSLATE_PX], [0.0, 1.0, 0.0]]
    elif name == "TranslateY":
        m = [[1.0, 0.0, 0.0], [0.0, 1.0, -sign * TRANSLATE_PX]]
    elif name == "Rotate":  # counter-clockwise on screen for sign +1, as PIL's rotate
        a = math.radians(sign * ROTATE_DEG)
        c, s = math.cos(a), math.sin(a)
        centre = size / 2.0
        # source = centre + R(-a) (destination - centre) in y-down coordinates
        m = [[c, -s, centre - c * centre + s * centre], [s, c, centre - s * centre - c * centre]]
    else:
        raise ValueError(f"{name!r} is not a geometric RandomAugment op")
    return np.asarray(m, dtype=np.float32)


def sample_inputs(params: AugParams, size: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The per-sample graph inputs of drawn params: roi (4,), flip (), op codes and matrices per slot."""
    roi = np.array([params.top, params.left, params.top + params.height, params.left + params.width], np.float32)
    codes, mats = [], []
    slots = list(params.ops) + [("Identity", 1)] * (RA_NUM_OPS - len(params.ops))
    for name, sign in slots:
        code = OP_CODES[name]
        codes.append(np.array(code, np.int32))
        mats.append(affine_matrix(name, sign, size) if code == _AFFINE else np.eye(2, 3, dtype=np.float32))
    return roi, np.array(int(params.flip), np.int32), codes, mats


def _build(batch_size: int, size: int, augment: Augment, device: Literal["gpu", "cpu"], num_threads: int,
           device_id: int | None, hw_decoder_load: float | None = None, pipelined: bool = False):
    """The DALI pipeline, built. pipelined=False: the synchronous executor, one batch at a time (feed, then
    run), which is what `DaliImagePipeline` drives. pipelined=True: DALI's default (dynamic, asynchronous)
    executor with two iterations in flight, driven by feed + schedule_run / outputs; only
    bench_dataloader.py's "dali-pipelined" stage uses it, to measure on a GPU whether overlapping
    consecutive batches inside DALI is worth a streaming loader."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    decoder_device = "mixed" if device == "gpu" else "cpu"
    decoder_args = {"hw_decoder_load": hw_decoder_load} if device == "gpu" and hw_decoder_load is not None else {}
    mean = [255.0 * m for m in CLIP_MEAN]
    std = [255.0 * s for s in CLIP_STD]

    def autocontrast(img):
        f = fn.cast(img, dtype=types.FLOAT)
        lo = fn.reductions.min(f, axes=[0, 1])  # (3,) per channel
        hi = fn.reductions.max(f, axes=[0, 1])
        spread = hi - lo
        ok = spread > 0  # a flat channel stays as it is (PIL's autocontrast)
        scale = ok * (255.0 / dmath.max(spread, 1.0)) + (1 - ok)
        return fn.cast(dmath.clamp((f - lo * ok) * scale + 0.5, 0.0, 255.0), dtype=types.UINT8)

    @pipeline_def(enable_conditionals=True)
    def pretrain():
        enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        roi = fn.external_source(name="roi", dtype=types.FLOAT, ndim=1)
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        codes = [fn.external_source(name=f"op{k}", dtype=types.INT32, ndim=0) for k in range(RA_NUM_OPS)]
        mats = [fn.external_source(name=f"mat{k}", dtype=types.FLOAT, ndim=2) for k in range(RA_NUM_OPS)]
        img = fn.decoders.image(enc, device=decoder_device, output_type=types.RGB, **decoder_args)
        img = fn.resize(img, roi_start=roi[0:2], roi_end=roi[2:4], roi_relative=False, size=[size, size],
                        interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.flip(img, horizontal=flip)
        for code, mat in zip(codes, mats):
            if code == 1:
                img = autocontrast(img)
            elif code == 2:
                img = fn.dl_tensor_python_function(img, function=_equalize_dlpack, batch_processing=True,
                                                   output_layouts="HWC")
            elif code == 3:
                img = fn.brightness(img, brightness=ENHANCE_FACTOR)
            elif code == 4:
                img = fn.filter(img, types.Constant(_SHARPEN), border="clamp")
            elif code == _AFFINE:
                img = fn.warp_affine(img, matrix=mat, fill_value=128, interp_type=types.INTERP_LINEAR)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)

    @pipeline_def
    def resize_only():
        enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        img = fn.decoders.image(enc, device=decoder_device, output_type=types.RGB, **decoder_args)
        img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)

    graph = pretrain if augment == "pretrain" else resize_only
    if pipelined:
        pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=2)
    else:
        # Fed synchronously batch by batch (feed_input, then run): the overlap with the training step
        # comes from the loader's DALI thread (loader.DaliLoader), so the executor needs no look-ahead.
        pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, exec_pipelined=False,
                     exec_async=False, prefetch_queue_depth=1)
    pipe.build()
    return pipe


class DaliImagePipeline:
    """Decode + augment a batch of encoded images with DALI.

    Args:
        size: output side in pixels.
        augment: "pretrain" or "none".
        batch_size: the largest batch that will be fed.
        device: "gpu" ("mixed" decoding, output on the current CUDA device) or "cpu" (no GPU needed).
        num_threads: DALI CPU threads.
        hw_decoder_load: share of the JPEGs for the GPU's hardware decoder (device "gpu"; None: DALI's
            default, 0.65).
    """

    def __init__(self, size: int, augment: Augment, batch_size: int, *, device: Literal["gpu", "cpu"] = "gpu",
                 num_threads: int = 2, hw_decoder_load: float | None = None) -> None:
        reason = dali_unavailable_reason()
        if reason:
            raise RuntimeError(f"the DALI image backend was asked for but {reason}; "
                               "install nvidia-dali-cuda130 (make venv) or use data.image_backend=pil")
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("the DALI GPU backend needs CUDA; use data.image_backend=dali_cpu or pil")
        self.size, self.augment, self.batch_size, self.device = size, augment, batch_size, device
        self.num_threads, self.hw_decoder_load = num_threads, hw_decoder_load
        self.device_id = torch.cuda.current_device() if device == "gpu" else None
        self._pipe = None
        _WRAPPERS.add(self)

    def __repr__(self) -> str:
        return f"DaliImagePipeline(size={self.size}, augment={self.augment!r}, device={self.device!r})"

    def reset(self) -> None:
        """Drop the pipeline (after a failure DALI pipelines are not reusable); the next call rebuilds it."""
        self._pipe = None

    def __call__(self, encoded: Sequence[np.ndarray], params: Sequence[AugParams | None]) -> Tensor:
        """Decode and transform one batch.

        Args:
            encoded: B 1-D uint8 arrays, each a complete JPEG/PNG/... file (validated by the dataset).
            params: B drawn `AugParams` (pretrain) or Nones ("none").
        Returns:
            (B, 3, size, size) float32, CLIP-normalised; on CUDA for device="gpu".
        """
        B = len(encoded)
        if not 0 < B <= self.batch_size or len(params) != B:
            raise ValueError(f"need 1..{self.batch_size} images with one params each, got {B} and {len(params)}")
        if self._pipe is None:
            self._pipe = _build(self.batch_size, self.size, self.augment, self.device, self.num_threads,
                                self.device_id, self.hw_decoder_load)
        feed(self._pipe, encoded, params, self.augment, self.size)
        (out,) = self._pipe.run()
        return as_torch(out, self.device_id if self.device == "gpu" else None)


def feed(pipe, encoded: Sequence[np.ndarray], params: Sequence[AugParams | None], augment: Augment,
         size: int) -> None:
    """Feed one batch's graph inputs (see `DaliImagePipeline.__call__`) to a pipeline from `_build`."""
    pipe.feed_input("encoded", list(encoded))
    if augment == "pretrain":
        per_sample = [sample_inputs(p, size) for p in params]
        pipe.feed_input("roi", [s[0] for s in per_sample])
        pipe.feed_input("flip", [s[1] for s in per_sample])
        for k in range(RA_NUM_OPS):
            pipe.feed_input(f"op{k}", [s[2][k] for s in per_sample])
            pipe.feed_input(f"mat{k}", [s[3][k] for s in per_sample])


def as_torch(out, device_id: int | None) -> Tensor:
    """A pipeline output (B, 3, size, size) copied into a new float32 tensor: on CUDA device `device_id`
    (ordered on its current stream), or on the CPU for None."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = out.as_tensor()  # every sample has the same shape
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    result = torch.empty(tuple(dense.shape()), dtype=torch.float32, device=device)
    if device_id is None:
        feed_ndarray(dense, result)
    else:
        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(device))
    return result
