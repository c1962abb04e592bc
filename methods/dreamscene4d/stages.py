"""DreamScene4D's per-object stages on the one Trainer (spec sections 3, 4): static lifting, object-centric
deformation, world-frame translation, joint fine-tune; and the deformation-only ablation.

Every stage of object ``k`` shares one :class:`ObjectFit` (targets, crops, placement, the student). Stages build
their parameters when they start, i.e. when the stage before them has finished (``ObjectFit.phase``), so a run is
a plain list of stages for :func:`studio.runs.skeleton.train_stages`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from studio.cameras import Cameras, orbit_cameras
from studio.distill.sds import sds
from studio.render import rasterize_gaussians
from studio.students.deform4d import DeformableGaussians, KPlanesConfig, frame_time
from studio.students.gaussians import GaussianModel
from studio.train.loop import StepOutput

from . import geometry as G


@dataclass
class FitSettings:
    """The per-object settings the stages read (filled from the method's config)."""

    crop_size: int = 64
    crop_radius: float = 2.0
    crop_fovy: float = 49.1
    init_points: int = 1000
    init: str = "carved"
    lift_frame: int = 0
    batch_frames: int = 4
    sds_views: int = 2
    sds_views_dynamic: int = 1
    sds_weight: float = 1.0
    guidance_scale: float = 5.0
    view_grid_deg: float = 30.0
    rgb_weight: float = 1e4
    mask_weight: float = 1e3
    flow_weight: float = 1e4
    scale_reg_weight: float = 1e3
    scale_smooth_weight: float = 5e4
    rigid_weight: float = 5e4
    world_rgb_weight: float = 1e3
    world_mask_weight: float = 1e2
    knn: int = 16
    kplanes: KPlanesConfig = None  # type: ignore[assignment]
    factorise: bool = True
    seed: int = 0


class ObjectFit:
    """One object's targets and state across the stages."""

    def __init__(self, k: int, frames: Tensor, masks: Tensor, cams: Cameras, st: FitSettings, teacher, *,
                 lift_rgb: Tensor | None = None, lift_masks: Tensor | None = None, flow: Tensor | None = None,
                 depth0: float | None = None):
        self.k, self.st, self.teacher = k, st, teacher
        K, T, H, W = masks.shape
        self.T, self.H, self.W = T, H, W
        self.cams = cams
        vis = masks[k].bool()
        self.vis = vis
        others = (torch.cat([masks[:k], masks[k + 1:]]).any(0) & ~vis) if K > 1 else torch.zeros_like(vis)
        self.valid = ~others  # pixels another object covers may hide this one: no loss there
        self.frames = frames
        self.world_target = frames * vis[..., None] + (~vis[..., None]).float()  # white-composited
        lr = lift_rgb if lift_rgb is not None else frames
        lm = (lift_masks if lift_masks is not None else vis).bool()
        self.amodal = lift_masks is not None
        self.centers, ext, self.box_valid = G.mask_boxes(lm)
        self.sides = G.crop_sides(ext, st.lift_frame)
        R = st.crop_size
        comp = (lr * lm[..., None] + (~lm[..., None]).float()).permute(0, 3, 1, 2)
        self.crop_rgb = G.crop(comp, self.centers, self.sides, R, fill=1.0).permute(0, 2, 3, 1).clamp(0, 1)
        self.crop_mask = G.crop(lm[:, None].float(), self.centers, self.sides, R, fill=0.0)[:, 0] > 0.5
        cv = self.valid if lift_masks is None else torch.ones_like(self.valid)
        self.crop_valid = G.crop(cv[:, None].float(), self.centers, self.sides, R, fill=1.0)[:, 0] > 0.5
        self.crop_cam = G.crop_camera(R, st.crop_radius, st.crop_fovy)
        lift = st.lift_frame
        self.A = G.object_rotation(self.crop_cam, cams[lift])
        # camera motion: the virtual crop camera of frame t turns with the real one (R_t R_lift^T, spec 1.4), so
        # the deformation does not absorb the camera's rotation
        Rw = cams.viewmats[:, :3, :3]
        same = (Rw == Rw[lift]).flatten(1).all(1)
        rel = Rw @ Rw[lift].T
        self.crop_rot = torch.where(same[:, None, None], torch.eye(3).expand_as(rel), rel)
        self.qA = G.rotation_quat(self.A)
        S, p = G.init_placement(self.centers, self.sides, cams, self.crop_cam, R, st.crop_radius, depth0)
        self.S = S
        self.p = nn.Parameter(p.clone())
        self.p_init = p.clone()
        self.flow = flow
        self.crop_flow = self._crop_flow(flow, vis) if flow is not None else None
        self.model: GaussianModel | None = None
        self.dyn: DeformableGaussians | None = None
        self.knn: tuple[Tensor, Tensor] | None = None
        self.phase = 0  # index of the next stage allowed to build
        self._conds: dict[int, Any] = {}
        self.gen = torch.Generator().manual_seed(int(st.seed) * 7919 + k)

    # -- targets ---------------------------------------------------------------------------------------------
    def _crop_flow(self, flow: Tensor, vis: Tensor) -> tuple[Tensor, Tensor]:
        """Crop-frame flow targets ``[T,R,R,2]`` (frame t: from crop t-1 to crop t, on crop t-1's pixels) and masks."""
        R = self.st.crop_size
        T = self.T
        out = torch.zeros(T, R, R, 2)
        msk = torch.zeros(T, R, R, dtype=torch.bool)
        jj, ii = torch.meshgrid(torch.arange(R) + 0.5, torch.arange(R) + 0.5, indexing="xy")
        u = torch.stack([jj, ii], -1)
        for t in range(1, T):
            f = G.crop(flow[t - 1].permute(2, 0, 1)[None], self.centers[t - 1:t], self.sides[t - 1:t], R, fill=0.0)[0]
            x = G.crop_to_frame(u, self.centers[t - 1], self.sides[t - 1], R)
            u2 = G.frame_to_crop(x + f.permute(1, 2, 0), self.centers[t], self.sides[t], R)
            out[t] = u2 - u
            msk[t] = self.crop_mask[t - 1]
        return out, msk

    def crop_cam_at(self, t: int, cams: Cameras | None = None) -> Cameras:
        """The object-centric camera(s) of frame ``t``: ``cams`` (default the reference crop camera) turned by the
        camera's rotation since the lift frame; the same distance to the object's origin."""
        cams = self.crop_cam if cams is None else cams
        vm = cams.viewmats.clone()
        vm[:, :3, :3] = self.crop_rot[t] @ vm[:, :3, :3]
        return Cameras(vm, cams.Ks, cams.width, cams.height)

    def cond(self, t: int, d_polar: Tensor, d_az: Tensor, d_r: Tensor):
        img = self.crop_rgb[t].permute(2, 0, 1)[None]
        return self.teacher.encode_view(img, d_polar, d_az, d_r)

    # -- rendering -----------------------------------------------------------------------------------------------
    def tau(self, t) -> Tensor:
        return frame_time(t, self.T)

    def object_gaussians(self, t: int | None) -> dict:
        if self.dyn is None or t is None:
            m = self.model
            return {"means": m.means, "quats": m.quats, "scales": m.scales, "opacities": m.opacities,
                    "colors": m.colors[:, 0, :] * 0.28209479177387814 + 0.5, "d_log_scales": None}
        g = self.dyn.deformed(self.tau(t))
        g["colors"] = g["colors"][:, 0, :] * 0.28209479177387814 + 0.5
        return g

    def placement(self, t: int) -> tuple[Tensor, Tensor]:
        if self.st.factorise:
            return self.S[t], self.p[t]
        return self.S[self.st.lift_frame], self.p[self.st.lift_frame]

    def world_gaussians(self, t: int) -> dict:
        S, p = self.placement(t)
        return G.place(self.object_gaussians(t), S, p, self.A, self.qA)

    def render(self, g: dict, cams: Cameras, W: int, H: int, *, colors: Tensor | None = None, bg: float | None = 1.0,
               mode: str = "RGB"):
        c = g["colors"].clamp(0, 1) if colors is None else colors
        bgs = None if bg is None else torch.full((len(cams), c.shape[-1]), float(bg))
        img, a, meta = rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], c, cams.viewmats,
                                           cams.Ks, W, H, backgrounds=bgs, render_mode=mode)
        return img, a[..., 0], meta

    def flow_render(self, g_prev: dict, g_now: dict, cams_prev: Cameras, cams_now: Cameras, W: int, H: int) -> Tensor:
        """Splat each Gaussian's 2D displacement (t-1 -> t) with t-1's geometry (detached): ``[H,W,2]``."""
        p0, _ = cams_prev.project(g_prev["means"])
        p1, _ = cams_now.project(g_now["means"])
        disp = (p1 - p0)[0]
        gd = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in g_prev.items()}
        img, _, _ = self.render(gd, cams_prev, W, H, colors=disp, bg=0.0)
        return img[0]

    # -- SDS ---------------------------------------------------------------------------------------------------
    def sds_loss(self, g: dict, t_ref: int, n: int, progress: float, t_max: int) -> Tensor:
        if n <= 0 or self.st.sds_weight <= 0 or self.teacher is None:
            return torch.zeros(())
        st, R = self.st, self.st.crop_size
        grid = max(st.view_grid_deg, 1e-6)
        el = torch.randint(-30, 30, (n,), generator=self.gen).float()
        az = torch.randint(-180, 180, (n,), generator=self.gen).float()
        el, az = (el / grid).round() * grid, (az / grid).round() * grid  # a fixed view set: teachers cache renders
        cams = self.crop_cam_at(t_ref, orbit_cameras(el, az, torch.full((n,), st.crop_radius), st.crop_fovy, R, R))
        img, _, _ = self.render(g, cams, R, R)
        latents = self.teacher.encode(img.permute(0, 3, 1, 2))
        cond = self.cond(t_ref, -el, az, torch.zeros(n))
        T = int(self.teacher.schedule.num_train_timesteps)
        t = torch.full((n,), G.sds_timestep(progress, int(0.02 * T), int(t_max / 1000 * T), T), dtype=torch.long)
        out = sds(self.teacher, latents, cond, t, guidance_scale=st.guidance_scale, generator=self.gen)
        return st.sds_weight * out.loss / n


