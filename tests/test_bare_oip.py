"""The benchmark floors of `offload.tools.bare_oip`, as processes a tritonclient calls: the OIP layer answers
with zeros of the model's output shape, or with the edge model's own output; bad input is refused alike."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from offload.edge.config import EdgeSection
from offload.edge.onnx_model import OnnxModel
from offload.models import DEMO_REPOSITORY
from offload.oip.repository import load_repository
from offload.tools.bare_oip import Answer, BareOipProcess


@pytest.fixture(scope="module", params=list(Answer))
def floor(request: pytest.FixtureRequest) -> Iterator[tuple[Answer, str]]:
    with BareOipProcess(request.param) as server:
        yield request.param, server.start()


def _edge_model() -> OnnxModel:
    entry = load_repository(DEMO_REPOSITORY)["digits"]
    section = entry.section("edge", EdgeSection)
    assert section is not None
    return OnnxModel(entry.artifact_path(section.artifact), section)


def test_answers_as_its_mode_says(floor: tuple[Answer, str]) -> None:
    answer, address = floor
    rows = np.load(DEMO_REPOSITORY / "digits" / "test.npz")["inputs"][:3].astype(np.float32)
    with triton.InferenceServerClient(url=address) as client:
        metadata = client.get_model_metadata("digits")
        assert [tensor.name for tensor in metadata.inputs] == ["pixels"]
        pixels = triton.InferInput("pixels", list(rows.shape), "FP32")
        pixels.set_data_from_numpy(rows)
        result = client.infer("digits", [pixels], request_id="floor-1")
        scores = result.as_numpy("scores")
        assert result.get_response().id == "floor-1"
        assert scores.shape == (3, 10)
        if answer is Answer.MODEL:
            np.testing.assert_allclose(scores, _edge_model().predict({"pixels": rows})["scores"], rtol=1e-6)
        else:
            assert not scores.any()
        # The OIP layer's checks stand in both modes: a wrong shape is refused, and the server goes on.
        wrong = triton.InferInput("pixels", [1, 63], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 63), np.float32))
        with pytest.raises(InferenceServerException, match=r"StatusCode\.INVALID_ARGUMENT"):
            client.infer("digits", [wrong])
        assert client.infer("digits", [pixels]).as_numpy("scores").shape == (3, 10)
