"""Deformable 4D Gaussians: canonical 3D Gaussians + a K-planes (HexPlane) deformation field over (x, y, z, t).

The field of 4DGaussians / DreamGaussian4D / DreamScene4D (``../shared/specs/dreamscene4d.md`` section 4.1):

* six 2D planes per scale over the pairs of ``(x, y, z, tau)``: xy, xz, yz (spatial) and xt, yt, zt (time);
  ``multires`` spatial scales (``resolution * m``), time resolution ``time_resolution``
  (:func:`time_resolution_for`: ``max(25, int(0.8 T))``), ``channels`` per plane;
* bilinear sampling with ``align_corners=True`` and border padding (points outside the box stay finite);
  the six samples of a scale are **multiplied**, the scales **concatenated** (``channels * len(multires)``);
* planes that contain time start at 1, spatial planes at U(0.1, 0.5), so at initialisation the feature does not
  depend on time;
* a Linear ``feature -> width`` (Xavier), then three heads (position 3, log-scale 3, quaternion 4), each
  ``h = ReLU(x); h + Linear(h)`` followed by ``Linear(width -> out)``, **all head weights and biases zero**: the
  deformation starts exactly at the identity.

Outputs are added to the canonical parameters: ``mu_t = mu + d_mu``, ``log s_t = log s + d_logs``,
``q_t = q + d_q`` (the renderer normalises quaternions); opacity and colour stay static.

Time enters the render path: :meth:`DeformableGaussians.render` takes ``time`` (normalised ``tau`` in [-1, 1];
:func:`frame_time` maps a frame index, DreamScene4D's ``2 t / T - 1``) and renders through the shared renderer
(:func:`studio.render.rasterize_gaussians`), so any 4D method can use the student. :meth:`deformed` returns the
activated deformed Gaussians of a time (with the raw deltas, for rigidity / scale regularisers), and
:meth:`save` / :meth:`load` write one safetensors file holding the canonical Gaussians and the field weights.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.io.atomic import atomic_write_bytes
from studio.render import rasterize_gaussians

from .gaussians import GaussianModel

__all__ = ["KPlanesConfig", "KPlanesField", "DeformationField", "DeformableGaussians", "frame_time",
           "time_resolution_for"]

#: pairs of coordinates (x=0, y=1, z=2, tau=3) of the six planes; the first three are spatial
PLANE_AXES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
FORMAT = "studio.deformable_gaussians"


def time_resolution_for(n_frames: int, base: int = 25) -> int:
    """DreamScene4D's time resolution: ``base`` (25), or ``int(0.8 T)`` when that is larger."""
    return max(int(base), int(0.8 * int(n_frames)))


def frame_time(index, n_frames: int) -> Tensor:
    """Normalised time ``tau = 2 t / T - 1`` of frame index ``t`` of ``T`` frames (in [-1, 1 - 2/T])."""
    return 2.0 * torch.as_tensor(index, dtype=torch.float32) / max(int(n_frames), 1) - 1.0


@dataclass
class KPlanesConfig:
    bounds: float = 1.6
    """half side of the spatial box the planes cover (object-centric units)"""
    resolution: int = 64
    multires: tuple[int, ...] = (1, 2, 4, 8)
    time_resolution: int = 25
    channels: int = 32
    width: int = 64
    """hidden width of the MLP and its heads"""


