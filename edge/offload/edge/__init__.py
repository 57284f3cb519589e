"""The edge runtime: the small model under ONNX Runtime. Never imports torch."""

from offload.edge.onnx_model import OnnxModel

__all__ = ["OnnxModel"]
