"""``ns-train`` methods of the studio, registered through nerfstudio's ``nerfstudio.method_configs`` entry point
(pyproject.toml): ``ns-train studio-sds --pipeline.model.prompt "a red cube"``."""
from __future__ import annotations

import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from studio.nerfstudio_plugin.pipeline import StudioDataManagerConfig, StudioModelConfig, StudioPipelineConfig

STEPS = 400  # the studio's default --steps


def trainer_config(name: str, method: str, teacher: str | None = None) -> TrainerConfig:
    return TrainerConfig(
        method_name=name,
        steps_per_eval_batch=50,
        steps_per_eval_image=100,
        steps_per_eval_all_images=STEPS,
        steps_per_save=100,
        max_num_iterations=STEPS,
        mixed_precision=False,
        # the studio stage trains where its tensors live (CPU here); nerfstudio's default device is cuda
        machine=MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu"),
        pipeline=StudioPipelineConfig(datamanager=StudioDataManagerConfig(),
                                      model=StudioModelConfig(method=method, teacher=teacher, steps=STEPS)),
        optimizers={},  # the studio stage owns its optimizers (densification edits them)
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


studio_sds = MethodSpecification(
    config=trainer_config("studio-sds", "sds"),
    description="Studio: Score Distillation Sampling (DreamFusion) into 3D Gaussians, any studio teacher "
                "(shapeworld-exact runs offline)")

studio_vsd = MethodSpecification(
    config=trainer_config("studio-vsd", "vsd"),
    description="Studio: Variational Score Distillation (ProlificDreamer) into 3D Gaussians (default teacher "
                "shapeworld-unet)")
