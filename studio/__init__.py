"""Distillation studio: score distillation into 3D/4D students and fast video generators.

Importing ``studio`` before torch sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment says otherwise): the
OpenMP threads of torch and of our native kernels then sleep instead of spinning while they wait, so two jobs on
shared cores each take about twice as long instead of 10-40x (``python benchmarks/render.py --contention``). It
costs 15-23 % of a render on an otherwise idle machine. Library users who import torch first set it themselves.
"""
import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
