// Projection of 3D Gaussians and their spherical-harmonics colour, forward and analytic backward, for the
// fused native path (rasterize.cpp: render_forward / render_backward).
//
// The maths is studio/render/_common.py's project_gaussians, covariance_3d, quat_to_rotmat, camera_centers and
// eval_sh, written per (camera, Gaussian) in scalar_t: the same formulas in the same precision, so the fused
// path agrees with the torch one to float rounding. The backward recomputes the forward intermediates (cheap)
// instead of storing them. Gradient conventions follow torch's: where() sends the gradient to the chosen
// branch only, minimum/maximum to the selected argument, clamp_min(x, 0) passes it where x >= 0, and the
// radii (computed under no_grad) carry none. Ks get no gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace studio_project {

constexpr double kShC0 = 0.28209479177387814;
constexpr double kShC1 = 0.4886025119029199;
constexpr double kShC2[5] = {1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
                             0.5462742152960396};
constexpr double kShC3[7] = {-0.5900435899266435, 2.890611442640554,  -0.4570457994644658, 0.3731763325901154,
                             -0.4570457994644658, 1.445305721320277, -0.5900435899266435};

// One camera: world-to-camera rotation R (row-major) and translation t, pinhole intrinsics, the Jacobian clamp
// limits of project_gaussians and the camera centre -R^T t.
template <typename S>
struct Camera {
  S R[9], t[3], fx, fy, cx, cy, limxp, limxn, limyp, limyn, centre[3];

