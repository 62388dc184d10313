"""Client of the U-Net segmentation service: :class:`SegmentClient` for Python scripts and the
``segment-client`` command for folders of images.

Installs without the service (``pip install ./client``: httpx, NumPy, Pillow, tifffile, rich).
"""

from segment_client.client import (
    ClientError,
    JobStatus,
    Segmentation,
    SegmentClient,
    ServiceError,
)

__all__ = ["ClientError", "JobStatus", "SegmentClient", "Segmentation", "ServiceError"]
