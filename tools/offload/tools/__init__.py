"""What a person runs at a keyboard: the `offload` command, the demo, the calibrate tool.

The one wing that may import every other: it wires the edge, the cloud and the router together.
"""
