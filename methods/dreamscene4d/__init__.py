"""DreamScene4D (Chu, Ke, Fragkiadaki, NeurIPS 2024, arXiv 2405.02280), all in one package.

* :mod:`.method`: the config and the method, in the order of the paper's pipeline, and the composition;
* :mod:`.stages`: the per-object stages on the one Trainer (static lift, deformation, world translation, joint);
* :mod:`.geometry`: crops and their inverse, object-to-world placement, losses, depth ratios, track metrics;
* :mod:`.background`: the background Gaussians and the photometric per-frame camera estimation (part 6; our design,
  the official code has none).

The deformable 4D Gaussian student is shared: :mod:`studio.students.deform4d`; the kind (input, artefacts,
ground-truth metrics) is :mod:`studio.runs.video_to_4d`.
"""
from .method import DreamScene4DConfig, DreamScene4DMethod

__all__ = ["DreamScene4DConfig", "DreamScene4DMethod"]
