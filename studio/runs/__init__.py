"""Runs: the one method protocol (:mod:`.protocol`), the skeleton every run goes through (:mod:`.skeleton`) and
one thin module per kind of run: text to 3D (:mod:`.text_to_3d`), video generation (:mod:`.video_generate`),
video distillation (:mod:`.video_distill`), and batch over prompts (:mod:`.batch`). A new kind (image editing,
video to 4D, video RL) is a new module here with a method base class; the CLI, batch and the app need no edit.
"""
from .protocol import Method, slugify
from .skeleton import execute

__all__ = ["Method", "execute", "slugify"]