  void load(const S* viewmat, const S* K, int W, int H) {
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

// Rotation from a w-x-y-z quaternion normalised by max(|q|, 1e-12); keeps what the backward needs.
template <typename S>
struct Rot {
  S q[4], inv_norm, Rq[9];
  bool clamped;
  void compute(const S* quat) {
    const S n = std::sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
    clamped = !(n > S(1e-12));
    inv_norm = S(1) / (clamped ? S(1e-12) : n);
    for (int i = 0; i < 4; ++i) q[i] = quat[i] * inv_norm;
    const S w = q[0], x = q[1], y = q[2], z = q[3];
    Rq[0] = 1 - 2 * (y * y + z * z); Rq[1] = 2 * (x * y - w * z);     Rq[2] = 2 * (x * z + w * y);
    Rq[3] = 2 * (x * y + w * z);     Rq[4] = 1 - 2 * (x * x + z * z); Rq[5] = 2 * (y * z - w * x);
    Rq[6] = 2 * (x * z - w * y);     Rq[7] = 2 * (y * z + w * x);     Rq[8] = 1 - 2 * (x * x + y * y);
  }
  // d loss / d quat (raw) from d loss / d Rq.
  void backward(const S* gR, S* gquat) const {
    const S w = q[0], x = q[1], y = q[2], z = q[3];
    S g[4];
    g[0] = 2 * (-z * gR[1] + y * gR[2] + z * gR[3] - x * gR[5] - y * gR[6] + x * gR[7]);
    g[1] = 2 * (y * gR[1] + z * gR[2] + y * gR[3] - 2 * x * gR[4] - w * gR[5] + z * gR[6] + w * gR[7] -
                2 * x * gR[8]);
    g[2] = 2 * (-2 * y * gR[0] + x * gR[1] + w * gR[2] + x * gR[3] + z * gR[5] - w * gR[6] + z * gR[7] -
                2 * y * gR[8]);
    g[3] = 2 * (-2 * z * gR[0] - w * gR[1] + x * gR[2] + w * gR[3] - 2 * z * gR[4] + y * gR[5] + x * gR[6] +
                y * gR[7]);
    if (clamped) {
      for (int i = 0; i < 4; ++i) gquat[i] += g[i] * inv_norm;
      return;
    }
    const S dot = q[0] * g[0] + q[1] * g[1] + q[2] * g[2] + q[3] * g[3];
    for (int i = 0; i < 4; ++i) gquat[i] += (g[i] - q[i] * dot) * inv_norm;
  }
};

// Everything project_gaussians computes for one (camera, Gaussian), plus the intermediates of its backward.
template <typename S>
struct Projected {
  Rot<S> rot;
  S M[9], Sig[9];         // M = Rq diag(s), Sig = M M^T
  S p[3];                 // camera-space centre
  bool in_depth;
  S zs, rx_, ry_;         // zs: depth used for the projection; rx_/ry_: x/zs, y/zs before the clamp
  bool xfree, yfree;      // the clamp is inactive (the gradient flows to x/zs, y/zs)
  S tx, ty, j00, j02, j11, j12, m0[3], m1[3], a, b, c, det, dets;
  bool ok_det;
  S conic[3], mean2d[2];

  void compute(const Camera<S>& cam, const S* mean, const S* quat, const S* scale, S eps2d, S near, S far) {
    rot.compute(quat);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) M[i * 3 + j] = rot.Rq[i * 3 + j] * scale[j];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) Sig[i * 3 + j] = M[i * 3] * M[j * 3] + M[i * 3 + 1] * M[j * 3 + 1] + M[i * 3 + 2] * M[j * 3 + 2];
    const S* R = cam.R;
    for (int i = 0; i < 3; ++i) p[i] = R[i * 3] * mean[0] + R[i * 3 + 1] * mean[1] + R[i * 3 + 2] * mean[2] + cam.t[i];
    in_depth = p[2] > near && p[2] < far;
    zs = in_depth ? p[2] : S(1);
    rx_ = p[0] / zs;
    ry_ = p[1] / zs;
    const S cx_ = std::min(cam.limxp, std::max(-cam.limxn, rx_));
    const S cy_ = std::min(cam.limyp, std::max(-cam.limyn, ry_));
    xfree = rx_ > -cam.limxn && rx_ < cam.limxp;
    yfree = ry_ > -cam.limyn && ry_ < cam.limyp;
    tx = zs * cx_;
    ty = zs * cy_;
    j00 = cam.fx / zs;
    j02 = -cam.fx * tx / (zs * zs);
    j11 = cam.fy / zs;
    j12 = -cam.fy * ty / (zs * zs);
    for (int k = 0; k < 3; ++k) {
      m0[k] = j00 * R[k] + j02 * R[6 + k];
      m1[k] = j11 * R[3 + k] + j12 * R[6 + k];
    }
    S sm0[3], sm1[3];  // (m Sig)_k
    for (int k = 0; k < 3; ++k) {
      sm0[k] = m0[0] * Sig[k] + m0[1] * Sig[3 + k] + m0[2] * Sig[6 + k];
      sm1[k] = m1[0] * Sig[k] + m1[1] * Sig[3 + k] + m1[2] * Sig[6 + k];
    }
    const S cxx = sm0[0] * m0[0] + sm0[1] * m0[1] + sm0[2] * m0[2];
    const S cxy = sm0[0] * m1[0] + sm0[1] * m1[1] + sm0[2] * m1[2];
    const S cyy = sm1[0] * m1[0] + sm1[1] * m1[1] + sm1[2] * m1[2];
    a = cxx + eps2d;
    b = cxy;
    c = cyy + eps2d;
    det = a * c - b * b;
    ok_det = det > S(0);
    dets = ok_det ? det : S(1);
    conic[0] = c / dets;
    conic[1] = -b / dets;
    conic[2] = a / dets;
    mean2d[0] = cam.fx * p[0] / zs + cam.cx;
    mean2d[1] = cam.fy * p[1] / zs + cam.cy;
  }

  // Opacity-aware integer radii (0 = culled), as project_gaussians computes them under no_grad.
  void radii(S o, int W, int H, int32_t* out) const {
    out[0] = out[1] = 0;
    const bool visible = o >= S(1.0 / 255.0);
    const S k = S(2) * std::log(std::max(o / S(1.0 / 255.0), S(1)));
    const S rx = std::ceil(std::sqrt(k * std::max(a, S(0))) + S(1));
    const S ry = std::ceil(std::sqrt(k * std::max(c, S(0))) + S(1));
    const bool on = (mean2d[0] + rx > S(0)) && (mean2d[0] - rx < S(W)) && (mean2d[1] + ry > S(0)) &&
                    (mean2d[1] - ry < S(H));
    if (!(in_depth && ok_det && visible && on && std::isfinite(rx) && std::isfinite(ry))) return;
    const S big = S(4 * std::max(W, H) + 16);
    out[0] = static_cast<int32_t>(std::min(rx, big));
    out[1] = static_cast<int32_t>(std::min(ry, big));
  }