# ------------------------------------------------------------------------------------------------ stages
class _Phase:
    """A stage of one object; builds its parameters when the object's previous stage has finished."""

    kind = "phase"

    def __init__(self, fit: ObjectFit, index: int, steps: int):
        self.fit, self.index, self.steps = fit, index, int(steps)
        self.name = f"object{fit.k + 1}/{self.kind}"
        self._opts: dict[str, torch.optim.Optimizer] | None = None
        self._loaded: dict | None = None

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._opts is None:
            if self.fit.phase < self.index:
                return {}
            if self._loaded is not None:
                self.load_params(self._loaded)
                self._loaded = None
            self._opts = self.build()
        return self._opts

    def build(self) -> dict[str, torch.optim.Optimizer]:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def after_step(self, step: int, out: StepOutput) -> None:
        if step + 1 >= self.steps:
            self.finish()
            self.fit.phase = max(self.fit.phase, self.index + 1)

    def state_dict(self) -> dict:
        return {"phase": torch.tensor(self.fit.phase), **self.param_state()}

    def load_state_dict(self, state: dict) -> None:
        self.fit.phase = max(self.fit.phase, int(state.get("phase", 0)))
        self._opts, self._loaded = None, state  # rebuilt (then the Trainer loads the optimizer state) when asked
        if self.fit.phase > self.index:  # a finished stage: the next stages need its parameters now
            self.load_params(state)
            self._loaded = None

    def param_state(self) -> dict:
        return {}

    def load_params(self, state: dict) -> None:
        pass

    def preview(self):
        return None


