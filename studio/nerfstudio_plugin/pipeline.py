"""The studio's text-to-3D methods inside nerfstudio: data manager, model and pipeline (issue 23).

Needs nerfstudio (``pip install -e ".[nerfstudio]"`` in its own environment, see docs/notes/issue23.md).

* :class:`StudioModel` wraps one studio Gaussian score-distillation stage
  (:class:`studio.train.gaussian_stage.GaussianDistillStage`, built by the studio method's own ``stages()``):
  the student (:class:`studio.students.gaussians.GaussianModel`), the studio renderer, the method's score
  function (SDS, VSD, ...) and any studio teacher (``shapeworld-exact`` / ``shapeworld-unet`` run offline). It
  renders nerfstudio cameras for the viewer with the same renderer.
* :class:`StudioDataManager` is a random-camera data manager like Generfacto's: no input images. Training
  cameras are drawn by the stage's studio :class:`~studio.cameras.OrbitSampler` (the one ``studio generate``
  samples, held-out azimuth sector excluded), which the data manager holds; its datasets are the held-out
  evaluation views (with ShapeWorld ground-truth images when the prompt names a ShapeWorld object), shown as
  camera frustums in the viewer and used for nerfstudio's eval images.
* :class:`StudioPipeline` runs one studio step per nerfstudio iteration: the loss is the method's
  score-distillation loss (``d loss / d latents = G``); nerfstudio's trainer calls ``backward``; a callback
  after the iteration applies the studio's optimizer step with its non-finite guard and the stage's
  densification (``after_step``), as the studio's own loop does. Its ``state_dict`` holds the stage state and
  the studio optimizers, so nerfstudio checkpoints resume (``--load-dir``) and export
  (:mod:`studio.nerfstudio_plugin.export`).

World frame: the studio is y-up, nerfstudio's viewer z-up; cameras are rotated between the two (``Z_UP``).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

import torch
from torch import Tensor
from torch.nn import Parameter

from nerfstudio.cameras.cameras import Cameras as NSCameras
from nerfstudio.configs.config_utils import to_immutable_dict
from nerfstudio.data.datamanagers.base_datamanager import DataManager, DataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.pipelines.base_pipeline import Pipeline, VanillaPipelineConfig

from methods.registry import get_method
from studio.cameras import HELDOUT_AZIMUTH, Cameras, opencv_to_opengl, opengl_to_opencv
from studio.errors import UserError
from studio.nerfstudio_plugin.export import STATE_KEY
from studio.runs.text_to_3d import TextTo3DMethod, exclude_training_azimuth, heldout_sector, load_teacher_cached
from studio.train.gaussian_stage import GaussianDistillStage, GaussianStageConfig

#: studio world (y-up) -> nerfstudio world (z-up): (x, y, z) -> (x, -z, y)
Z_UP = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
#: consecutive skipped steps (non-finite loss or gradient) after which training stops, as the studio loop
MAX_BAD_STEPS = 20


# ------------------------------------------------------------------------------------------- cameras
def to_nerfstudio_cameras(cams: Cameras) -> NSCameras:
    """Studio cameras (OpenCV world-to-camera, y-up world) -> nerfstudio cameras (OpenGL c2w, z-up world)."""
    c2w = Z_UP.to(cams.viewmats) @ cams.c2w_opengl
    K = cams.Ks
    return NSCameras(camera_to_worlds=c2w[:, :3, :4], fx=K[:, 0, 0:1], fy=K[:, 1, 1:2], cx=K[:, 0, 2:3],
                     cy=K[:, 1, 2:3], width=cams.width, height=cams.height)


def from_nerfstudio_cameras(cams: NSCameras) -> Cameras:
    """Inverse of :func:`to_nerfstudio_cameras` (one image size for the batch)."""
    c2w = cams.camera_to_worlds.reshape(-1, 3, 4).float()
    C = c2w.shape[0]
    c2w4 = torch.eye(4, dtype=c2w.dtype, device=c2w.device).repeat(C, 1, 1)
    c2w4[:, :3, :4] = c2w
    c2w_studio = Z_UP.to(c2w4).T @ c2w4
    viewmats = torch.linalg.inv(opengl_to_opencv(c2w_studio))
    K = torch.zeros(C, 3, 3, dtype=c2w.dtype, device=c2w.device)
    K[:, 0, 0], K[:, 1, 1] = cams.fx.reshape(-1).float(), cams.fy.reshape(-1).float()
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = cams.cx.reshape(-1).float(), cams.cy.reshape(-1).float(), 1.0
    return Cameras(viewmats, K, int(cams.width.reshape(-1)[0]), int(cams.height.reshape(-1)[0]))


# ------------------------------------------------------------------------------------------- model
@dataclass
class StudioModelConfig(ModelConfig):
    """A studio text-to-3D method on a Gaussian student (the settings of ``studio generate``)."""

    _target: Type = field(default_factory=lambda: StudioModel)
    enable_collider: bool = False
    method: str = "sds"
    """studio method name (a text-to-3D method with one Gaussian stage: sds, vsd)"""
    prompt: Optional[str] = None
    """the text prompt, e.g. "a red cube" (ShapeWorld prompts run offline and are scored against ground truth)"""
    teacher: Optional[str] = None
    """studio teacher (shapeworld-exact, shapeworld-unet, sd21-base, a folder or HF id); None = the method's default"""
    steps: int = 400
    """schedule length (timestep anneal, densification): keep it equal to --max-num-iterations"""
    resolution: int = 64
    guidance_scale: Optional[float] = None
    """CFG scale; None = the method's default for the teacher"""
    seed: int = 0
    heldout_azimuth: Tuple[float, float] = HELDOUT_AZIMUTH
    """azimuth sector kept out of training and used for evaluation (equal ends: off)"""
    stage: GaussianStageConfig = field(default_factory=GaussianStageConfig)
    """the studio Gaussian stage's settings (cameras, timesteps, learning rates, densification)"""
    background: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    """background of the renders shown in the viewer and eval images"""