  // Gradients of (mean2d, conic, depth) into mean, quat, scale (accumulated) and the camera's R, t (accumulated).
  void backward(const Camera<S>& cam, const S* mean, const S* scale, const S* gm2d, const S* gconic, S gdepth,
                S* gmean, S* gquat, S* gscale, S* gR, S* gt) const {
    const S* R = cam.R;
    S gp[3] = {0, 0, gdepth};
    S gzs = 0;
    // mean2d = (fx x / zs + cx, fy y / zs + cy)
    gp[0] += gm2d[0] * cam.fx / zs;
    gp[1] += gm2d[1] * cam.fy / zs;
    gzs -= (gm2d[0] * cam.fx * p[0] + gm2d[1] * cam.fy * p[1]) / (zs * zs);
    // conic = (c, -b, a) / dets
    S ga = gconic[2] / dets, gb = -gconic[1] / dets, gc = gconic[0] / dets;
    if (ok_det) {
      const S gd = -(gconic[0] * c - gconic[1] * b + gconic[2] * a) / (dets * dets);
      ga += gd * c;
      gc += gd * a;
      gb -= S(2) * b * gd;
    }
    // cov2d = Mj Sig Mj^T with rows m0, m1: cxx = m0.Sig.m0, cxy = m0.Sig.m1, cyy = m1.Sig.m1
    S gSig[9], gm0[3], gm1[3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        gSig[i * 3 + j] = ga * m0[i] * m0[j] + gb * m0[i] * m1[j] + gc * m1[i] * m1[j];
    for (int k = 0; k < 3; ++k) {
      S s0 = 0, s1 = 0, st0 = 0, st1 = 0;  // (Sig m)_k, (Sig^T m)_k
      for (int j = 0; j < 3; ++j) {
        s0 += Sig[k * 3 + j] * m0[j];
        st0 += Sig[j * 3 + k] * m0[j];
        s1 += Sig[k * 3 + j] * m1[j];
        st1 += Sig[j * 3 + k] * m1[j];
      }
      gm0[k] = ga * (s0 + st0) + gb * s1;
      gm1[k] = gc * (s1 + st1) + gb * st0;
    }
    // m0 = j00 R0 + j02 R2, m1 = j11 R1 + j12 R2
    S gj00 = 0, gj02 = 0, gj11 = 0, gj12 = 0;
    for (int k = 0; k < 3; ++k) {
      gj00 += gm0[k] * R[k];
      gj02 += gm0[k] * R[6 + k];
      gj11 += gm1[k] * R[3 + k];
      gj12 += gm1[k] * R[6 + k];
      gR[k] += gm0[k] * j00;
      gR[3 + k] += gm1[k] * j11;
      gR[6 + k] += gm0[k] * j02 + gm1[k] * j12;
    }
    const S z2 = zs * zs, z3 = z2 * zs;
    gzs += -gj00 * cam.fx / z2 - gj11 * cam.fy / z2 + gj02 * S(2) * cam.fx * tx / z3 + gj12 * S(2) * cam.fy * ty / z3;
    const S gtx = -gj02 * cam.fx / z2, gty = -gj12 * cam.fy / z2;
    // tx = zs * clamp(x / zs), ty likewise
    gzs += gtx * (tx / zs) + gty * (ty / zs);
    if (xfree) {
      const S gr = gtx * zs;
      gp[0] += gr / zs;
      gzs -= gr * p[0] / z2;
    }
    if (yfree) {
      const S gr = gty * zs;
      gp[1] += gr / zs;
      gzs -= gr * p[1] / z2;
    }
    if (in_depth) gp[2] += gzs;
    // p = R mean + t
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        gR[i * 3 + j] += gp[i] * mean[j];
        gmean[j] += R[i * 3 + j] * gp[i];
      }
      gt[i] += gp[i];
    }
    // Sig = M M^T, M = Rq diag(s)
    S gM[9], gRq[9];
    for (int i = 0; i < 3; ++i)
      for (int k = 0; k < 3; ++k) {
        S s = 0;
        for (int j = 0; j < 3; ++j) s += (gSig[i * 3 + j] + gSig[j * 3 + i]) * M[j * 3 + k];
        gM[i * 3 + k] = s;
      }
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        gRq[i * 3 + j] = gM[i * 3 + j] * scale[j];
        gscale[j] += gM[i * 3 + j] * rot.Rq[i * 3 + j];
      }
    rot.backward(gRq, gquat);
  }
};