def _adamw(groups: list[dict], **kw) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, eps=1e-15, **kw)


class StaticLiftStage(_Phase):
    """Spec 3: DreamGaussian-style static Gaussians from the lift frame's crop (reference RGB / mask + SDS)."""

    kind = "static"

    def build(self):
        f = self.fit
        if f.model is None:
            f.model = self.initial_gaussians()
        p = f.model.params
        self.sched_means = (0.01, 2e-4, 500)
        return {"gaussians": _adamw([{"params": [p["means"]], "lr": 0.01, "name": "means"},
                                     {"params": [p["sh0"]], "lr": 0.01}, {"params": [p["opacities"]], "lr": 0.05},
                                     {"params": [p["scales"]], "lr": 0.005}, {"params": [p["quats"]], "lr": 0.005}])}

    def initial_gaussians(self) -> GaussianModel:
        """DreamGaussian's init (``ball``: uniform in a ball of radius 0.5, grey, opacity 0.1), or ``carved`` (the
        default here): ball points whose crop-camera projection falls on the lift frame's mask, coloured from the
        crop -- a visual-hull start that a few hundred CPU steps can refine (the ball init needs ~1000)."""
        f, st = self.fit, self.fit.st
        g = torch.Generator().manual_seed(st.seed * 7919 + 17 * f.k)
        n = st.init_points
        if st.init == "ball":
            return GaussianModel.random_in_sphere(n, radius=0.5, generator=g, sh_degree=0, opacity=0.1,
                                                  rgb=torch.full((3,), 0.5))
        d = torch.randn(8 * n, 3, generator=g)
        pts = 0.5 * d / d.norm(dim=1, keepdim=True) * torch.rand(8 * n, 1, generator=g) ** (1 / 3)
        R = st.crop_size
        pix, _ = f.crop_cam.project(pts)
        pix = pix[0]
        j = pix[:, 0].floor().long().clamp(0, R - 1)
        i = pix[:, 1].floor().long().clamp(0, R - 1)
        t0 = st.lift_frame
        inside = f.crop_mask[t0][i, j]
        sel = inside.nonzero(as_tuple=True)[0]
        if sel.numel() < 8:
            return GaussianModel.random_in_sphere(n, radius=0.5, generator=g, sh_degree=0, opacity=0.1,
                                                  rgb=torch.full((3,), 0.5))
        sel = sel[torch.randint(sel.numel(), (n,), generator=g)] if sel.numel() < n else sel[:n]
        rgb = f.crop_rgb[t0][i[sel], j[sel]]
        return GaussianModel.from_points(pts[sel], rgb, sh_degree=0, opacity=0.1, generator=g)

    def train_step(self, step: int, progress: float) -> StepOutput:
        f, st = self.fit, self.fit.st
        a, b, n = self.sched_means
        self._opts["gaussians"].param_groups[0]["lr"] = a * (b / a) ** min(step / n, 1.0)
        t0, R = st.lift_frame, st.crop_size
        g = f.object_gaussians(None)
        img, alpha, _ = f.render(g, f.crop_cam, R, R)
        r = max(progress, 1.0 / max(self.steps, 1))
        v = f.crop_valid[t0]
        l_rgb = G.balanced_loss(img[0], f.crop_rgb[t0], f.crop_mask[t0], v)
        l_mask = G.balanced_loss(alpha[0], f.crop_mask[t0].float(), f.crop_mask[t0], v)
        l_sds = f.sds_loss(g, t0, st.sds_views, progress, 980)
        loss = st.rgb_weight * r * l_rgb + st.mask_weight * r * l_mask + l_sds
        return StepOutput(loss, {"rgb": float(l_rgb.detach()), "mask": float(l_mask.detach()), "sds": float(l_sds.detach())})

    def finish(self):
        f = self.fit
        with torch.no_grad():  # final prune of transparent Gaussians (spec 3.1)
            keep = f.model.opacities > 0.01
            if int(keep.sum()) >= 8 and not bool(keep.all()):
                f.model = GaussianModel({k: v[keep] for k, v in f.model.params.items()}, 0)

    def param_state(self):
        m = self.fit.model
        return {} if m is None else {f"g/{k}": v.detach().clone() for k, v in m.params.items()}

    def load_params(self, state):
        ps = {k[2:]: v for k, v in state.items() if k.startswith("g/")}
        if ps:
            self.fit.model = GaussianModel(ps, 0)

    def preview(self):
        f = self.fit
        if f.model is None:
            return None
        with torch.no_grad():
            img, _, _ = f.render(f.object_gaussians(None), f.crop_cam, f.st.crop_size, f.st.crop_size)
        return torch.cat([img[0].clamp(0, 1), f.crop_rgb[f.st.lift_frame]], 1)


