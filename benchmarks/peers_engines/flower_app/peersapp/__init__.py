"""peersapp: the peers benchmark's workload as a plain Flower app."""

import sys
from pathlib import Path

# benchmarks/peers_engines holds the torch-only workload module every engine shares.
_SHARED = str(Path(__file__).resolve().parents[2])
if _SHARED not in sys.path:
    sys.path.insert(0, _SHARED)