// Real SH basis of degree deg at the unit direction (x, y, z): out[K], and when grad != nullptr the
// derivatives d basis_k / d(x, y, z) in grad[3 * k ..].
template <typename S>
inline void sh_basis(int deg, S x, S y, S z, S* out, S* grad) {
  out[0] = S(kShC0);
  if (grad) grad[0] = grad[1] = grad[2] = 0;
  if (deg < 1) return;
  const S c1 = S(kShC1);
  out[1] = -c1 * y;
  out[2] = c1 * z;
  out[3] = -c1 * x;
  if (grad) {
    S* g = grad + 3;
    g[0] = 0; g[1] = -c1; g[2] = 0;
    g[3] = 0; g[4] = 0; g[5] = c1;
    g[6] = -c1; g[7] = 0; g[8] = 0;
  }
  if (deg < 2) return;
  const S xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
  S c2[5];
  for (int i = 0; i < 5; ++i) c2[i] = S(kShC2[i]);
  out[4] = c2[0] * xy;
  out[5] = c2[1] * yz;
  out[6] = c2[2] * (2 * zz - xx - yy);
  out[7] = c2[3] * xz;
  out[8] = c2[4] * (xx - yy);
  if (grad) {
    S* g = grad + 12;
    g[0] = c2[0] * y; g[1] = c2[0] * x; g[2] = 0;
    g[3] = 0; g[4] = c2[1] * z; g[5] = c2[1] * y;
    g[6] = -2 * c2[2] * x; g[7] = -2 * c2[2] * y; g[8] = 4 * c2[2] * z;
    g[9] = c2[3] * z; g[10] = 0; g[11] = c2[3] * x;
    g[12] = 2 * c2[4] * x; g[13] = -2 * c2[4] * y; g[14] = 0;
  }
  if (deg < 3) return;
  S c3[7];
  for (int i = 0; i < 7; ++i) c3[i] = S(kShC3[i]);
  out[9] = c3[0] * y * (3 * xx - yy);
  out[10] = c3[1] * xy * z;
  out[11] = c3[2] * y * (4 * zz - xx - yy);
  out[12] = c3[3] * z * (2 * zz - 3 * xx - 3 * yy);
  out[13] = c3[4] * x * (4 * zz - xx - yy);
  out[14] = c3[5] * z * (xx - yy);
  out[15] = c3[6] * x * (xx - 3 * yy);
  if (grad) {
    S* g = grad + 27;
    g[0] = c3[0] * 6 * xy; g[1] = c3[0] * (3 * xx - 3 * yy); g[2] = 0;
    g[3] = c3[1] * yz; g[4] = c3[1] * xz; g[5] = c3[1] * xy;
    g[6] = c3[2] * (-2 * xy); g[7] = c3[2] * (4 * zz - xx - 3 * yy); g[8] = c3[2] * 8 * yz;
    g[9] = c3[3] * (-6 * xz); g[10] = c3[3] * (-6 * yz); g[11] = c3[3] * (6 * zz - 3 * xx - 3 * yy);
    g[12] = c3[4] * (4 * zz - 3 * xx - yy); g[13] = c3[4] * (-2 * xy); g[14] = c3[4] * 8 * xz;
    g[15] = c3[5] * 2 * xz; g[16] = c3[5] * (-2 * yz); g[17] = c3[5] * (xx - yy);
    g[18] = c3[6] * (3 * xx - 3 * yy); g[19] = c3[6] * (-6 * xy); g[20] = 0;
  }
}

// View direction mean - centre normalised by max(|v|, 1e-12).
template <typename S>
struct ShDir {
  S v[3], d[3], inv;
  bool clamped;
  void compute(const S* mean, const S* centre) {
    for (int i = 0; i < 3; ++i) v[i] = mean[i] - centre[i];
    const S n = std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
    clamped = !(n > S(1e-12));
    inv = S(1) / (clamped ? S(1e-12) : n);
    for (int i = 0; i < 3; ++i) d[i] = v[i] * inv;
  }
  void backward(const S* gd, S* gv) const {
    if (clamped) {
      for (int i = 0; i < 3; ++i) gv[i] = gd[i] * inv;
      return;
    }
    const S dot = d[0] * gd[0] + d[1] * gd[1] + d[2] * gd[2];
    for (int i = 0; i < 3; ++i) gv[i] = (gd[i] - d[i] * dot) * inv;
  }
};

}  // namespace studio_project
