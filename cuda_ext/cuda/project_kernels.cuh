// Projection + spherical-harmonics colour of 3D Gaussians, forward and analytic backward, one CUDA thread per
// (camera, Gaussian). The maths is cuda_ext/cpu/project_math.h's scalar instance (project.h: Camera, Projected,
// ShDir, sh_basis, radii_of), the code the CPU fused path (rasterize.cpp: render_forward / render_backward) runs,
// so both backends compute the same formulas in the same order. Included by project.cu (nvcc) and by
// host_emulation.h / project_emulation.h (plain C++, CPU emulation for tests). No torch headers.
//
// Layout (contiguous, one float type S): means [N,3], quats [N,4] (w,x,y,z), scales [N,3], opacities [N],
// colors: features [N,D] / [C,N,D] (sh < 0) or SH coefficients [N,Kp,D] / [C,N,Kp,D] (the first (sh+1)^2 used),
// viewmats [C,4,4] (world to camera), Ks [C,3,3].
// Forward outputs: means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N,2] int32 (0 = culled),
// feats [C,N,Dt] (Dt = D, D + 1 with the depth appended (depth_mode 1), or 1: the depth only (depth_mode 2);
// colours are clamp_min(SH + 0.5, 0)), opac [C,N] (the opacity per camera).
// Backward: from v_means2d, v_conics, v_feats, v_opac, optionally v_depths (all [C,N,.]) and the forward's radii
// (a (camera, Gaussian) with zero radii was not binned: the blend's gradients are zero and it is skipped, as on
// the CPU, except for v_depths, which the torch path's differentiable depths output can carry for any pair).
// Per-Gaussian gradients (v_means, v_quats, v_scales, v_opacities, shared v_colors) are summed over the cameras
// with atomicAdd (zero them first; the order of the C adds is not fixed on a GPU); per-camera colours' gradients
// are written directly. Camera gradients are written per (camera, Gaussian) into cam_partial [C,N,12]
// (dR row-major 9, dt 3) and summed by cam_reduce_kernel in a fixed order (double accumulation) into
// v_viewmats [C,4,4] (the last row gets zero): deterministic, no contended atomics.
#pragma once

#include <cstdint>

#include "../cpu/project.h"
#include "project_args.h"

namespace studio_cuda {

namespace kernels {

template <typename S>
__device__ inline void add_to(S* p, S v) {
    atomicAdd(p, v);
}

template <typename S>
__global__ void project_fwd_kernel(ProjectArgs<S> a) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= int64_t(a.C) * a.N) return;
    const int c = int(idx / a.N);
    const int64_t n = idx - int64_t(c) * a.N;
    studio_project::Camera<S> cam;
    cam.load(a.viewmats + int64_t(c) * 16, a.Ks + int64_t(c) * 9, a.width, a.height);
    studio_project::Projected<S> pr;
    const S* mean = a.means + n * 3;
    pr.compute(cam, mean, a.quats + n * 4, a.scales + n * 3, a.eps2d, a.near_plane, a.far_plane);
    const S o = a.opacities[n];
    a.means2d[idx * 2] = pr.mean2d[0];
    a.means2d[idx * 2 + 1] = pr.mean2d[1];
    for (int j = 0; j < 3; ++j) a.conics[idx * 3 + j] = pr.conic[j];
    a.depths[idx] = pr.p[2];
    a.opac[idx] = o;
    studio_project::radii_of<S>(pr.in_depth, pr.ok_det, pr.a, pr.c, pr.mean2d[0], pr.mean2d[1], o, a.width,
                                a.height, a.radii + idx * 2);
    const int Dt = project_out_dim(a.D, a.depth_mode);
    S* fo = a.feats + idx * Dt;
    if (a.depth_mode != 2) {
        const int64_t gstride = int64_t(a.Kp) * a.D;
        const S* col = a.colors + (a.per_cam ? idx : n) * gstride;
        if (a.sh < 0) {
            for (int d = 0; d < a.D; ++d) fo[d] = col[d];
        } else {
            studio_project::ShDir<S> dir;
            S basis[16];
            dir.compute(mean, cam.centre);
            studio_project::sh_basis<S>(a.sh, dir.d[0], dir.d[1], dir.d[2], basis, nullptr);
            const int K = (a.sh + 1) * (a.sh + 1);
            for (int d = 0; d < a.D; ++d) {
                S v = 0;
                for (int k = 0; k < K; ++k) v += basis[k] * col[k * a.D + d];
                v += S(0.5);
                fo[d] = v > S(0) ? v : S(0);
            }
        }
    }
    if (a.depth_mode != 0) fo[Dt - 1] = pr.p[2];
}

