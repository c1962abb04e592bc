"""Distillation studio: score distillation into 3D/4D students and fast video generators."""
__version__ = "0.1.0"