class _DynamicPhase(_Phase):
    def _ensure_dyn(self):
        f = self.fit
        if f.dyn is None:
            f.dyn = DeformableGaussians(f.model, cfg=f.st.kplanes, seed=f.st.seed + f.k)
            f.knn = G.knn_graph(f.model.means.detach(), f.st.knn)

    def frames_batch(self) -> list[int]:
        f = self.fit
        B = min(f.st.batch_frames, f.T)
        return torch.randperm(f.T, generator=f.gen)[:B].tolist()

    def regularisers(self, g_prev: dict, g_now: dict) -> tuple[Tensor, Tensor, Tensor]:
        f = self.fit
        idx, w = f.knn
        sreg = g_prev["d_log_scales"].abs().mean()
        lsc = G.scale_smoothness(g_prev["d_log_scales"], idx, w)
        rig = G.rigidity_loss(g_prev["means"], g_now["means"], g_prev["quats"], g_now["quats"], idx, w)
        return sreg, lsc, rig

    def world_terms(self, t: int, g_prev: dict | None, g_now: dict, flow: bool) -> tuple[Tensor, Tensor, Tensor]:
        """World-frame balanced RGB / mask losses at frame t (and the flow loss from t-1 when asked)."""
        f = self.fit
        img, alpha, _ = f.render(g_now, f.cams[t], f.W, f.H)
        v = f.valid[t]
        l_rgb = G.balanced_loss(img[0], f.world_target[t], f.vis[t], v)
        l_mask = G.balanced_loss(alpha[0], f.vis[t].float(), f.vis[t], v)
        l_flow = torch.zeros(())
        if flow and g_prev is not None and f.flow is not None and t > 0:
            fl = f.flow_render(g_prev, g_now, f.cams[t - 1], f.cams[t], f.W, f.H)
            target = f.flow[t - 1] * f.vis[t - 1][..., None]
            err = ((fl - target) / torch.tensor([f.W, f.H])).abs().sum(-1)
            m = f.vis[t - 1] & f.valid[t - 1]
            l_flow = (err[m].mean() if bool(m.any()) else 0.0) + (err[~f.vis[t - 1]].mean())
        return l_rgb, l_mask, l_flow


