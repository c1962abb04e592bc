"""PlacidDreamer (Huang et al., ACM MM 2024, arXiv 2407.13976), all in one package.

* :mod:`.method`: the config and the method, in the order of the paper's algorithm (steps 0-3);
* :mod:`.prepare`: steps 0-2 (reference image; ring views and the Latent-Plane init; DreamBooth-LoRA);
* :mod:`.latent_plane`: the Latent-Plane, one module per job (ring geometry, networks and UNet hook,
  Gaussian initialisation, official checkpoints, weights on disk, ShapeWorld ring renders).

DreamBooth-LoRA personalisation is shared with other methods and lives in :mod:`studio.train.personalize`;
Balanced Score Distillation is the loss :func:`studio.distill.bsd.bsd`.
"""
from .method import PlacidDreamerConfig, PlacidDreamerMethod

__all__ = ["PlacidDreamerConfig", "PlacidDreamerMethod"]
