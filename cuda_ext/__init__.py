"""C++ (OpenMP) and CUDA sources of the studio's kernels; built on first use by ``studio.ext``."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