template <typename S>
__global__ void project_bwd_kernel(ProjectArgs<S> a) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= int64_t(a.C) * a.N) return;
    const int c = int(idx / a.N);
    const int64_t n = idx - int64_t(c) * a.N;
    S* part = a.cam_partial + idx * 12;
    if (a.radii[idx * 2] <= 0 || a.radii[idx * 2 + 1] <= 0) {  // not binned: the blend gives it no gradient
        for (int j = 0; j < 12; ++j) part[j] = S(0);
        // the depths output (differentiable in the torch path) may still carry one: depth = (R mean + t)_z
        const S vd = a.v_depths ? a.v_depths[idx] : S(0);
        if (vd != S(0)) {
            const S* mean = a.means + n * 3;
            const S* row = a.viewmats + int64_t(c) * 16 + 8;
            for (int j = 0; j < 3; ++j) {
                add_to(a.v_means + n * 3 + j, row[j] * vd);
                part[6 + j] = vd * mean[j];
            }
            part[11] = vd;
        }
        return;
    }
    studio_project::Camera<S> cam;
    cam.load(a.viewmats + int64_t(c) * 16, a.Ks + int64_t(c) * 9, a.width, a.height);
    const S* mean = a.means + n * 3;
    const S* scale = a.scales + n * 3;
    const int Dt = project_out_dim(a.D, a.depth_mode);
    const S* gfo = a.v_feats + idx * Dt;
    S gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, gt[3] = {0, 0, 0}, gcen[3] = {0, 0, 0};
    S gmean[3] = {0, 0, 0}, gquat[4] = {0, 0, 0, 0}, gscale[3] = {0, 0, 0};
    if (a.depth_mode != 2) {
        const int64_t gstride = int64_t(a.Kp) * a.D;
        const int64_t coff = (a.per_cam ? idx : n) * gstride;
        const S* col = a.colors + coff;
        S* gcol = a.v_colors + coff;
        if (a.sh < 0) {
            for (int d = 0; d < a.D; ++d) {
                if (a.per_cam) gcol[d] += gfo[d];
                else add_to(gcol + d, gfo[d]);
            }
        } else {
            studio_project::ShDir<S> dir;
            S basis[16], dbasis[48];
            dir.compute(mean, cam.centre);
            studio_project::sh_basis<S>(a.sh, dir.d[0], dir.d[1], dir.d[2], basis, dbasis);
            const int K = (a.sh + 1) * (a.sh + 1);
            S gdir[3] = {0, 0, 0};
            for (int d = 0; d < a.D; ++d) {
                S v = 0;
                for (int k = 0; k < K; ++k) v += basis[k] * col[k * a.D + d];
                if (!(v + S(0.5) >= S(0))) continue;  // clamp_min(., 0) blocks the gradient
                const S gd = gfo[d];
                for (int k = 0; k < K; ++k) {
                    if (a.per_cam) gcol[k * a.D + d] += basis[k] * gd;
                    else add_to(gcol + k * a.D + d, basis[k] * gd);
                    const S gb = col[k * a.D + d] * gd;
                    gdir[0] += gb * dbasis[3 * k];
                    gdir[1] += gb * dbasis[3 * k + 1];
                    gdir[2] += gb * dbasis[3 * k + 2];
                }
            }
            S gv[3];
            dir.backward(gdir, gv);
            for (int j = 0; j < 3; ++j) {
                gmean[j] += gv[j];
                gcen[j] -= gv[j];
            }
        }
    }
    S gdepth = a.depth_mode != 0 ? gfo[Dt - 1] : S(0);
    if (a.v_depths) gdepth += a.v_depths[idx];  // the depths output (sorting, meta) when it carries a gradient
    studio_project::Projected<S> pr;
    pr.compute(cam, mean, a.quats + n * 4, scale, a.eps2d, a.near_plane, a.far_plane);
    pr.backward(cam, mean, scale, a.v_means2d + idx * 2, a.v_conics + idx * 3, gdepth, gmean, gquat, gscale, gR, gt);
    // centre = -R^T t
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            gR[i * 3 + j] -= gcen[j] * cam.t[i];
            gt[i] -= cam.R[i * 3 + j] * gcen[j];
        }
    for (int j = 0; j < 9; ++j) part[j] = gR[j];
    for (int j = 0; j < 3; ++j) part[9 + j] = gt[j];
    for (int j = 0; j < 3; ++j) add_to(a.v_means + n * 3 + j, gmean[j]);
    for (int j = 0; j < 4; ++j) add_to(a.v_quats + n * 4 + j, gquat[j]);
    for (int j = 0; j < 3; ++j) add_to(a.v_scales + n * 3 + j, gscale[j]);
    add_to(a.v_opacities + n, a.v_opac[idx]);
}

// Threads per block of cam_reduce_kernel (a power of two).
constexpr int kCamReduceThreads = 256;

// One block per (camera, component j < 12): sums cam_partial[c, :, j] over the N Gaussians in double, each
// thread a fixed strided subset, then a fixed shared-memory tree; writes v_viewmats[c] (row-major 4x4: R block
// and t column; the last row is zero). Deterministic.
template <typename S>
__global__ void cam_reduce_kernel(const S* cam_partial, int C, int N, S* v_viewmats) {
    __shared__ double sums[kCamReduceThreads];
    const int c = int(blockIdx.x) / 12, j = int(blockIdx.x) % 12;
    const int tid = int(threadIdx.x);
    double acc = 0.0;
    for (int64_t n = tid; n < N; n += kCamReduceThreads) acc += double(cam_partial[(int64_t(c) * N + n) * 12 + j]);
    sums[tid] = acc;
    __syncthreads();
    for (int s = kCamReduceThreads / 2; s > 0; s >>= 1) {
        if (tid < s) sums[tid] += sums[tid + s];
        __syncthreads();
    }
    if (tid == 0) {
        const int out = j < 9 ? (j / 3) * 4 + (j % 3) : (j - 9) * 4 + 3;
        v_viewmats[int64_t(c) * 16 + out] = S(sums[0]);
        if (j < 4) v_viewmats[int64_t(c) * 16 + 12 + j] = S(0);
    }
}

}  // namespace kernels
}  // namespace studio_cuda