def studio_config(cfg: StudioModelConfig):
    """The studio method and its resolved config for these nerfstudio settings."""
    method = get_method(cfg.method)()
    if not isinstance(method, TextTo3DMethod):
        raise UserError(f"studio method {cfg.method!r} is not a text-to-3D method; use sds or vsd")
    kw = dict(prompt=cfg.prompt or "", steps=cfg.steps, resolution=cfg.resolution, guidance_scale=cfg.guidance_scale,
              seed=cfg.seed, heldout_azimuth=tuple(cfg.heldout_azimuth), stage=cfg.stage)
    if cfg.teacher is not None:
        kw["teacher"] = cfg.teacher
    scfg = method.Config(**kw)
    method.validate(scfg)
    return method, method.resolve(scfg)


class StudioModel(Model):
    """nerfstudio model around one studio :class:`GaussianDistillStage` (see the module doc)."""

    config: StudioModelConfig

    def populate_modules(self):
        super().populate_modules()
        method, scfg = studio_config(self.config)
        if type(method).prepare is not TextTo3DMethod.prepare:
            raise UserError(f"studio method {self.config.method!r} has a preparation step that the nerfstudio plugin "
                            "does not run; use studio generate for it")
        torch.manual_seed(scfg.seed)
        teacher = load_teacher_cached(scfg.teacher)
        teacher.encode_prompt([scfg.prompt])  # an unknown prompt is refused before any work
        stages = method.stages(scfg, teacher, dict(steps=scfg.steps, resolution=scfg.resolution,
                                                   guidance_scale=scfg.guidance_scale))
        if len(stages) != 1 or not isinstance(stages[0], GaussianDistillStage):
            raise UserError(f"studio method {self.config.method!r} has {len(stages)} stage(s) of kinds "
                            f"{[type(s).__name__ for s in stages]}; the nerfstudio plugin runs one Gaussian stage")
        exclude_training_azimuth(stages, scfg.heldout_azimuth)
        self.method_name = method.name
        self.studio_cfg = scfg
        self.stage: GaussianDistillStage = stages[0]

    @property
    def gaussians(self):
        return self.stage.model  # replaced by the stage on load / densification: never cached

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {}  # the studio stage owns its optimizers (densification edits them); see StudioPipeline

    def render(self, cams: Cameras, background=None) -> Dict[str, Tensor]:
        bg = torch.tensor(background or self.config.background, dtype=torch.float32).expand(len(cams), 3)
        g = self.gaussians
        img, alpha, _ = g.render(cams.viewmats.to(g.device), cams.Ks.to(g.device), cams.width, cams.height,
                                 backgrounds=bg.to(g.device), backend=self.stage.cfg.backend, render_mode="RGB+ED")
        return {"rgb": img[..., :3].clamp(0, 1), "depth": img[..., 3:4], "accumulation": alpha}

    def get_outputs(self, ray_bundle) -> Dict[str, Tensor]:
        if not isinstance(ray_bundle, NSCameras):
            raise NotImplementedError("the studio model renders whole cameras (Gaussians), not ray bundles")
        out = self.render(from_nerfstudio_cameras(ray_bundle))
        return {k: v[0] for k, v in out.items()}

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: NSCameras, obb_box=None) -> Dict[str, Tensor]:
        return self.get_outputs(camera[0:1] if camera.shape and camera.shape[0] > 1 else camera)

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        return {}  # the loss is the studio score-distillation loss, computed by StudioPipeline

    def get_image_metrics_and_images(self, outputs, batch):
        from studio.world.metrics import psnr

        rgb, gt = outputs["rgb"], batch["image"].to(outputs["rgb"])
        metrics = {"psnr": float(psnr(rgb, gt))}
        return metrics, {"img": torch.cat([gt, rgb], dim=1)}


