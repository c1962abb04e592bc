"""Mesh stages of progressive text-to-3D (DreamPolish G3, G4 and T; spec 3.3), built on
:class:`~studio.train.field_stage.ChainedStage` (lazy build from the previous stage, artefacts, resume).

* :class:`DMTetStage` (G3): ``DMTet.from_sdf(neus.sdf)``; SDS on renders of the extracted mesh coloured by
  the NeuS colour field (``render_textured``: antialiased silhouettes carry gradients to the vertices),
  plus ``normal_consistency_loss`` and ``laplacian_loss``.
* :class:`PolishStage` (G4): a few steps of normal-estimator supervision at cameras with a wide FoV range
  and close-ups (``studio.distill.normals``): the shaded render goes through the frozen estimator, the
  rendered camera-space normals are pulled towards its output; mesh regularisers keep the surface smooth.
* :class:`TextureStage` (T): geometry fixed; a :class:`~studio.students.texture.TextureField` trained with
  the score-combination family :func:`~studio.distill.dsd.dsd` (DSD by default, SDS / VSD presets), the
  variational branch a camera-conditioned :class:`~studio.students.lora_score.LoRAScore` trained online.

Each stage's ``result`` is ``(dmtet, color_fn)`` (G3, G4) or ``(verts, faces, texture)`` (T); each has
``export(run_dir, cfg)`` writing ``model.glb``, ``model.obj`` (+ .mtl / .png), ``turntable.mp4`` and
``preview.png`` for whichever stage ends a run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..cameras import OrbitSampler, orbit_cameras, world_to_camera_normals
from ..distill.dsd import DSD_LAM_CFG, DSD_LAM_VAR, dsd, schedule_is_zero
from ..distill.normals import PolishCameraConfig, polish_cameras, polish_normal_loss
from ..distill.timesteps import TimestepSampler
from ..errors import UserError
from ..io import write_mp4, write_png
from ..render.turntable import render_mesh_turntable
from ..students.dmtet import DMTet, laplacian_loss, normal_consistency_loss
from ..students.fields import NeuSField, load_field
from ..students.texture import TextureField, export_textured_mesh, render_textured
from .field_stage import ChainedStage, ScoreSettings, Source, score_images


def _empty_guard(verts: Tensor, faces: Tensor, dmtet: DMTet) -> Tensor | None:
    """A zero loss tied to the SDF when the surface vanished (no faces), else ``None``."""
    if faces.shape[0] == 0:
        return dmtet.sdf.sum() * 0.0
    return None


class MeshExportMixin:
    """``export(run_dir, cfg)`` for stages whose ``mesh_and_color()`` gives ``(verts, faces, color_fn)``."""

    def mesh_and_color(self) -> tuple[Tensor, Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def export(self, run_dir: Path, cfg) -> dict:
        from ..io.mesh import xatlas_available

        verts, faces, color = self.mesh_and_color()
        verts, faces = verts.detach(), faces.detach()
        if faces.shape[0] == 0:
            raise UserError(f"stage {self.name!r} ended with an empty mesh (no surface); try more steps, another "
                            "seed or a lower learning rate")
        uv = xatlas_available()
        tex = int(getattr(cfg, "texture_size", 256))
        info = {}
        for name in ("model.glb", "model.obj"):
            r = export_textured_mesh(Path(run_dir) / name, verts, faces, color, uv=uv, texture_size=tex)
            info[name] = r["mode"]
        radius, fovy = 3.0, 40.0
        frames = render_mesh_turntable(verts, faces, color, n_frames=int(getattr(cfg, "turntable_frames", 24)),
                                       size=int(getattr(cfg, "turntable_size", 96)), radius=radius, fovy_deg=fovy)
        write_mp4(Path(run_dir) / "turntable.mp4", frames, fps=12)
        write_png(Path(run_dir) / "preview.png", self.preview(4, size=96))
        metrics: dict[str, Any] = {"n_verts": int(verts.shape[0]), "n_faces": int(faces.shape[0]), "export_mode": info}
        stages = getattr(self, "pipeline", [self])
        metrics["stage_seconds"] = {s.name: round(s.seconds, 2) for s in stages}
        est = [getattr(s, "estimator_name", None) for s in stages if getattr(s, "estimator_name", None)]
        if est:
            metrics["normal_estimator_used"] = est[0]
        from ..world.metrics import evaluate_mesh
        from ..world.objects import find_object_for_prompt

        obj = find_object_for_prompt(getattr(cfg, "prompt", ""))
        if obj is not None:
            sector = getattr(cfg, "heldout_azimuth", None)  # the run's held-out azimuth sector (text_to_3d)
            metrics["ground_truth"] = evaluate_mesh(obj, verts, faces, color, size=64, n_views=8,
                                                    azimuth_sector=sector)
        return metrics

    @torch.no_grad()
    def preview(self, n: int = 4, size: int | None = None) -> Tensor | None:
        if not getattr(self, "built", False):
            return None
        verts, faces, color = self.mesh_and_color()
        if faces.shape[0] == 0:
            return None
        s = size or 64
        cams = orbit_cameras(15.0, torch.arange(n) * (360.0 / n), 3.0, 40.0, s, s)
        out = render_textured((verts.detach(), faces), color, cams, background=1.0, normals=False)
        return torch.cat(list(out["rgb"][..., :3].clamp(0, 1)), dim=1)


# ------------------------------------------------------------------------------------------ G3
@dataclass
class DMTetStageConfig:
    dmtet_resolution: int = 24
    resolution: int = 32
    lr: float = 0.005
    lr_color: float = 1e-3
    normal_consistency_weight: float = 1.0
    laplacian_weight: float = 1.0
    sdf_flip_weight: float = 0.0
    score: ScoreSettings = field(default_factory=ScoreSettings)


def save_mesh_state(path: Path, dmtet: DMTet, color: Any) -> None:
    """``path`` (DMTet sdf + deformation + grid settings, safetensors) and ``<stem>_color.safetensors``
    (the colour field, a ``NeuSField``) -- the artefact of G3 / G4."""
    from safetensors.torch import save

    from ..io.atomic import atomic_write_bytes

    meta = {"resolution": str(dmtet.resolution), "bbox": json.dumps(dmtet.bbox.tolist())}
    atomic_write_bytes(path, save({"sdf": dmtet.sdf.detach().contiguous(),
                                   "deformation": dmtet.deformation.detach().contiguous()}, metadata=meta))
    color.save(_color_path(path))


def _color_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + "_color.safetensors")


def load_mesh_state(path: str | Path) -> tuple[DMTet, NeuSField]:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"mesh artefact '{p}' not found: run the earlier stages first (omit --from-stage) or "
                        "point --out at the run folder that holds it")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        sdf, deform = f.get_tensor("sdf"), f.get_tensor("deformation")
    bbox = torch.tensor(json.loads(meta["bbox"]))
    return DMTet(int(meta["resolution"]), bbox, sdf=sdf, deformation=deform), load_field(_color_path(p))


def mesh_source(path: str | Path) -> Source:
    return lambda: load_mesh_state(path)


class DMTetStage(MeshExportMixin, ChainedStage):
    """G3 (module doc). ``source`` returns a NeuS field (SDF init + colour) or a ``(DMTet, colour)`` pair."""

    kind = "dmtet"

    def __init__(self, name: str, cfg: DMTetStageConfig, teacher, prompt: str, *, steps: int, guidance_scale: float,
                 source: Source, artefact=None, seed: int = 0, score_fn=None):
        super().__init__(name, steps, source, artefact=artefact, seed=seed)
        self.cfg, self.teacher, self.prompt, self.guidance_scale = cfg, teacher, prompt, float(guidance_scale)
        self.score_fn = score_fn  # as FieldDistillStage's: ScoreContext -> result with .loss / .grad (None = SDS)
        s = cfg.score
        self.sampler = OrbitSampler(s.elevation_range, s.azimuth_range, s.radius_range, s.fovy_range,
                                    cfg.resolution, cfg.resolution)
        self.timesteps = TimestepSampler(s.t_min, s.t_max, s.t_schedule, t_max_end=s.t_max_end)

    def build(self, upstream: Any) -> None:
        if isinstance(upstream, tuple):
            self.dmtet, self.color = upstream
        else:
            self.dmtet = DMTet.from_sdf(upstream.sdf, resolution=self.cfg.dmtet_resolution, bbox=1.0)
            self.color = upstream
        self.result = (self.dmtet, self.color)
        self._make_optim()

    def _make_optim(self) -> None:
        self._optim = {"dmtet": self.dmtet.make_optimizer(self.cfg.lr),
                       "color": torch.optim.Adam(self.color.color_net.parameters(), lr=self.cfg.lr_color)}

    def mesh_and_color(self):
        v, f = self.dmtet.mesh()
        return v, f, self.color.color

    def regularisers(self, verts: Tensor, faces: Tensor) -> tuple[Tensor, dict[str, float]]:
        c = self.cfg
        nc, lap = normal_consistency_loss(verts, faces), laplacian_loss(verts, faces)
        loss = c.normal_consistency_weight * nc + c.laplacian_weight * lap
        logs = {"normal_consistency": float(nc.detach()), "laplacian": float(lap.detach())}
        if c.sdf_flip_weight > 0:
            loss = loss + c.sdf_flip_weight * self.dmtet.sdf_loss()
        return loss, logs

    def step_loss(self, step: int, progress: float):
        c = self.cfg
        verts, faces = self.dmtet.mesh()
        empty = _empty_guard(verts, faces, self.dmtet)
        if empty is not None:
            return empty, {"n_faces": 0.0}
        views = self.sampler.sample(c.score.batch_size, self.generator)
        out = render_textured((verts, faces), self.color.color, views.cameras, background=c.score.background,
                              normals=False)
        images = out["rgb"][..., :3].permute(0, 3, 1, 2)
        res = score_images(self.teacher, images, views, self.prompt, c.score, self.timesteps, step=step,
                           progress=progress, guidance_scale=self.guidance_scale, generator=self.generator,
                           alphas=out["alpha"].permute(0, 3, 1, 2), score_fn=self.score_fn)
        reg, logs = self.regularisers(verts, faces)
        logs.update(grad_norm=float(res.grad.norm() / c.score.batch_size), n_faces=float(faces.shape[0]))
        return res.loss + reg, logs

    def model_state(self) -> dict:
        return {"resolution": self.dmtet.resolution, "bbox": self.dmtet.bbox.clone(),
                "sdf": self.dmtet.sdf.detach().clone(), "deformation": self.dmtet.deformation.detach().clone(),
                "color_config": dict(self.color.config),
                "color": {k: v.detach().clone() for k, v in self.color.state_dict().items()}}

    def load_model_state(self, state: dict) -> None:
        self.dmtet = DMTet(int(state["resolution"]), state["bbox"], sdf=state["sdf"], deformation=state["deformation"])
        self.color = NeuSField(**state["color_config"])
        self.color.load_state_dict(state["color"])
        self.result = (self.dmtet, self.color)
        self._make_optim()

    def save_artefact(self, path: Path) -> None:
        save_mesh_state(path, self.dmtet, self.color)


# ------------------------------------------------------------------------------------------ G4
@dataclass
class PolishStageConfig:
    resolution: int = 32
    batch_size: int = 2
    lr: float = 0.002
    beta: float = 0.5
    """weight of the L1 term next to (1 - cos)"""
    normal_consistency_weight: float = 0.5
    laplacian_weight: float = 0.5
    cameras: PolishCameraConfig = field(default_factory=PolishCameraConfig)


class PolishStage(DMTetStage):
    """G4 (module doc): ``estimator`` is a ``studio.teachers.normals.NormalEstimator`` (``estimate(images,
    cameras=...)``, run under ``no_grad``: the stop-gradient)."""

    kind = "polish"

    def __init__(self, name: str, cfg: PolishStageConfig, estimator, *, steps: int, source: Source, artefact=None,
                 seed: int = 0):
        ChainedStage.__init__(self, name, steps, source, artefact=artefact, seed=seed)
        self.cfg, self.estimator = cfg, estimator

    def _make_optim(self) -> None:
        self._optim = {"dmtet": self.dmtet.make_optimizer(self.cfg.lr)}

    def step_loss(self, step: int, progress: float):
        c = self.cfg
        verts, faces = self.dmtet.mesh()
        empty = _empty_guard(verts, faces, self.dmtet)
        if empty is not None:
            return empty, {"n_faces": 0.0}
        views, fovy, closeup = polish_cameras(c.cameras, c.batch_size, c.resolution, self.generator)
        out = render_textured((verts, faces), self.color.color, views.cameras, background=1.0, normals=True)
        rgb = out["rgb"][..., :3].permute(0, 3, 1, 2).detach().clamp(0, 1)
        n_est, m_est = self.estimator.estimate_with_mask(rgb, seed=step, cameras=views.cameras)
        n_r = world_to_camera_normals(out["normal"], views.cameras.viewmats).permute(0, 3, 1, 2)
        mask = out["mask"][:, None].float()
        if m_est is not None:
            mask = mask * (m_est > 0.5).float()
        loss, logs = polish_normal_loss(n_r, n_est, mask, beta=c.beta)
        reg, rlogs = self.regularisers(verts, faces)
        logs.update(rlogs, fovy=float(fovy.mean()), closeups=float(closeup.float().mean()))
        return loss + reg, logs

    def regularisers(self, verts, faces):
        c = self.cfg
        nc, lap = normal_consistency_loss(verts, faces), laplacian_loss(verts, faces)
        return (c.normal_consistency_weight * nc + c.laplacian_weight * lap,
                {"normal_consistency": float(nc.detach()), "laplacian": float(lap.detach())})


# ------------------------------------------------------------------------------------------ T
@dataclass
class TextureStageConfig:
    resolution: int = 32
    lr_encoding: float = 0.01
    lr_mlp: float = 3e-3
    encoding: str = "fourier"
    lambdas: tuple = (0.0, DSD_LAM_CFG, DSD_LAM_VAR)
    """(lam_base, lam_cfg, lam_var) of ``dsd``: numbers or (at t=0, at t=T) schedules (presets: ``dsd_preset``)"""
    lora_rank: int = 4
    lora_lr: float = 1e-4
    camera_condition: bool = True
    weighting: str = "sds"
    score: ScoreSettings = field(default_factory=ScoreSettings)


class TextureStage(MeshExportMixin, ChainedStage):
    """T (module doc). ``lora_base``: the diffusers model whose UNet copy hosts the LoRA (needed when
    ``lam_var != 0``)."""

    kind = "texture"

    def __init__(self, name: str, cfg: TextureStageConfig, teacher, prompt: str, *, steps: int, source: Source,
                 lora_base=None, artefact=None, seed: int = 0):
        super().__init__(name, steps, source, artefact=artefact, seed=seed)
        self.cfg, self.teacher, self.prompt = cfg, teacher, prompt
        s = cfg.score
        self.sampler = OrbitSampler(s.elevation_range, s.azimuth_range, s.radius_range, s.fovy_range,
                                    cfg.resolution, cfg.resolution)
        self.timesteps = TimestepSampler(s.t_min, s.t_max, s.t_schedule, t_max_end=s.t_max_end)
        self.lora = None
        if not schedule_is_zero(cfg.lambdas[2]):
            from ..students.lora_score import LoRAScore

            if lora_base is None:
                raise UserError("the texture stage's variational branch (lam_var != 0: DSD or VSD) needs a LoRA base "
                                "with a diffusers UNet; use --texture-teacher shapeworld-unet or a diffusers model")
            self.lora = LoRAScore(lora_base, rank=cfg.lora_rank, camera_condition=cfg.camera_condition, seed=seed)
            self.lora_cond = lora_base.encode_prompt([prompt]).embeds

    def build(self, upstream: Any) -> None:
        if isinstance(upstream, tuple) and len(upstream) == 3:
            self.verts, self.faces, self.texture = upstream
        else:
            dmtet = upstream[0]
            with torch.no_grad():
                v, f = dmtet.mesh()
            self.verts, self.faces = v.detach(), f.detach()
            self.texture = TextureField(1.0, encoding=self.cfg.encoding)
        self.result = (self.verts, self.faces, self.texture)
        self._make_optim()

    def _make_optim(self) -> None:
        self._optim = {"texture": torch.optim.Adam(self.texture.param_groups(self.cfg.lr_encoding, self.cfg.lr_mlp))}
        if self.lora is not None:
            self._optim["lora"] = self.lora.make_optimizer(lr=self.cfg.lora_lr, betas=(0.9, 0.99))

    def mesh_and_color(self):
        return self.verts, self.faces, self.texture

    def _score(self, ctx):
        from ..distill.vsd import c2w_from_cameras

        lb, lc, lv = self.cfg.lambdas
        cam = c2w_from_cameras(ctx.cameras) if (self.lora is not None and self.cfg.camera_condition) else None
        out = dsd(ctx.teacher, ctx.latents, ctx.cond, ctx.t, lam_base=lb, lam_cfg=lc, lam_var=lv,
                  lora_score=self.lora, lora_cond=getattr(self, "lora_cond", None), camera_c2w=cam,
                  weighting=self.cfg.weighting, camera=ctx.camera, generator=ctx.generator)
        if self.lora is not None:
            lora_loss = self.lora.lora_loss(ctx.latents.detach(), self.lora_cond, cam, ctx.generator)
            out.loss = out.loss + lora_loss
            out.logs["lora_loss"] = float(lora_loss.detach())
        return out

    def step_loss(self, step: int, progress: float):
        c = self.cfg
        if self.faces.shape[0] == 0:
            raise UserError("the texture stage got an empty mesh; the geometry stages produced no surface")
        views = self.sampler.sample(c.score.batch_size, self.generator)
        out = render_textured((self.verts, self.faces), self.texture, views.cameras, background=c.score.background,
                              normals=False)
        images = out["rgb"][..., :3].permute(0, 3, 1, 2)
        res = score_images(self.teacher, images, views, self.prompt, c.score, self.timesteps, step=step,
                           progress=progress, guidance_scale=1.0, generator=self.generator,
                           alphas=out["alpha"].permute(0, 3, 1, 2), score_fn=self._score)
        logs = {"grad_norm": float(res.grad.norm() / c.score.batch_size), **(getattr(res, "logs", {}) or {})}
        return res.loss, logs

    def model_state(self) -> dict:
        st = {"verts": self.verts.clone(), "faces": self.faces.clone(), "encoding": self.cfg.encoding,
              "texture": {k: v.detach().clone() for k, v in self.texture.state_dict().items()}}
        if self.lora is not None:
            st["lora"] = self.lora.state_dict()
        return st

    def load_model_state(self, state: dict) -> None:
        self.verts, self.faces = state["verts"], state["faces"]
        self.texture = TextureField(1.0, encoding=state["encoding"])
        self.texture.load_state_dict(state["texture"])
        if self.lora is not None and "lora" in state:
            self.lora.load_state_dict(state["lora"])
        self.result = (self.verts, self.faces, self.texture)
        self._make_optim()

    def save_artefact(self, path: Path) -> None:
        from safetensors.torch import save

        from ..io.atomic import atomic_write_bytes

        tensors = {"verts": self.verts.contiguous(), "faces": self.faces.contiguous(),
                   **{f"texture.{k}": v.detach().contiguous() for k, v in self.texture.state_dict().items()}}
        atomic_write_bytes(path, save(tensors, metadata={"encoding": self.cfg.encoding}))
