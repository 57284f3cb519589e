"""The cloud service: large PyTorch models behind the Open Inference Protocol. Never imports offload.edge."""
