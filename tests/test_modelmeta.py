"""The metadata schema that travels inside each ONNX file."""

from __future__ import annotations

import pytest

from service.inference.modelmeta import ModelMetadata, Normalization, Task


def _meta(**kw: object) -> ModelMetadata:
    base: dict[str, object] = {
        "name": "nuclei",
        "task": Task.BINARY,
        "classes": ["background", "nucleus"],
        "tile_size": 256,
        "tile_multiple": 16,
        "channels": 1,
    }
    base.update(kw)
    return ModelMetadata(**base)  # type: ignore[arg-type]


def test_round_trip_through_string_props() -> None:
    meta = _meta(
        normalization=Normalization(low=0.5, high=99.5),
        metrics={"test": {"iou": 0.93}},
        label_values=[0, 255],
    )
    props = meta.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert ModelMetadata.from_props(props) == meta
    assert meta.output_channels == 1 and meta.num_classes == 2


def test_multiclass_has_one_output_channel_per_class() -> None:
    meta = _meta(task=Task.MULTICLASS, classes=["bg", "interior", "boundary"])
    assert meta.output_channels == 3


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"classes": ["a", "b", "c"]}, "a binary model has 2 classes"),
        ({"tile_size": 250}, "not a multiple of 16"),
        ({"name": "../etc"}, "must match"),
        ({"label_values": [1]}, "one value per class"),
        ({"normalization": {"low": 99, "high": 1}}, "must be below"),
    ],
)
def test_inconsistent_metadata_is_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _meta(**kw)


def test_from_props_names_the_problem() -> None:
    with pytest.raises(ValueError, match="not a segmentation model"):
        ModelMetadata.from_props({"name": "x"})
    props = _meta().to_props()
    props["tile_size"] = "big"
    with pytest.raises(ValueError, match="tile_size"):
        ModelMetadata.from_props(props)
