"""Nested blocks of a dataset entry: `parquet`, `huggingface` and `conditioning` (generators)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from difftune.config.strict import StrictModel


class ParquetConfig(StrictModel):
    """A dataset's `parquet` block (caption_strategy parquet): the table of file names and captions.

    path: a .parquet (or .jsonl) file, relative to the dataset folder or the working folder (default:
    the dataset's metadata_file, else metadata.parquet in the folder). An identifier without its
    extension (identifier_includes_extension false, the default) matches a file of any image
    extension. width_column / height_column only speed up the original tool's scan; difftune reads
    the sizes from the files.
    """

    path: str | None = None
    filename_column: str | None = None  # None: the top-level parquet_filename_column, else "id"
    caption_column: str | None = None  # None: the top-level parquet_caption_column, else "caption"
    fallback_caption_column: str | None = None  # used where the caption column is empty
    width_column: str | None = None
    height_column: str | None = None
    identifier_includes_extension: bool = False


class HuggingfaceConfig(StrictModel):
    """A dataset's `huggingface` block: column settings of a type huggingface dataset (they win over the
    same keys at the dataset's top level). width_column, height_column, num_frames_column and fps_column
    only speed up the original tool's scan; difftune reads those from the files."""

    image_column: str | None = None
    video_column: str | None = None
    caption_column: str | list[str] | None = None
    fallback_caption_column: str | None = None
    width_column: str | None = None
    height_column: str | None = None
    num_frames_column: str | None = None
    fps_column: str | None = None
    filter_func: dict[str, Any] | None = None
    composite_image_config: dict[str, Any] | None = None

    @field_validator("filter_func", "composite_image_config")
    @classmethod
    def _not_built(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(
                f"huggingface.{info.field_name} is not built; prepare the rows you want with the datasets "
                "library (filter, map, save_to_disk) and set dataset_name to the saved folder"
            )
        return value


GENERATED_ELSEWHERE = (
    "superresolution",
    "sdr",
    "logc3_sdr",
    "jpeg_artifacts",
    "depth",
    "depth_midas",
    "random_masks",
    "inpainting",
    "segmentation",
)


class ConditioningGenerator(StrictModel):
    """One entry of a dataset's `conditioning` block: a conditioning dataset generated from its images.

    canny (also spelt edges): Canny edge maps (OpenCV) with low_threshold / high_threshold (also
    inside `params`; default 100 / 200), written to cache/conditioning/<id>_conditioning_canny and
    linked to the dataset as its conditioning_data. captions: false or unset trains on the dataset's
    own captions; a string or a list of strings are the captions of every paired sample instead.
    """

    type: Literal["canny", "edges"]
    conditioning_type: Literal["mask", "reference_strict", "reference_loose"] | None = None
    params: dict[str, float] = Field(default_factory=dict)
    low_threshold: float | None = Field(None, ge=0, le=1000)
    high_threshold: float | None = Field(None, ge=0, le=1000)
    captions: bool | str | list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _built_types_only(cls, values: Any) -> Any:
        kind = values.get("type") if isinstance(values, dict) else None
        if kind in GENERATED_ELSEWHERE:
            raise ValueError(
                f"conditioning type '{kind}' is not built (canny is); generate those images into a folder, "
                'add it as a dataset with "dataset_type": "conditioning" and link it with conditioning_data'
            )
        return values

    @model_validator(mode="after")
    def _known_params(self) -> ConditioningGenerator:
        unknown = sorted(set(self.params) - {"low_threshold", "high_threshold"})
        if unknown:
            raise ValueError(f"canny params take low_threshold and high_threshold, not {', '.join(unknown)}")
        if self.captions is True:
            raise ValueError("captions is false (the dataset's own captions), a string or a list of strings")
        return self

    def thresholds(self) -> tuple[float, float]:
        """(low, high) hysteresis thresholds of the Canny detector."""
        low = self.params.get("low_threshold", self.low_threshold if self.low_threshold is not None else 100)
        high = self.params.get(
            "high_threshold", self.high_threshold if self.high_threshold is not None else 200
        )
        return float(low), float(high)