# ------------------------------------------------------------------------------------------- data
class ViewsDataset(InputDataset):
    """Fixed views with their images (ground truth, or the background colour) for the viewer and eval."""

    def __init__(self, cameras: NSCameras, images: Tensor):  # noqa: D107 - no files behind it
        self.size = int(images.shape[0])
        self.cameras = cameras
        self.images = images
        self.alpha_color = None
        self.scene_box = SceneBox(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
        self.mask_filenames = None
        self.metadata = to_immutable_dict({})

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> Dict:
        return {"image": self.images[index], "image_idx": index}


@dataclass
class StudioDataManagerConfig(DataManagerConfig):
    """Random cameras (no input images), like Generfacto's ``RandomCamerasDataManager``."""

    _target: Type = field(default_factory=lambda: StudioDataManager)
    eval_views: int = 8
    """held-out views (the ground-truth metrics' views) shown in the viewer and rendered as eval images"""
    eval_resolution: int = 64


def eval_views(model_cfg: StudioModelConfig, n: int, size: int):
    """The views the studio's ground-truth metrics use: inside the held-out sector, or between the ring."""
    from studio.world.references import held_out_cameras, sector_cameras

    sector = heldout_sector(model_cfg)
    return sector_cameras(sector, n, size, 0) if sector is not None else held_out_cameras(n, size, 0)


class StudioDataManager(DataManager):
    """See :class:`StudioDataManagerConfig` and the module doc."""

    config: StudioDataManagerConfig

    def __init__(self, config: StudioDataManagerConfig, device="cpu", test_mode="val", world_size: int = 1,
                 local_rank: int = 0, model_config: Optional[StudioModelConfig] = None, **kwargs):
        self.config, self.device, self.test_mode = config, device, test_mode
        self.world_size, self.local_rank = world_size, local_rank
        self.orbit_sampler = None  # the training stage's studio OrbitSampler (set by StudioPipeline)
        self.batch_size = 1
        views = eval_views(model_config or StudioModelConfig(), config.eval_views, config.eval_resolution)
        self.studio_eval_cameras = views.cameras
        images = torch.ones(len(views.cameras), config.eval_resolution, config.eval_resolution, 3)
        self.has_ground_truth = False
        prompt = (model_config.prompt if model_config is not None else None) or ""
        from studio.world.objects import find_object_for_prompt

        obj = find_object_for_prompt(prompt) if prompt else None
        if obj is not None:
            from studio.world.references import render_reference

            bg = tuple(model_config.background) if model_config is not None else (1.0, 1.0, 1.0)
            images = render_reference(obj, views, background=bg)["images"].float().clamp(0, 1)
            self.has_ground_truth = True
        cams = to_nerfstudio_cameras(views.cameras)
        self.train_dataset = ViewsDataset(cams, images)
        self.eval_dataset = ViewsDataset(cams, images) if self.has_ground_truth else None
        self._eval_idx = 0
        DataManager.__init__(self)

    def attach(self, stage: GaussianDistillStage) -> None:
        self.orbit_sampler = stage.sampler
        self.batch_size = stage.cfg.batch_size
        self.train_resolution = stage.resolution

    def setup_train(self):
        pass  # cameras are sampled per step by the studio OrbitSampler

    def setup_eval(self):
        pass

    def next_train(self, step: int) -> Tuple[NSCameras, Dict]:
        """A batch of training cameras from the studio sampler (the pipeline's stage draws its own with the same
        sampler and generator; this is for callers that want to see the distribution)."""
        if self.orbit_sampler is None:
            raise RuntimeError("the data manager has no studio sampler yet (StudioPipeline attaches it)")
        views = self.orbit_sampler.sample(self.batch_size)
        return to_nerfstudio_cameras(views.cameras), {"azimuth": views.azimuth, "elevation": views.elevation}

    def next_eval(self, step: int) -> Tuple[NSCameras, Dict]:
        i, cam, batch = self.next_eval_image(step)
        return cam, batch

    def next_eval_image(self, step: int) -> Tuple[int, NSCameras, Dict]:
        ds = self.eval_dataset or self.train_dataset
        i = self._eval_idx % len(ds)
        self._eval_idx += 1
        return i, ds.cameras[i:i + 1], ds[i]

    def get_train_rays_per_batch(self) -> int:
        return self.batch_size * getattr(self, "train_resolution", 64) ** 2

    def get_eval_rays_per_batch(self) -> int:
        return self.config.eval_resolution ** 2

    def get_datapath(self) -> Path:
        return Path(".")

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {}


# ------------------------------------------------------------------------------------------- pipeline
@dataclass
class StudioPipelineConfig(VanillaPipelineConfig):
    _target: Type = field(default_factory=lambda: StudioPipeline)
    datamanager: StudioDataManagerConfig = field(default_factory=StudioDataManagerConfig)
    model: StudioModelConfig = field(default_factory=StudioModelConfig)


class StudioPipeline(Pipeline):
    """One studio score-distillation step per nerfstudio iteration (see the module doc)."""

    def __init__(self, config: StudioPipelineConfig, device: str, test_mode: Literal["test", "val", "inference"] = "val",
                 world_size: int = 1, local_rank: int = 0, grad_scaler=None):
        super().__init__()
        if world_size > 1:
            raise UserError("the studio nerfstudio methods train in one process (Gaussian splats change shape under "
                            "densification); run ns-train without several machines / GPUs")
        if not (config.model.prompt or "").strip():
            raise UserError('--pipeline.model.prompt is empty; give a text such as "a red cube"')
        self.config, self.test_mode, self.world_size = config, test_mode, 1
        self.datamanager = config.datamanager.setup(device=device, test_mode=test_mode, world_size=world_size,
                                                    local_rank=local_rank, model_config=config.model)
        self._model = config.model.setup(scene_box=self.datamanager.train_dataset.scene_box,
                                         num_train_data=len(self.datamanager.train_dataset), device=device)
        self.datamanager.attach(self.model.stage)
        self._pending = None
        self.bad_steps = 0
        self.history: List[Dict[str, float]] = []

    @property
    def stage(self) -> GaussianDistillStage:
        return self.model.stage

    def get_train_loss_dict(self, step: int):
        stage = self.stage
        for o in stage.optimizers().values():
            o.zero_grad(set_to_none=True)
        out = stage.train_step(step, min(step / max(stage.steps, 1), 1.0))
        self._pending = (step, out)
        metrics = {k: torch.tensor(float(v)) for k, v in out.logs.items()}
        return {}, {"score_distillation": out.loss}, metrics

    def optimizer_step(self, step: int) -> None:
        """After nerfstudio's backward: the studio optimizer step (skipped on a non-finite loss or gradient, as
        the studio loop does) and the stage's densification."""
        if self._pending is None or self._pending[0] != step:
            return
        _, out = self._pending
        self._pending = None
        opts = list(self.stage.optimizers().values())
        params = [p for o in opts for g in o.param_groups for p in g["params"]]
        ok = bool(torch.isfinite(out.loss.detach()).all()) and all(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
        if ok:
            for o in opts:
                o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        if not ok:
            self.bad_steps += 1
            warnings.warn(f"{self.stage.name} step {step}: non-finite loss or gradient, step skipped "
                          f"({self.bad_steps} in a row)", RuntimeWarning, stacklevel=2)
            if self.bad_steps >= MAX_BAD_STEPS:
                raise RuntimeError(f"{self.stage.name}: {self.bad_steps} failed steps in a row at step {step}; stopped "
                                   "(the last checkpoint in nerfstudio_models/ is kept)")
            return
        self.bad_steps = 0
        self.stage.after_step(step, out)
        self.history.append({"step": step, "loss": float(out.loss.detach()), **{k: float(v) for k, v in out.logs.items()}})

    def get_training_callbacks(self, attrs: TrainingCallbackAttributes) -> List[TrainingCallback]:
        trainer = getattr(attrs, "trainer", None)
        n = getattr(getattr(trainer, "config", None), "max_num_iterations", None)
        if n is not None and n != self.stage.steps:
            warnings.warn(f"--max-num-iterations {n} differs from --pipeline.model.steps {self.stage.steps} (the "
                          "length of the studio's schedules); set both to the same number", RuntimeWarning, stacklevel=2)
        return [TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.optimizer_step,
                                 update_every_num_iters=1, args=[])]

    # nerfstudio calls the callback as func(*args, step=step)
    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {}

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        _, cam, batch = self.datamanager.next_eval_image(step)
        out = self.model.get_outputs_for_camera(cam)
        mse = ((out["rgb"] - batch["image"].to(out["rgb"])) ** 2).mean()
        return out, {"rgb_mse": mse}, {}

    @torch.no_grad()
    def get_eval_image_metrics_and_images(self, step: int):
        i, cam, batch = self.datamanager.next_eval_image(step)
        out = self.model.get_outputs_for_camera(cam)
        metrics, images = self.model.get_image_metrics_and_images(out, batch)
        metrics["image_idx"] = i
        metrics["num_rays"] = int(out["rgb"].shape[0] * out["rgb"].shape[1])
        return metrics, images

    @torch.no_grad()
    def get_average_eval_image_metrics(self, step: Optional[int] = None, output_path: Optional[Path] = None,
                                       get_std: bool = False):
        """The studio's ground-truth metrics (the same call as ``studio generate``'s export) for ShapeWorld
        prompts: PSNR, SSIM, IoU, Chamfer, ... at the held-out views; ``{}`` for other prompts."""
        from studio.world.metrics import evaluate_gaussians
        from studio.world.objects import find_object_for_prompt

        obj = find_object_for_prompt(self.model.studio_cfg.prompt)
        if obj is None:
            return {}
        gt = evaluate_gaussians(obj, self.model.gaussians, size=64, n_views=8,
                                azimuth_sector=heldout_sector(self.model.studio_cfg))
        return {k: float(v) for k, v in gt.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        stage = self.stage
        return {STATE_KEY: {"method": self.model.method_name,
                            "stage": stage.state_dict(),
                            "optimizers": {k: o.state_dict() for k, o in stage.optimizers().items()},
                            "rng": torch.get_rng_state()}}

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:
        state = loaded_state.get(STATE_KEY)
        if state is None:
            raise UserError("this nerfstudio checkpoint was not written by a studio-* method; resume it with its own "
                            "method")
        stage = self.stage
        stage.load_state_dict(state["stage"])
        for k, o in stage.optimizers().items():
            if k in state["optimizers"]:
                o.load_state_dict(state["optimizers"][k])
        torch.set_rng_state(state["rng"])
        stage.model.step = int(step) + 1

    def forward(self):
        raise NotImplementedError


__all__ = ["StudioDataManager", "StudioDataManagerConfig", "StudioModel", "StudioModelConfig", "StudioPipeline",
           "StudioPipelineConfig", "Z_UP", "from_nerfstudio_cameras", "studio_config", "to_nerfstudio_cameras"]
