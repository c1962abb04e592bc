"""The image-edit kind on a 3D Gaussian asset (issue 21 part 6, beyond the paper): ``studio edit model.ply``.

A ``model.ply`` written by ``studio generate`` (or any 3DGS PLY, :mod:`studio.io.ply`) is loaded as a
:class:`~studio.students.gaussians.GaussianModel`; the kind renders its **source view** (``--view-azimuth`` /
``--view-elevation``, outside the held-out sector) as the 2D source the method personalises and steers on, hands
the method the model, an :class:`~studio.cameras.OrbitSampler` (``--orbit-*``, never sampling the held-out
azimuth sector ``--heldout-azimuth``, as the text-to-3D kind) and the cameras for the subject masks (a ring at
the source view's elevation, held-out azimuths dropped), and the method edits the Gaussians' colours in place
(``ImageEditMethod.edit_3d``). The kind then writes ``model.ply`` (same Gaussians, same means / scales /
rotations / opacities; only colours changed), ``model.splat``, ``turntable.mp4`` (the export of
``studio generate``), ``edited.png`` / ``source.png`` / ``mask.png`` at the source view, ``gaussian_mask.png``
(the lifted mask rendered at the source view), ``heldout.png`` (source | edited [| ground truth] at the held-out
views) and the metrics:

* ``alpha_iou_heldout`` / ``alpha_iou_ring``: geometry preservation, IoU of the edited vs the source renders'
  silhouettes (alpha > 0.5) at the held-out views / a ring of 4 views (1 by construction while only colours are edited; the
  check that nothing else moved); ``means_max_change`` (0 by construction);
* for a ShapeWorld concept (``--concept striped_cube``): ``edit_3d_concept_fidelity_heldout`` =
  1 - ``concept_error_heldout`` (RMSE to the concept's ground-truth renders, :func:`~studio.world.concepts.
  concept_gaussians`, inside the shared silhouette, at views **inside** the held-out sector that no editing
  camera saw), ``concept_palette_distance_heldout`` and the same two for the unedited source
  (``source_concept_fidelity_heldout``, ``source_palette_distance_heldout``: the before value), and
  ``background_error_heldout`` (RMSE to the source outside the silhouette). These are exact when the PLY is the
  concept's base ShapeWorld object (same geometry); for a generated asset they compare inside the shared
  silhouette only (non-paper metrics in either case).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError

PLY_SUFFIX = ".ply"
MAX_PLY_BYTES = 512 * 1024 * 1024


def is_ply(source: str) -> bool:
    return str(source).lower().endswith(PLY_SUFFIX)


def load_asset(path: str | Path):
    """The PLY as a GaussianModel (UserError naming the file when it is missing, too big or unreadable)."""
    from ..students.gaussians import GaussianModel

    p = Path(path)
    if not p.is_file():
        raise UserError(f"source asset {str(p)!r} does not exist; give a model.ply written by studio generate")
    if p.stat().st_size > MAX_PLY_BYTES:
        raise UserError(f"{str(p)!r} is larger than {MAX_PLY_BYTES // 2**20} MB")
    return GaussianModel.from_ply(p)


def _activated(model) -> dict[str, Tensor]:
    return {"means": model.means.detach(), "quats": model.quats.detach(), "scales": model.scales.detach(),
            "opacities": model.opacities.detach(), "colors": model.colors.detach()}


def sector_of(cfg):
    from .text_to_3d import heldout_sector

    return heldout_sector(cfg)


def source_view_camera(cfg, size: int):
    from ..cameras import orbit_cameras

    return orbit_cameras([float(cfg.view_elevation)], [float(cfg.view_azimuth)], float(cfg.orbit_radius),
                         float(cfg.orbit_fovy), size, size)


def mask_cameras(cfg, size: int):
    """``cfg.mask_views`` cameras evenly spaced in azimuth from the source view, held-out azimuths dropped."""
    from ..cameras import azimuth_in_sector, orbit_cameras

    n = int(cfg.mask_views)
    az = float(cfg.view_azimuth) + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    sector = sector_of(cfg)
    if sector is not None:
        az = az[~azimuth_in_sector(az, sector)]
    return orbit_cameras(torch.full_like(az, float(cfg.view_elevation)), az, float(cfg.orbit_radius),
                         float(cfg.orbit_fovy), size, size)


def orbit_sampler(cfg, size: int):
    from ..cameras import OrbitSampler

    r, f = float(cfg.orbit_radius), float(cfg.orbit_fovy)
    return OrbitSampler(elevation_range=tuple(float(e) for e in cfg.orbit_elevation), radius_range=(r, r),
                        fovy_range=(f, f), width=size, height=size, exclude_azimuth=sector_of(cfg))


def eval_cameras(cfg, size: int):
    """Views inside the held-out sector (``sector_cameras``), or a ring between the mask views when it is off."""
    from ..cameras import ring_cameras
    from ..world.references import sector_cameras

    sector = sector_of(cfg)
    if sector is not None:
        return sector_cameras(sector, n=int(cfg.eval_views), size=size, radius=float(cfg.orbit_radius),
                              fovy=float(cfg.orbit_fovy)).cameras
    return ring_cameras(int(cfg.eval_views), elevation_deg=float(cfg.view_elevation), radius=float(cfg.orbit_radius),
                        fovy_deg=float(cfg.orbit_fovy), width=size, height=size,
                        start_azimuth_deg=float(cfg.view_azimuth) + 180.0 / max(1, int(cfg.eval_views)))


def render(g: dict, cams, sh_degree: int | None) -> tuple[Tensor, Tensor]:
    """``(images [C,3,H,W], alphas [C,1,H,W])`` on white with the torch rasterizer."""
    from ..world.references import render_gaussian_views

    r = render_gaussian_views(g, cams, sh_degree=sh_degree, backend="torch")
    return r["images"].permute(0, 3, 1, 2).contiguous(), r["alphas"].permute(0, 3, 1, 2).contiguous()


def render_source_view(model, cfg, size: int) -> Tensor:
    return render(_activated(model), source_view_camera(cfg, size), model.active_sh_degree)[0]


def finish(method, cfg, job, model, run_dir: Path, t0: float) -> dict:
    """Run the method's 3D edit on ``model`` and write the artefacts and metrics (module doc)."""
    from ..io import write_mp4, write_png, write_png_grid
    from ..render.turntable import render_turntable
    from ..world.concepts import CONCEPTS, concept_gaussians
    from ..world.edit_metrics import background_error, concept_error, palette_distance

    res = int(job.source.shape[-1])
    source_g = _activated(model)
    sh = model.active_sh_degree
    n0 = model.num_gaussians
    out = method.edit_3d(cfg, job, model, sampler=orbit_sampler(cfg, res), mask_cameras=mask_cameras(cfg, res))
    mask, gmask = out.pop("mask"), out.pop("gaussian_mask")
    out.pop("_pretrained", None)
    if model.num_gaussians != n0:
        raise RuntimeError(f"the 3D edit changed the number of Gaussians ({n0} -> {model.num_gaussians})")
    edited_g = _activated(model)
    run_dir = Path(run_dir)
    model.save_ply(run_dir / "model.ply")
    model.save_splat(run_dir / "model.splat")
    video = render_turntable(edited_g, n_frames=int(cfg.turntable_frames), size=int(cfg.turntable_size),
                             radius=float(cfg.orbit_radius), fovy_deg=float(cfg.orbit_fovy), sh_degree=sh,
                             backend="torch")
    write_mp4(run_dir / "turntable.mp4", video, fps=12)
    # the source view
    cam = source_view_camera(cfg, res)
    edited_view = render(edited_g, cam, sh)[0]
    write_png(run_dir / "edited.png", edited_view[0].permute(1, 2, 0))
    write_png(run_dir / "source.png", job.source[0].permute(1, 2, 0))
    m_img = torch.nn.functional.interpolate(mask.float(), size=(res, res), mode="nearest")
    write_png(run_dir / "mask.png", m_img[0, 0])
    m = dict(out)
    m["n_gaussians"] = model.num_gaussians
    m["means_max_change"] = float((edited_g["means"] - source_g["means"]).abs().max())
    if gmask is not None:
        m["gaussian_mask_fraction"] = float(gmask.mean())
        gm_feat = {**source_g, "colors": gmask[:, None].expand(-1, 3).contiguous()}
        write_png(run_dir / "gaussian_mask.png", render(gm_feat, cam, None)[0][0].permute(1, 2, 0))
    # held-out views: geometry preservation and concept fidelity
    size = int(cfg.eval_size)
    ecams = eval_cameras(cfg, size)
    e_img, e_a = render(edited_g, ecams, sh)
    s_img, s_a = render(source_g, ecams, sh)
    from ..cameras import ring_cameras

    rcams = ring_cameras(4, elevation_deg=float(cfg.view_elevation), radius=float(cfg.orbit_radius),
                         fovy_deg=float(cfg.orbit_fovy), width=size, height=size)
    _, re_a = render(edited_g, rcams, sh)
    _, rs_a = render(source_g, rcams, sh)

    def iou(a, b):
        a, b = a > 0.5, b > 0.5
        return float((a & b).sum() / (a | b).sum().clamp_min(1))

    m["alpha_iou_heldout"] = iou(e_a, s_a)
    m["alpha_iou_ring"] = iou(re_a, rs_a)
    m["heldout_sector"] = list(sector_of(cfg)) if sector_of(cfg) is not None else None
    tiles = [s_img, e_img]
    concept = str(cfg.concept).strip()
    if concept in CONCEPTS and not Path(concept).is_dir():
        gt_img, gt_a = render(concept_gaussians(concept), ecams, None)
        sil = ((gt_a > 0.5) & (s_a > 0.5)).float()
        ce, cs = concept_error(e_img, gt_img, sil), concept_error(s_img, gt_img, sil)
        m["concept_error_heldout"] = float(ce.mean())
        m["edit_3d_concept_fidelity_heldout"] = float(1 - ce.mean())
        m["source_concept_fidelity_heldout"] = float(1 - cs.mean())
        m["concept_palette_distance_heldout"] = float(palette_distance(e_img, gt_img, sil).nanmean())
        m["source_palette_distance_heldout"] = float(palette_distance(s_img, gt_img, sil).nanmean())
        m["background_error_heldout"] = float(background_error(e_img, s_img, (s_a > 0.5).float()).mean())
        m["silhouette_iou_vs_concept_heldout"] = iou(gt_a, s_a)
        tiles.append(gt_img)
    n = e_img.shape[0]
    write_png_grid(run_dir / "heldout.png", torch.cat(tiles).permute(0, 2, 3, 1), ncols=n, pad=1)
    m["seconds"] = round(time.perf_counter() - t0, 3)
    return m


__all__ = ["eval_cameras", "finish", "is_ply", "load_asset", "mask_cameras", "orbit_sampler", "render_source_view",
           "source_view_camera"]
