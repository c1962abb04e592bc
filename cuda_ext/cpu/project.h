// Projection of 3D Gaussians and their spherical-harmonics colour, forward and analytic backward, for the
// fused native path (rasterize.cpp: render_forward / render_backward).
//
// The maths is studio/render/_common.py's project_gaussians, covariance_3d, quat_to_rotmat, camera_centers and
// eval_sh, written per (camera, Gaussian) in scalar_t: the same formulas in the same precision, so the fused
// path agrees with the torch one to float rounding. The backward recomputes the forward intermediates (cheap)
// instead of storing them. Gradient conventions follow torch's: where() sends the gradient to the chosen
// branch only, minimum/maximum to the selected argument, clamp_min(x, 0) passes it where x >= 0, and the
// radii (computed under no_grad) carry none. Ks get no gradient.
//
// The maths (Rot, Projected, sh_basis, ShDir) lives in project_math.h, written over a lane type: here it is
// instantiated for scalars (float, double), and project_simd.h instantiates the same source for 8 float lanes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

// Device use (cuda_ext/cuda/project_kernels.cuh): under nvcc every function here and in project_math.h is
// __host__ __device__ (STUDIO_HD) and the scalar lanes call the CUDA maths functions; for plain C++ STUDIO_HD is
// empty and the scalar lanes are the std:: functions, so the CPU builds are unchanged.
#ifndef STUDIO_HD
#if defined(__CUDACC__)
#define STUDIO_HD __host__ __device__
#else
#define STUDIO_HD
#endif
#endif

namespace studio_project {

constexpr double kShC0 = 0.28209479177387814;
constexpr double kShC1 = 0.4886025119029199;
// The degree-2 and -3 coefficients as functions (a namespace-scope array is not usable in device code).
STUDIO_HD constexpr double kShC2(int i) {
  constexpr double c[5] = {1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
                           0.5462742152960396};
  return c[i];
}
STUDIO_HD constexpr double kShC3(int i) {
  constexpr double c[7] = {-0.5900435899266435, 2.890611442640554,  -0.4570457994644658, 0.3731763325901154,
                           -0.4570457994644658, 1.445305721320277, -0.5900435899266435};
  return c[i];
}

// One camera: world-to-camera rotation R (row-major) and translation t, pinhole intrinsics, the Jacobian clamp
// limits of project_gaussians and the camera centre -R^T t.
template <typename S>
struct Camera {
  S R[9], t[3], fx, fy, cx, cy, limxp, limxn, limyp, limyn, centre[3];

  STUDIO_HD void load(const S* viewmat, const S* K, int W, int H) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) R[i * 3 + j] = viewmat[i * 4 + j];
      t[i] = viewmat[i * 4 + 3];
    }
    fx = K[0];
    fy = K[4];
    cx = K[2];
    cy = K[5];
    const S tanx = S(0.5) * S(W) / fx, tany = S(0.5) * S(H) / fy;
    limxp = (S(W) - cx) / fx + S(0.3) * tanx;
    limxn = cx / fx + S(0.3) * tanx;
    limyp = (S(H) - cy) / fy + S(0.3) * tany;
    limyn = cy / fy + S(0.3) * tany;
    for (int j = 0; j < 3; ++j) centre[j] = -(R[0 * 3 + j] * t[0] + R[1 * 3 + j] * t[1] + R[2 * 3 + j] * t[2]);
  }
};

// Scalar lanes for project_math.h: one (camera, Gaussian) at a time. lmin / lmax are std::min / std::max
// written out ((b < a) ? b : a, (a < b) ? b : a: the same results, usable in device code).
template <typename S>
STUDIO_HD inline S select(bool m, S a, S b) {
  return m ? a : b;
}
template <typename S>
STUDIO_HD inline S lmin(S a, S b) {
  return (b < a) ? b : a;
}
template <typename S>
STUDIO_HD inline S lmax(S a, S b) {
  return (a < b) ? b : a;
}
#if defined(__CUDA_ARCH__)
__device__ inline float lsqrt(float x) { return ::sqrtf(x); }
__device__ inline double lsqrt(double x) { return ::sqrt(x); }
__device__ inline float lceil(float x) { return ::ceilf(x); }
__device__ inline double lceil(double x) { return ::ceil(x); }
__device__ inline bool lfinite(float x) { return ::isfinite(x); }
__device__ inline bool lfinite(double x) { return ::isfinite(x); }
__device__ inline float llog(float x) { return ::logf(x); }
__device__ inline double llog(double x) { return ::log(x); }
#else
inline float lsqrt(float x) { return std::sqrt(x); }
inline double lsqrt(double x) { return std::sqrt(x); }
inline float lceil(float x) { return std::ceil(x); }
inline double lceil(double x) { return std::ceil(x); }
inline bool lfinite(float x) { return std::isfinite(x); }
inline bool lfinite(double x) { return std::isfinite(x); }
inline float llog(float x) { return std::log(x); }
inline double llog(double x) { return std::log(x); }
#endif

#include "project_math.h"

// The opacity term of the radii, 2 ln(max(o / (1/255), 1)) (radii_lanes' k): one log per Gaussian.
template <typename S>
STUDIO_HD inline S radius_log_term(S o) {
  return S(2) * llog(lmax(o / S(1.0 / 255.0), S(1)));
}

// Opacity-aware integer radii (0 = culled), as project_gaussians computes them under no_grad, from one lane of
// a projection (radii_lanes): the depth and determinant tests, the 2D covariance diagonal (a, c) and the projected
// centre.
template <typename S>
STUDIO_HD inline void radii_of(bool in_depth, bool ok_det, S a, S c, S mx, S my, S o, int W, int H, int32_t* out) {
  S rx, ry;
  const bool keep = radii_lanes<S>(in_depth, ok_det, a, c, mx, my, o, radius_log_term(o), W, H, rx, ry);
  out[0] = keep ? static_cast<int32_t>(rx) : 0;
  out[1] = keep ? static_cast<int32_t>(ry) : 0;
}

}  // namespace studio_project
