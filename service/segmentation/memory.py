"""What a request holds in memory at its peak, estimated from its headers before any pixel is
decoded: the figure requests are admitted against (:class:`~service.core.resources.MemoryBudget`).
"""

from __future__ import annotations

from service.inference.instances import WINDOW_PIXELS
from service.inference.modelmeta import ModelMetadata
from service.inference.normalize import HIST_CHUNK_PIXELS
from service.inference.rescale import ScalePlan, rescale_bytes
from service.inference.tiling import BATCHES_IN_FLIGHT
from service.segmentation.images import ImageHeader


def request_memory(
    meta: ModelMetadata,
    image: ImageHeader,
    batch_size: int,
    truth: ImageHeader | None = None,
    *,
    batch_bytes: int = 0,
    scale: ScalePlan | None = None,
    instances: bool = False,
) -> int:
    """An upper bound of the memory :func:`~service.segmentation.usecase.run` plus encoding
    hold for this request on top of the idle process, from the headers alone: the larger of
    its two peaks, decoding and inference (docs/design.md's formula, term by term).

    With a ``scale`` (``diameter=``, planned once per request) the model runs on each plane
    rescaled: the tiler's strips are as wide as the rescaled plane, and the resampled plane and
    the resampling buffers (:func:`~service.inference.rescale.rescale_bytes`) come on top.

    With ``instances`` the objects are labelled too: uint32 labels of every plane, one plane's
    labels on their way in, the truth's objects (int64 at worst), and the labelling's
    strip window (:data:`~service.inference.instances.WINDOW_PIXELS`: a feature transform,
    component labels and masks).

    ``batch_bytes`` is ONNX Runtime's memory for one tile batch, measured at warm-up
    (``SegmentationModel.request_bytes``). Checked against the real process by
    tests/test_budgets.py (the measured peak stays under it) and docs/memory.md.
    """
    hw = image.height * image.width
    t, c, k = meta.tile_size, meta.channels, meta.output_channels
    # Decoding: the decoder's own buffers beside the image, then the truth's beside both.
    decoding = image.decode_peak
    if truth is not None:  # then its labels are checked (np.unique sorts a copy)
        truth_peak = max(truth.decode_peak, 3 * truth.nbytes + hw)
        decoding = max(decoding, image.nbytes + truth_peak)
    held = image.nbytes  # the decoded image stays until the answer is encoded
    if image.channels != c:
        held += 4 * hw * c  # to_channels: one float32 plane per model channel
    if truth is not None:
        held += 3 * hw * image.planes  # its class maps, and boolean masks while scoring
    strip_width, rescaling = image.width, 0
    if scale is not None:
        strip_width = scale.scaled_width
        samples = image.pixels * image.planes * image.channels
        sample_bytes = image.nbytes // samples if samples else 1
        if image.channels != c:
            sample_bytes = 4  # to_channels' output: at most a float32 sample
        rescaling = rescale_bytes(scale, c, sample_bytes, k, t)
    inference = (
        held
        + 2 * hw * image.planes  # the uint8 mask (every plane) and the copy that is encoded
        + 12 * t * strip_width * (k + 1)  # the probability and weight strips
        + rescaling  # the rescaled plane and the resampling buffers
        # tile batches in and out (float32, and a copy), as many as the overlapped tiler holds
        + BATCHES_IN_FLIGHT * 8 * batch_size * t * t * (c + k)
        + 8 * HIST_CHUNK_PIXELS  # the int64 histogram counts of one chunk of rows
        + batch_bytes  # ONNX Runtime's buffers for one tile batch, measured
    )
    if instances:
        labelled = 4 * hw * image.planes + 4 * hw + 16 * WINDOW_PIXELS
        if truth is not None:
            labelled += 8 * hw * image.planes
        inference += labelled + 4 * hw  # labels encoded: a 16/32-bit copy of one plane
    return max(decoding, inference)


def smallest_request_memory(meta: ModelMetadata, batch_size: int, batch_bytes: int) -> int:
    """What the smallest request (one 8-bit tile) needs, by :func:`request_memory`: at
    start-up, a budget below it means the model can serve nothing."""
    side = meta.tile_size
    header = ImageHeader("PNG", side, side, meta.channels, side * side)
    return request_memory(meta, header, batch_size, batch_bytes=batch_bytes)


def preview_memory(header: ImageHeader) -> int:
    """What ``/preview`` holds at its peak: the decoder's, then the first plane as float32
    twice (scaled, clipped) beside its 8-bit result
    (:func:`~service.segmentation.preview.stretch`)."""
    shown = header.pixels * min(header.channels, 3)
    return max(header.decode_peak, header.nbytes + 9 * shown)
