"""The mask of a :class:`~service.segmentation.usecase.Segmentation` as the files a client
receives: a PNG (a 2-D image) or a TIFF with the image's plane axes (a stack, or a 2-D image
asked for as TIFF). The one set of encoders: ``/segment``, ``/jobs`` and the page go through
them, and the ``encode`` stage of the timings is theirs.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import tifffile

from service.inference.modelmeta import ModelMetadata, Task
from service.segmentation.images import encode_png
from service.segmentation.tiff import TiffLayout
from service.segmentation.usecase import Segmentation


def mask_values(mask: np.ndarray, meta: ModelMetadata, class_index: int | None) -> np.ndarray:
    """What a mask file holds: 0/255 for binary models or one class, class indices otherwise."""
    if class_index is not None:
        return (mask == class_index).astype(np.uint8) * np.uint8(255)
    if meta.task is Task.BINARY:
        return mask * np.uint8(255)
    return mask


def encode_mask_tiff(values: np.ndarray, layout: TiffLayout | None) -> bytes:
    """Masks ``(N, H, W)`` as a TIFF with the image's plane axes (``(planes..., H, W)``);
    OME-TIFF (with the physical pixel size) when the plane axes are OME's (Z, T), else
    tifffile's shaped TIFF that records its axes. A 2-D image (``layout`` None or of one plane)
    gives a one-page TIFF."""
    if layout is not None and layout.planes == 1:
        layout = None
    plane_axes = layout.plane_axes if layout is not None else ""
    plane_shape = layout.plane_shape if layout is not None else ()
    values = values.reshape(*plane_shape, *values.shape[-2:])
    axes = plane_axes + "YX"
    metadata: dict[str, Any] = {"axes": axes}
    ome = all(a in "TZ" for a in plane_axes)
    if ome and layout is not None and layout.physical_size is not None:
        size = layout.physical_size
        for key, value in (("X", size.x), ("Y", size.y), ("Z", size.z)):
            if value is not None and (key != "Z" or "Z" in axes):
                metadata[f"PhysicalSize{key}"] = value
                metadata[f"PhysicalSize{key}Unit"] = size.unit
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, values, ome=ome, metadata=metadata, photometric="minisblack", compression="zlib"
    )
    return buf.getvalue()


def encode_mask(segmentation: Segmentation, *, tiff: bool, class_index: int | None = None) -> bytes:
    """The mask file (one class's with ``class_index``): a PNG (palette for multiclass models)
    for a 2-D image unless ``tiff``; a TIFF for a stack, whose mask cannot be one PNG. Adds
    its time to the ``encode`` stage."""
    start = time.perf_counter()
    meta = segmentation.model.meta
    values = mask_values(segmentation.mask, meta, class_index)
    if tiff or segmentation.stack:
        data = encode_mask_tiff(values, segmentation.image.layout)
    else:
        palette = class_index is None and meta.task is not Task.BINARY
        data = encode_png(values[0], palette=palette)
    _add_encode_time(segmentation, start)
    return data


def encode_class_masks(segmentation: Segmentation, plane: int = 0) -> dict[str, bytes]:
    """Each class's 0/255 PNG mask of a 2-D image (of one ``plane`` of a stack)."""
    start = time.perf_counter()
    meta = segmentation.model.meta
    masks = {
        name: encode_png(mask_values(segmentation.mask[plane], meta, i))
        for i, name in enumerate(meta.classes)
    }
    _add_encode_time(segmentation, start)
    return masks


def _add_encode_time(segmentation: Segmentation, start: float) -> None:
    elapsed = time.perf_counter() - start
    segmentation.timings["encode"] = segmentation.timings.get("encode", 0.0) + elapsed


def encode_labels_png(labels: np.ndarray) -> bytes:
    """A 16-bit grey PNG of one plane's labels (ids up to 65535)."""
    return encode_png(np.asarray(labels, dtype=np.uint16))


def encode_labels(segmentation: Segmentation, *, tiff: bool) -> tuple[bytes, str]:
    """The instance labels file and its media type: a 16-bit PNG for a 2-D image unless
    ``tiff``; a TIFF with the image's plane axes for a stack; 32-bit (TIFF only) when a plane
    has more than 65,535 objects. Adds its time to the ``encode`` stage."""
    start = time.perf_counter()
    objects = segmentation.objects
    if objects is None:
        raise ValueError("the segmentation has no instance labels")
    wide = max(objects.counts, default=0) > np.iinfo(np.uint16).max
    if tiff or wide or segmentation.stack:
        values = objects.labels if wide else objects.labels.astype(np.uint16)
        data, media_type = encode_mask_tiff(values, segmentation.image.layout), "image/tiff"
    else:
        data, media_type = encode_labels_png(objects.labels[0]), "image/png"
    _add_encode_time(segmentation, start)
    return data, media_type


def outlines(labels: np.ndarray) -> np.ndarray:
    """A 0/255 map of the objects' outlines in one plane's labels: pixels of an object with a
    4-neighbour outside it (the background or another object)."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge &= labels != 0
    return edge.astype(np.uint8) * np.uint8(255)


def encode_outlines(segmentation: Segmentation, plane: int = 0) -> bytes:
    """The outlines of a 2-D image's objects (of one ``plane`` of a stack) as a 0/255 PNG
    (the page draws them)."""
    start = time.perf_counter()
    objects = segmentation.objects
    if objects is None:
        raise ValueError("the segmentation has no instance labels")
    data = encode_png(outlines(objects.labels[plane]))
    _add_encode_time(segmentation, start)
    return data
