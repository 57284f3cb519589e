"""Installed as sitecustomize.py in the Triton peer's virtual environment (benchmarks/peer_servers.py does it).

Triton's Python backend stub in nvidia-pytriton 0.7.0 embeds an older libpython 3.11 than this
interpreter's standard library, whose threading.RLock then lacks `_recursion_count`, so
multiprocessing's resource tracker fails ("'_thread.RLock' object has no attribute
'_recursion_count'"). Without the C RLock, threading uses its Python one, which has it.
"""

import threading

threading._CRLock = None  # type: ignore[attr-defined]
