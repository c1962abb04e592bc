
import pytest
import torch

from studio.cameras import (Cameras, OrbitSampler, intrinsics_from_fov, look_at, opencv_to_opengl, opengl_to_opencv,
                            orbit_cameras, ring_cameras)


def test_look_at_center_and_target_projects_to_principal_point():
    eyes = torch.tensor([[0.0, 0.0, 3.0], [2.0, 1.0, -1.0], [0.0, 4.0, 0.0]])  # incl. straight-down view
    V = look_at(eyes)
    cams = Cameras(V, intrinsics_from_fov(torch.full((3,), 50.0), 64, 48), 64, 48)
    assert torch.allclose(cams.centers, eyes, atol=1e-5)
    pix, z = cams.project(torch.zeros(1, 3))
    assert torch.allclose(pix[:, 0], torch.tensor([32.0, 24.0]).expand(3, 2), atol=1e-4)
    assert torch.allclose(z[:, 0], eyes.norm(dim=-1), atol=1e-5)
    R = V[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(3), atol=1e-5)


def test_y_up_and_azimuth_convention():
    cams = orbit_cameras(0.0, [0.0, 90.0, 180.0], 3.0, 40.0, 32, 32)
    assert torch.allclose(cams.centers, torch.tensor([[0, 0, 3.0], [3.0, 0, 0], [0, 0, -3.0]]), atol=1e-5)
    # world +y (up) appears above the image centre: smaller row index (OpenCV y down).
    pix, _ = cams.project(torch.tensor([[0.0, 0.5, 0.0]]))
    assert (pix[:, 0, 1] < 16).all()
    # From the front (azimuth 0) world +x is on the right of the image.
    pix, _ = cams[0].project(torch.tensor([[0.5, 0.0, 0.0]]))
    assert pix[0, 0, 0] > 16


def test_opencv_opengl_round_trip():
    cams = ring_cameras(5, width=20, height=10)
    c2w = cams.c2w_opencv
    assert torch.allclose(opengl_to_opencv(opencv_to_opengl(c2w)), c2w, atol=1e-6)
    gl = cams.c2w_opengl
    # OpenGL cameras look down their -z axis: towards the origin.
    look = -gl[:, :3, 2]
    to_origin = -gl[:, :3, 3] / gl[:, :3, 3].norm(dim=-1, keepdim=True)
    assert torch.allclose(look, to_origin, atol=1e-5)


def test_kornia_projection_matches():
    cams = orbit_cameras([10.0, -20.0], [30.0, 200.0], [2.5, 3.0], [45.0, 60.0], 40, 30)
    pts = torch.randn(7, 3) * 0.3
    ours, _ = cams.project(pts)
    kc = cams.to_kornia()
    theirs = kc.project(pts[None].expand(2, 7, 3))
    assert torch.allclose(ours, theirs, atol=1e-3)


def test_fov_round_trip_and_resize():
    K = intrinsics_from_fov(torch.tensor([30.0, 60.0]), 64, 32)
    cams = Cameras(look_at(torch.tensor([[0, 0, 3.0], [1, 1, 1.0]])), K, 64, 32)
    assert torch.allclose(cams.fovy, torch.tensor([30.0, 60.0]), atol=1e-4)
    assert torch.allclose(cams.resized(128, 64).fovy, cams.fovy, atol=1e-4)


def test_orbit_sampler_ranges_and_determinism():
    s = OrbitSampler(elevation_range=(0, 30), radius_range=(2, 3), fovy_range=(40, 50), width=16, height=16)
    a = s.sample(8, torch.Generator().manual_seed(1))
    b = s.sample(8, torch.Generator().manual_seed(1))
    assert torch.equal(a.cameras.viewmats, b.cameras.viewmats)
    assert ((a.elevation >= 0) & (a.elevation <= 30)).all() and ((a.radius >= 2) & (a.radius <= 3)).all()
    assert ((a.azimuth > -180) & (a.azimuth <= 180)).all()
    assert torch.allclose(a.cameras.centers.norm(dim=-1), a.radius, atol=1e-4)
    assert torch.allclose(a.cameras.fovy, a.fovy, atol=1e-3)
    # stratified azimuths cover all 8 slices of the circle
    slices = ((a.azimuth + 180) // 45).long().unique()
    assert len(slices) == 8


def test_bad_inputs():
    with pytest.raises(ValueError, match="elevation_range"):
        OrbitSampler(elevation_range=(30, 0))
    with pytest.raises(ValueError, match="Ks"):
        Cameras(torch.eye(4)[None], torch.eye(3).expand(2, 3, 3), 8, 8)