class DeformStage(_DynamicPhase):
    """Spec 4.5: the deformation field trained on per-frame object-centric crops (canonical frozen); with
    ``factorise=False`` (the ablation: deformation only) on the world frames with frame 0's placement."""

    kind = "deform"

    def build(self):
        self._ensure_dyn()
        fld = self.fit.dyn.field
        return {"field": _adamw([{"params": fld.mlp_parameters(), "lr": 6.4e-4},
                                 {"params": fld.grid_parameters(), "lr": 6.4e-3}])}

    def train_step(self, step: int, progress: float) -> StepOutput:
        f, st = self.fit, self.fit.st
        ts = self.frames_batch()
        B = len(ts)
        r = max(progress, 1.0 / max(self.steps, 1))
        R = st.crop_size
        tot = torch.zeros(())
        logs = {"rgb": 0.0, "mask": 0.0, "flow": 0.0, "rigid": 0.0, "sds": 0.0}
        for t in ts:
            tp = max(t - 1, 0)
            g_now, g_prev = f.object_gaussians(t), f.object_gaussians(tp)
            if st.factorise:
                img, alpha, _ = f.render(g_now, f.crop_cam_at(t), R, R)
                v = f.crop_valid[t]
                l_rgb = G.balanced_loss(img[0], f.crop_rgb[t], f.crop_mask[t], v)
                l_mask = G.balanced_loss(alpha[0], f.crop_mask[t].float(), f.crop_mask[t], v)
                if not bool(f.box_valid[t]):
                    l_rgb, l_mask = l_rgb * 0, l_mask * 0
                l_flow = torch.zeros(())
                if f.crop_flow is not None and t > 0 and st.flow_weight > 0:
                    fl = f.flow_render(g_prev, g_now, f.crop_cam_at(tp), f.crop_cam_at(t), R, R)
                    target, m = f.crop_flow[0][t], f.crop_flow[1][t]
                    err = ((fl - target * m[..., None]) / R).abs().sum(-1)
                    mv = m & f.crop_valid[t - 1]
                    l_flow = (err[mv].mean() if bool(mv.any()) else 0.0) + err[~m].mean()
                l_sds = f.sds_loss(g_now, t, st.sds_views_dynamic, progress, 500)
            else:  # deformation only: the field explains all motion in the world frame (frame 0's placement)
                w_prev = G.place(g_prev, *f.placement(tp), f.A, f.qA)
                w_now = G.place(g_now, *f.placement(t), f.A, f.qA)
                l_rgb, l_mask, l_flow = self.world_terms(t, w_prev, w_now, st.flow_weight > 0)
                l_sds = f.sds_loss(g_now, t, st.sds_views_dynamic, progress, 500)
            sreg, lsc, rig = self.regularisers(g_prev, g_now)
            tot = tot + (st.rgb_weight * r * l_rgb + st.mask_weight * r * l_mask + st.flow_weight * r * l_flow
                         + st.scale_reg_weight * r * sreg + st.scale_smooth_weight * r * lsc
                         + st.rigid_weight * r * rig) / B + l_sds / B
            for k_, v_ in (("rgb", l_rgb), ("mask", l_mask), ("flow", l_flow), ("rigid", rig), ("sds", l_sds)):
                logs[k_] += float(torch.as_tensor(v_).detach()) / B
        return StepOutput(tot, logs)

    def param_state(self):
        d = self.fit.dyn
        return {} if d is None else {f"field/{k}": v.detach().clone() for k, v in d.field.state_dict().items()}

    def load_params(self, state):
        fs = {k[6:]: v for k, v in state.items() if k.startswith("field/")}
        if fs and self.fit.model is not None:
            self._ensure_dyn()
            self.fit.dyn.field.load_state_dict(fs)


