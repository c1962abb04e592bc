"""DreamSteerer part 6 (issue 21, beyond the paper): `studio edit model.ply`, the personalised edit of a Gaussian
asset: the subject mask lifted to the Gaussians, colours-only multi-view DDS, a PLY with the same Gaussians out."""
from __future__ import annotations

import json

import pytest
import torch


def _asset(path, n=600, base="red_cube"):
    from studio.io.ply import write_ply
    from studio.students.gaussians import rgb_to_sh
    from studio.world.objects import get_object

    g = get_object(base).gaussians(n, seed=0)
    return write_ply(path, g["means"], g["scales"].log(), g["quats"],
                     torch.logit(g["opacities"].clamp(1e-4, 1 - 1e-4)), rgb_to_sh(g["colors"])[:, None])


def _studio(*args):
    from studio.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


TINY = ["--personalize-steps", "2", "--steer-steps", "2", "--guided-samples", "1", "--guided-steps", "2",
        "--num-references", "3", "--edit3d-steps", "3", "--mask-views", "3", "--eval-views", "2", "--eval-size", "32",
        "--turntable-frames", "2", "--turntable-size", "32"]


def test_lift_mask_to_gaussians_follows_the_2d_masks():
    """Gaussians seen only inside the masks get weight 1, only outside 0; a left-half mask lifts to the
    Gaussians on the camera's left (x < 0 seen from the front) and not to those on its right."""
    from studio.cameras import orbit_cameras
    from studio.students.gaussians import GaussianModel
    from studio.train.edit_stages import lift_mask_to_gaussians

    g = torch.Generator().manual_seed(0)
    pts = torch.rand(300, 3, generator=g) * 1.2 - 0.6
    model = GaussianModel.from_points(pts, torch.full((300, 3), 0.5), sh_degree=0, scale=0.05, opacity=0.5)
    cams = orbit_cameras([0.0], [0.0], 3.0, 40.0, 32, 32)
    ones, zeros = torch.ones(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    w1, w0 = lift_mask_to_gaussians(model, cams, ones), lift_mask_to_gaussians(model, cams, zeros)
    seen = w1 > 0
    assert seen.float().mean() > 0.9 and torch.allclose(w1[seen], torch.ones_like(w1[seen]), atol=1e-5)
    assert float(w0.abs().max()) == 0.0
    half = zeros.clone()
    half[..., :16] = 1  # the image's left half
    wh = lift_mask_to_gaussians(model, cams, half)
    from studio.render.gaussians import rasterize_gaussians

    proj = rasterize_gaussians(model.means, model.quats, model.scales, model.opacities, model.colors,
                               cams.viewmats, cams.Ks, 32, 32, sh_degree=0, backend="torch")[2]["means2d"][0, :, 0]
    left, right = seen & (proj < 12), seen & (proj > 20)
    assert left.sum() > 10 and right.sum() > 10
    assert float(wh[left].mean()) > 0.9 and float(wh[right].mean()) < 0.1


def test_studio_edit_model_ply_end_to_end(tmp_path):
    """`studio edit model.ply` with tiny settings: a PLY that studio.io reads with the same Gaussians (means,
    scales, rotations, opacities bit-identical; colours changed), the turntable, the masks and the held-out metrics."""
    from studio.io.ply import read_ply

    src = _asset(tmp_path / "asset" / "model.ply")
    assert _studio("edit", str(src), "--concept", "striped_cube", "--out", str(tmp_path / "o"), *TINY) == 0
    run = tmp_path / "o" / "asset-model-edit"
    for f in ("model.ply", "model.splat", "turntable.mp4", "edited.png", "source.png", "mask.png",
              "gaussian_mask.png", "heldout.png", "metrics.json", "steered/pytorch_lora_weights.safetensors"):
        assert (run / f).is_file(), f
    a, b = read_ply(src), read_ply(run / "model.ply")
    assert b["means"].shape[0] == a["means"].shape[0] == 600
    for k in ("means", "scales", "quats", "opacities"):
        assert torch.equal(a[k], b[k]), k
    assert float((a["sh"] - b["sh"]).abs().max()) > 1e-4  # the colours were edited
    m = json.loads((run / "metrics.json").read_text())
    assert m["means_max_change"] == 0.0 and m["alpha_iou_heldout"] == 1.0 and m["alpha_iou_ring"] == 1.0
    assert m["heldout_sector"] == [60.0, 120.0] and m["n_gaussians"] == 600
    for k in ("edit_3d_concept_fidelity_heldout", "source_concept_fidelity_heldout",
              "concept_palette_distance_heldout", "background_error_heldout"):
        assert isinstance(m[k], float), k
    assert m["target_prompt"] == "a sks cube" and m["steered"]


def test_studio_edit_model_ply_user_errors(tmp_path, capsys):
    assert _studio("edit", str(tmp_path / "missing.ply"), "--concept", "striped_cube", "--out", str(tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.ply").write_bytes(b"not a ply")
    assert _studio("edit", str(tmp_path / "bad.ply"), "--concept", "striped_cube", "--out", str(tmp_path)) == 2
    src = _asset(tmp_path / "m.ply", n=50)
    assert _studio("edit", str(src), "--concept", "striped_cube", "--edit3d-params", "means",
                   "--out", str(tmp_path)) == 2
    assert "only colours" in capsys.readouterr().err


@pytest.mark.slow
def test_3d_edit_moves_heldout_colours_towards_the_concept(tmp_path):
    """With a real (short) DreamBooth personalisation, the colours-only multi-view edit moves the asset towards the
    concept on views inside the held-out azimuth sector that no editing camera saw: held-out concept fidelity and
    palette distance both improve on the unedited asset's."""
    src = _asset(tmp_path / "asset" / "model.ply", n=1000)
    args = ["--preset", "db", "--personalize-steps", "60", "--edit3d-steps", "60", "--eval-views", "3",
            "--turntable-frames", "2", "--turntable-size", "32"]
    assert _studio("edit", str(src), "--concept", "striped_cube", "--out", str(tmp_path / "o"), *args) == 0
    m = json.loads((tmp_path / "o" / "asset-model-edit" / "metrics.json").read_text())
    assert m["edit_3d_concept_fidelity_heldout"] > m["source_concept_fidelity_heldout"] + 0.02
    assert m["concept_palette_distance_heldout"] < m["source_palette_distance_heldout"]
