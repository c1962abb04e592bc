"""Threads of the native CPU kernels (cuda_ext/cpu/parallel.h): results do not depend on the thread count or
on the threading mode, and idle threads do not spin where they should not.

By default the kernels run on torch's intra-op (OpenMP) team, whose idle threads wait as libgomp's wait policy
says: with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch loads) they sleep, which is what lets two jobs share
two cores. ``STUDIO_NATIVE_PARALLEL=pool`` runs them on a pool of our own whose helpers always sleep.

Spinning is measured as CPU time, which another job on the machine does not inflate the way it inflates wall
time: each kernel call is followed by a 15 ms pause, long enough for a spinning team to burn its whole spin
budget (libgomp spins ~300k iterations, several ms, before it sleeps) and short enough to keep the test quick.
Only our kernels run in the timed loop (inputs are screen-space Gaussians, no projection)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from studio.render._gaussians_ext import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native rasterizer unavailable: {native.load_error()}")


def _projected(n=3000, size=64, cameras=2):
    """Random screen-space Gaussians (what projection hands the blend): means, conics, colours, radii, depths."""
    g = torch.Generator().manual_seed(0)
    C = cameras
    sx = 0.5 + 3.0 * torch.rand(C, n, generator=g)  # pixel standard deviations
    sy = 0.5 + 3.0 * torch.rand(C, n, generator=g)
    rho = 0.6 * (torch.rand(C, n, generator=g) - 0.5)
    det = (sx * sy) ** 2 * (1 - rho ** 2)
    conics = torch.stack([sy ** 2 / det, -rho * sx * sy / det, sx ** 2 / det], -1)
    p = {
        "means2d": torch.rand(C, n, 2, generator=g) * size,
        "conics": conics,
        "colors": torch.rand(C, n, 3, generator=g),
        "opacities": 0.1 + 0.8 * torch.rand(C, n, generator=g),
        "radii": torch.stack([(3 * sx).ceil(), (3 * sy).ceil()], -1).to(torch.int32),
        "depths": 1 + torch.rand(C, n, generator=g),
    }
    return p, size


def _render(p, size):
    leaves = {k: p[k].detach().clone().requires_grad_(True) for k in ("means2d", "conics", "colors", "opacities")}
    bg = torch.full((p["means2d"].shape[0], 3), 0.5, requires_grad=True)
    img, alpha, _ = native.rasterize_to_pixels(leaves["means2d"], leaves["conics"], leaves["colors"],
                                               leaves["opacities"], p["radii"], p["depths"], size, size, bg)
    (img.sum() + alpha.sum()).backward()
    return [img.detach(), alpha.detach(), bg.grad] + [t.grad for t in leaves.values()]


def _cpu_ms_per_call(p, size, nt, calls=12):
    torch.set_num_threads(nt)
    _render(p, size)  # warm-up (threads created)
    time.sleep(0.05)
    c = time.process_time()
    for _ in range(calls):
        _render(p, size)
        time.sleep(0.015)
    return (time.process_time() - c) * 1000.0 / calls


def spin_check() -> tuple[float, float]:
    """(CPU ms per call with 1 thread, with 2 threads), best of two, in this process's threading mode."""
    p, size = _projected()
    one = min(_cpu_ms_per_call(p, size, 1) for _ in range(2))
    two = min(_cpu_ms_per_call(p, size, 2) for _ in range(2))
    return one, two


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    mode = os.environ.pop("STUDIO_NATIVE_PARALLEL", None)
    yield
    torch.set_num_threads(before)
    os.environ.pop("STUDIO_NATIVE_PARALLEL", None)
    if mode is not None:
        os.environ["STUDIO_NATIVE_PARALLEL"] = mode


def test_results_do_not_depend_on_threads_or_mode(threads):
    p, size = _projected()
    torch.set_num_threads(1)
    ref = _render(p, size)
    for mode in (None, "pool"):
        for nt in (2, 3):
            if mode:
                os.environ["STUDIO_NATIVE_PARALLEL"] = mode
            else:
                os.environ.pop("STUDIO_NATIVE_PARALLEL", None)
            torch.set_num_threads(nt)
            got = _render(p, size)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (mode, nt)  # bit-identical


# The work is the same with two threads; a second thread adds wake-ups and cache misses, not a spinning core.
# A spinning OpenMP team measures 3-15x here (its idle thread spins after every parallel region).
def _assert_no_spin(one: float, two: float) -> None:
    assert two <= 2.0 * one + 1.0, f"CPU per call: 1 thread {one:.2f} ms, 2 threads {two:.2f} ms"


def test_pool_helpers_do_not_spin(threads):
    os.environ["STUDIO_NATIVE_PARALLEL"] = "pool"
    _assert_no_spin(*spin_check())


def test_default_team_does_not_spin_under_a_passive_wait_policy():
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_native_threads as t; "
            "print(json.dumps(t.spin_check()))")
    env = {k: v for k, v in os.environ.items() if k not in ("STUDIO_NATIVE_PARALLEL", "GOMP_SPINCOUNT")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_no_spin(*json.loads(r.stdout.strip().splitlines()[-1]))


def test_importing_studio_first_makes_the_default_team_passive():
    """``import studio`` before torch sets OMP_WAIT_POLICY=PASSIVE (the CLI, the app and benchmarks import it
    first): the default OpenMP team then sleeps instead of spinning."""
    code = ("import json, os, sys; import studio; assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'; "
            "sys.path.insert(0, sys.argv[1]); import test_native_threads as t; print(json.dumps(t.spin_check()))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("STUDIO_NATIVE_PARALLEL", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_no_spin(*json.loads(r.stdout.strip().splitlines()[-1]))
