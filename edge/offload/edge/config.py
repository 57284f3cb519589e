"""The [edge] section of a model.toml: the small model that runs on the device."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from offload.oip.repository import Section


class EdgeSection(Section):
    """The small model that runs on the device."""

    artifact: str
    # ONNX Runtime: threads per operator (0: ORT decides), execution providers
    # in order of preference; those missing from this build are skipped.
    intra_op_threads: Annotated[int, Field(ge=0)] = 1
    inter_op_threads: Annotated[int, Field(ge=0)] = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