class TranslateStage(_DynamicPhase):
    """Spec 4.7: the deformation frozen, the per-frame world translations ``p_t`` optimised with world RGB / mask
    losses (AdamW, weight decay 0, lr 1e-3 -> 2e-5 log-linear over 500 steps)."""

    kind = "translate"

    def build(self):
        self._ensure_dyn()
        for p in self.fit.dyn.field.parameters():
            p.requires_grad_(False)
        return {"translation": torch.optim.AdamW([self.fit.p], lr=1e-3, eps=1e-15, weight_decay=0.0)}

    def train_step(self, step: int, progress: float) -> StepOutput:
        f, st = self.fit, self.fit.st
        self._opts["translation"].param_groups[0]["lr"] = 1e-3 * (2e-5 / 1e-3) ** min(step / 500, 1.0)
        ts = self.frames_batch()
        r = max(progress, 1.0 / max(self.steps, 1))
        tot = torch.zeros(())
        for t in ts:
            with torch.no_grad():
                g = f.object_gaussians(t)
            S, p = f.placement(t)
            l_rgb, l_mask, _ = self.world_terms(t, None, G.place(g, S, p, f.A, f.qA), False)
            tot = tot + (st.world_rgb_weight * r * l_rgb + st.world_mask_weight * r * l_mask) / len(ts)
        return StepOutput(tot, {})

    def finish(self):
        for p in self.fit.dyn.field.parameters():
            p.requires_grad_(True)

    def param_state(self):
        return {"p": self.fit.p.detach().clone()}

    def load_params(self, state):
        if "p" in state:
            with torch.no_grad():
                self.fit.p.copy_(state["p"])