class KPlanesField(nn.Module):
    """Multi-scale K-planes feature of ``(x, y, z, tau)``: ``[N, channels * len(multires)]``."""

    def __init__(self, cfg: KPlanesConfig | None = None, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg = cfg or KPlanesConfig()
        if cfg.resolution < 2 or cfg.time_resolution < 2 or cfg.channels < 1 or not cfg.multires:
            raise ValueError(f"K-planes need resolution >= 2, time_resolution >= 2, channels >= 1 and a scale; got {cfg}")
        g = torch.Generator().manual_seed(int(seed))
        self.planes = nn.ParameterList()
        for m in cfg.multires:
            r = int(cfg.resolution * m)
            for a, b in PLANE_AXES:
                ha = cfg.time_resolution if a == 3 else r
                wb = cfg.time_resolution if b == 3 else r
                if b == 3:  # a plane with time: starts at 1 (time-independent feature at init)
                    p = torch.ones(1, cfg.channels, wb, ha)
                else:
                    p = 0.1 + 0.4 * torch.rand(1, cfg.channels, wb, ha, generator=g)
                self.planes.append(nn.Parameter(p))

    @property
    def out_dim(self) -> int:
        return self.cfg.channels * len(self.cfg.multires)

    def coords(self, means: Tensor, tau: Tensor) -> Tensor:
        """``[N, 4]`` coordinates in [-1, 1]: means over ``bounds``, ``tau`` as given (broadcast to ``[N]``)."""
        tau = torch.as_tensor(tau, dtype=means.dtype, device=means.device).reshape(-1)
        tau = tau.expand(means.shape[0]) if tau.numel() == 1 else tau
        return torch.cat([means / self.cfg.bounds, tau[:, None]], dim=-1)

    def sample_plane(self, index: int, coords: Tensor) -> Tensor:
        """Bilinear sample of plane ``index`` at ``coords [N,4]`` -> ``[N, channels]``."""
        a, b = PLANE_AXES[index % 6]
        grid = coords[:, [a, b]].reshape(1, -1, 1, 2)  # grid_sample: x indexes width (axis a), y height (axis b)
        out = F.grid_sample(self.planes[index], grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out[0, :, :, 0].t()

    def forward(self, means: Tensor, tau) -> Tensor:
        c = self.coords(means, tau)
        feats = []
        for s in range(len(self.cfg.multires)):
            f = None
            for k in range(6):
                v = self.sample_plane(6 * s + k, c)
                f = v if f is None else f * v
            feats.append(f)
        return torch.cat(feats, dim=-1)


class _Head(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.res = nn.Linear(width, width)
        self.out = nn.Linear(width, out)
        for lin in (self.res, self.out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x)
        return self.out(h + self.res(h))


class DeformationField(nn.Module):
    """K-planes feature -> ``(d_means [N,3], d_log_scales [N,3], d_quats [N,4])``; identity at initialisation."""

    def __init__(self, cfg: KPlanesConfig | None = None, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg or KPlanesConfig()
        self.grid = KPlanesField(self.cfg, seed=seed)
        self.feature_net = nn.Linear(self.grid.out_dim, self.cfg.width)
        g = torch.Generator().manual_seed(int(seed) + 1)
        with torch.no_grad():
            bound = math.sqrt(6.0 / (self.grid.out_dim + self.cfg.width))  # Xavier uniform
            self.feature_net.weight.copy_((torch.rand(self.feature_net.weight.shape, generator=g) * 2 - 1) * bound)
            self.feature_net.bias.zero_()
        self.pos_head = _Head(self.cfg.width, 3)
        self.scale_head = _Head(self.cfg.width, 3)
        self.rot_head = _Head(self.cfg.width, 4)

    def forward(self, means: Tensor, tau) -> tuple[Tensor, Tensor, Tensor]:
        h = self.feature_net(self.grid(means, tau))
        return self.pos_head(h), self.scale_head(h), self.rot_head(h)

    def grid_parameters(self) -> list[nn.Parameter]:
        return list(self.grid.parameters())

    def mlp_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.grid.parameters()}
        return [p for p in self.parameters() if id(p) not in ids]


class DeformableGaussians(nn.Module):
    """Canonical :class:`GaussianModel` + :class:`DeformationField`; time is an input of :meth:`render`.

    ``freeze_canonical`` (DreamScene4D: only the field trains) turns off gradients of the canonical parameters.
    """

    def __init__(self, canonical: GaussianModel, field: DeformationField | None = None, *,
                 cfg: KPlanesConfig | None = None, seed: int = 0, freeze_canonical: bool = True):
        super().__init__()
        self.canonical = canonical
        self.field = field if field is not None else DeformationField(cfg, seed=seed)
        if freeze_canonical:
            for p in self.canonical.parameters():
                p.requires_grad_(False)

    @property
    def num_gaussians(self) -> int:
        return self.canonical.num_gaussians

    def deltas(self, tau) -> tuple[Tensor, Tensor, Tensor]:
        return self.field(self.canonical.means, tau)

    def deformed(self, tau) -> dict[str, Tensor]:
        """Activated Gaussians at time ``tau``: ``means, quats, scales, opacities, colors`` (SH coefficients),
        plus the raw deltas ``d_means, d_log_scales, d_quats``."""
        c = self.canonical
        dm, ds, dq = self.deltas(tau)
        p = c.params
        return {"means": p["means"] + dm, "quats": p["quats"] + dq, "scales": torch.exp(p["scales"] + ds),
                "opacities": c.opacities, "colors": c.colors, "d_means": dm, "d_log_scales": ds, "d_quats": dq}

    def render(self, viewmats: Tensor, Ks: Tensor, width: int, height: int, *, time=0.0,
               colors: Tensor | None = None, sh_degree: int | None = None, **kwargs):
        """Render the Gaussians deformed to ``time`` (normalised tau) with the shared renderer."""
        g = self.deformed(time)
        if colors is None:
            colors, sh = g["colors"], (self.canonical.active_sh_degree if sh_degree is None else sh_degree)
        else:
            sh = sh_degree
        return rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], colors, viewmats, Ks,
                                   width, height, sh_degree=sh, **kwargs)

    # -- one file: canonical Gaussians + field weights --------------------------------------------------------
    def save(self, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (safetensors): ``canonical/<param>`` and ``field/<state key>`` tensors; the header holds
        the field config, the SH degree and ``metadata``."""
        from safetensors.torch import save as st_save

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        tensors = {f"canonical/{k}": v.detach().cpu().contiguous() for k, v in self.canonical.params.items()}
        tensors.update({f"field/{k}": v.detach().cpu().contiguous() for k, v in self.field.state_dict().items()})
        cfg = asdict(self.field.cfg)
        cfg["multires"] = list(cfg["multires"])
        info = {"format": FORMAT, "version": 1, "kplanes": cfg, "sh_degree": self.canonical.sh_degree,
                "metadata": dict(metadata or {})}
        atomic_write_bytes(path, st_save(tensors, metadata={"studio": json.dumps(info)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "DeformableGaussians":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"could not load deformable Gaussians '{path}': file not found")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                info = json.loads((f.metadata() or {}).get("studio", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets one message
            raise ValueError(f"could not load deformable Gaussians '{path}': {exc}") from None
        if info.get("format") != FORMAT:
            raise ValueError(f"'{path}' is not a deformable-Gaussians file (format {info.get('format')!r})")
        kp = dict(info["kplanes"])
        kp["multires"] = tuple(kp["multires"])
        canonical = GaussianModel({k[len("canonical/"):]: v for k, v in tensors.items() if k.startswith("canonical/")},
                                  info.get("sh_degree"), active_sh_degree=int(info.get("sh_degree") or 0))
        out = cls(canonical, DeformationField(KPlanesConfig(**kp)))
        out.field.load_state_dict({k[len("field/"):]: v for k, v in tensors.items() if k.startswith("field/")})
        return out.to(device)
