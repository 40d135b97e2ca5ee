"""Make the benchmark's modules (plain scripts in bench/) importable by these tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