class JointStage(_DynamicPhase):
    """Spec 4.8: deformation (lr x 0.1) and translations fine-tuned together with the world-frame RGB, mask, flow
    (flow gradients reach only the deformation: placement detached) and world-frame rigidity losses."""

    kind = "joint"

    def build(self):
        self._ensure_dyn()
        fld = self.fit.dyn.field
        return {"joint": _adamw([{"params": fld.mlp_parameters(), "lr": 6.4e-5},
                                 {"params": fld.grid_parameters(), "lr": 6.4e-4},
                                 {"params": [self.fit.p], "lr": 2e-6, "weight_decay": 0.0}])}

    def train_step(self, step: int, progress: float) -> StepOutput:
        f, st = self.fit, self.fit.st
        ts = self.frames_batch()
        r = max(progress, 1.0 / max(self.steps, 1))
        tot = torch.zeros(())
        for t in ts:
            tp = max(t - 1, 0)
            go, gp = f.object_gaussians(t), f.object_gaussians(tp)
            S, p = f.placement(t)
            Sp, pp = f.placement(tp)
            w_now = G.place(go, S, p, f.A, f.qA)
            w_prev = G.place(gp, Sp, pp, f.A, f.qA)
            l_rgb, l_mask, _ = self.world_terms(t, None, w_now, False)
            l_flow = torch.zeros(())
            if f.flow is not None and t > 0 and st.flow_weight > 0:
                _, _, l_flow = self.world_terms(t, G.place(gp, Sp.detach(), pp.detach(), f.A, f.qA),
                                                G.place(go, S.detach(), p.detach(), f.A, f.qA), True)
            sreg, lsc, _ = self.regularisers(gp, go)
            idx, w = f.knn
            rig = G.rigidity_loss(w_prev["means"], w_now["means"], w_prev["quats"], w_now["quats"], idx, w)
            tot = tot + (st.rgb_weight * r * l_rgb + st.mask_weight * r * l_mask + st.flow_weight * r * l_flow
                         + st.scale_reg_weight * r * sreg + st.scale_smooth_weight * r * lsc
                         + st.rigid_weight * r * rig) / len(ts)
        return StepOutput(tot, {})

    def param_state(self):
        d = self.fit.dyn
        out = {"p": self.fit.p.detach().clone()}
        if d is not None:
            out.update({f"field/{k}": v.detach().clone() for k, v in d.field.state_dict().items()})
        return out

    def load_params(self, state):
        if "p" in state:
            with torch.no_grad():
                self.fit.p.copy_(state["p"])
        fs = {k[6:]: v for k, v in state.items() if k.startswith("field/")}
        if fs and self.fit.model is not None:
            self._ensure_dyn()
            self.fit.dyn.field.load_state_dict(fs)


def object_stages(fit: ObjectFit, steps: dict[str, int]) -> list:
    """The stages of one object in order (stages with 0 steps left out); the deformation-only ablation has no
    translation / joint stage."""
    kinds = [(StaticLiftStage, "static"), (DeformStage, "deform")]
    if fit.st.factorise:
        kinds += [(TranslateStage, "translate"), (JointStage, "joint")]
    out: list = []
    for cls, key in kinds:
        if int(steps.get(key, 0)) > 0:
            out.append(cls(fit, len(out), steps[key]))
    return out


__all__ = ["FitSettings", "ObjectFit", "StaticLiftStage", "DeformStage", "TranslateStage", "JointStage",
           "object_stages"]
