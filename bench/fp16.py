"""FP16 variant of the default model, for GPUs (Tensor Cores); not bundled, not served here.

    pip install onnxconverter-common      # not a dependency of the project
    python -m bench.fp16                  # writes build/nuclei-fp16/1/model.onnx (+ config)

Weights and activations in float16, input and output kept float32 (``keep_io_types``), so the
service and its clients see no difference. On this CPU ONNX Runtime has few float16 kernels and
inserts casts, so the variant is only checked for agreement here, never timed: it is for the
CUDA/TensorRT providers. To serve it on a GPU host copy ``build/nuclei-fp16`` into the model
directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx

from bench.run import MODEL
from service.inference.modelmeta import ModelMetadata

OUT = Path("build/nuclei-fp16")


def main() -> None:
    """Convert, stamp the metadata, check agreement with fp32 on random tiles."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        sys.exit("needs onnxconverter-common: pip install onnxconverter-common")
    import onnxruntime as ort

    fp32 = onnx.load(str(MODEL))
    meta = ModelMetadata.from_props({p.key: p.value for p in fp32.metadata_props})
    half = float16.convert_float_to_float16(fp32, keep_io_types=True)
    del half.metadata_props[:]
    stamped = meta.model_copy(
        update={"name": "nuclei-fp16", "description": meta.description + " FP16 (GPU) variant."}
    )
    for key, value in stamped.to_props().items():
        half.metadata_props.add(key=key, value=value)
    (OUT / "1").mkdir(parents=True, exist_ok=True)
    target = OUT / "1" / "model.onnx"
    onnx.save(half, str(target))
    config = (MODEL.parents[1] / "config.pbtxt").read_text()
    (OUT / "config.pbtxt").write_text(config.replace('name: "nuclei"', 'name: "nuclei-fp16"', 1))
    cpu = ["CPUExecutionProvider"]
    tiles = np.random.default_rng(0).random((2, 256, 256, 1), dtype=np.float32)
    a = ort.InferenceSession(str(MODEL), providers=cpu).run(None, {"image": tiles})[0]
    b = ort.InferenceSession(str(target), providers=cpu).run(None, {"image": tiles})[0]
    print(
        json.dumps(
            {
                "model": str(target),
                "bytes": target.stat().st_size,
                "max_abs_diff_vs_fp32": float(np.abs(a - b).max()),
                "mask_agreement": float(((a >= 0.5) == (b >= 0.5)).mean()),
            }
        )
    )


if __name__ == "__main__":
    main()
