// The maths of project.h written once over a lane type L: a scalar (float / double: one (camera, Gaussian) at a
// time, the reference behaviour and the float64 path) or an 8-lane float vector (project_simd.h: 8 Gaussians of
// one camera at a time). Deliberately without an include guard: project.h includes it into namespace
// studio_project for the scalar lanes, project_simd.h into each vector build's namespace (blend_avx2 under the
// AVX2 target, blend_generic), so every build compiles it with its own instruction set.
//
// The including namespace provides, for its lane type L with mask type M = decltype(L() > L()):
//   select(M m, L a, L b)   m ? a : b per lane,
//   lmin(a, b), lmax(a, b)  std::min / std::max per lane ((b < a) ? b : a and (a < b) ? b : a),
//   lsqrt(a)                IEEE square root per lane,
//   lfinite(a)              std::isfinite per lane (a mask),
//   lceil(a)                std::ceil per lane,
// and the masks combine with &, | and !. L(x) broadcasts a constant. Branches of the scalar code are selects here:
// both sides are computed and each lane keeps the side its condition picks, so a lane gets exactly the value the
// branch would have given it (same operations, same order).

// STUDIO_HD (project.h): __host__ __device__ under nvcc, empty for plain C++ (the vector builds).
#ifndef STUDIO_HD
#define STUDIO_HD
#endif

template <typename L>
using lane_mask_t = decltype(std::declval<L>() > std::declval<L>());

// Rotation from a w-x-y-z quaternion normalised by max(|q|, 1e-12); keeps what the backward needs.
template <typename L>
struct Rot {
  using M = lane_mask_t<L>;
  L q[4], inv_norm, Rq[9];
  M clamped;
  STUDIO_HD void compute(const L* quat) {
    const L n = lsqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
    clamped = !(n > L(1e-12));
    inv_norm = L(1) / select(clamped, L(1e-12), n);
    for (int i = 0; i < 4; ++i) q[i] = quat[i] * inv_norm;
    const L w = q[0], x = q[1], y = q[2], z = q[3];
    Rq[0] = 1 - 2 * (y * y + z * z); Rq[1] = 2 * (x * y - w * z);     Rq[2] = 2 * (x * z + w * y);
    Rq[3] = 2 * (x * y + w * z);     Rq[4] = 1 - 2 * (x * x + z * z); Rq[5] = 2 * (y * z - w * x);
    Rq[6] = 2 * (x * z - w * y);     Rq[7] = 2 * (y * z + w * x);     Rq[8] = 1 - 2 * (x * x + y * y);
  }
  // d loss / d quat (raw) from d loss / d Rq.
  STUDIO_HD void backward(const L* gR, L* gquat) const {
    const L w = q[0], x = q[1], y = q[2], z = q[3];
    L g[4];
    g[0] = 2 * (-z * gR[1] + y * gR[2] + z * gR[3] - x * gR[5] - y * gR[6] + x * gR[7]);
    g[1] = 2 * (y * gR[1] + z * gR[2] + y * gR[3] - 2 * x * gR[4] - w * gR[5] + z * gR[6] + w * gR[7] -
                2 * x * gR[8]);
    g[2] = 2 * (-2 * y * gR[0] + x * gR[1] + w * gR[2] + x * gR[3] + z * gR[5] - w * gR[6] + z * gR[7] -
                2 * y * gR[8]);
    g[3] = 2 * (-2 * z * gR[0] - w * gR[1] + x * gR[2] + w * gR[3] - 2 * z * gR[4] + y * gR[5] + x * gR[6] +
                y * gR[7]);
    // clamped: the norm is the constant 1e-12, g / 1e-12; else the normalisation's Jacobian
    const L dot = q[0] * g[0] + q[1] * g[1] + q[2] * g[2] + q[3] * g[3];
    for (int i = 0; i < 4; ++i) gquat[i] += select(clamped, g[i] * inv_norm, (g[i] - q[i] * dot) * inv_norm);
  }
};

// Everything project_gaussians computes for one (camera, Gaussian) per lane, plus the intermediates of its
// backward.
template <typename L>
struct Projected {
  using M = lane_mask_t<L>;
  Rot<L> rot;
  L M_[9], Sig[9];        // M = Rq diag(s), Sig = M M^T
  L p[3];                 // camera-space centre
  M in_depth;
  L zs, rx_, ry_;         // zs: depth used for the projection; rx_/ry_: x/zs, y/zs before the clamp
  M xfree, yfree;         // the clamp is inactive (the gradient flows to x/zs, y/zs)
  L tx, ty, j00, j02, j11, j12, m0[3], m1[3], a, b, c, det, dets;
  M ok_det;
  L conic[3], mean2d[2];

  template <typename S>
  STUDIO_HD void compute(const studio_project::Camera<S>& cam, const L* mean, const L* quat, const L* scale, S eps2d, S near,
               S far) {
    rot.compute(quat);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) M_[i * 3 + j] = rot.Rq[i * 3 + j] * scale[j];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        Sig[i * 3 + j] = M_[i * 3] * M_[j * 3] + M_[i * 3 + 1] * M_[j * 3 + 1] + M_[i * 3 + 2] * M_[j * 3 + 2];
    const S* R = cam.R;
    for (int i = 0; i < 3; ++i)
      p[i] = R[i * 3] * mean[0] + R[i * 3 + 1] * mean[1] + R[i * 3 + 2] * mean[2] + cam.t[i];
    in_depth = (p[2] > L(near)) & (p[2] < L(far));
    zs = select(in_depth, p[2], L(1));
    rx_ = p[0] / zs;
    ry_ = p[1] / zs;
    const L cx_ = lmin(L(cam.limxp), lmax(L(-cam.limxn), rx_));
    const L cy_ = lmin(L(cam.limyp), lmax(L(-cam.limyn), ry_));
    xfree = (rx_ > L(-cam.limxn)) & (rx_ < L(cam.limxp));
    yfree = (ry_ > L(-cam.limyn)) & (ry_ < L(cam.limyp));
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
    L sm0[3], sm1[3];  // (m Sig)_k
    for (int k = 0; k < 3; ++k) {
      sm0[k] = m0[0] * Sig[k] + m0[1] * Sig[3 + k] + m0[2] * Sig[6 + k];
      sm1[k] = m1[0] * Sig[k] + m1[1] * Sig[3 + k] + m1[2] * Sig[6 + k];
    }
    const L cxx = sm0[0] * m0[0] + sm0[1] * m0[1] + sm0[2] * m0[2];
    const L cxy = sm0[0] * m1[0] + sm0[1] * m1[1] + sm0[2] * m1[2];
    const L cyy = sm1[0] * m1[0] + sm1[1] * m1[1] + sm1[2] * m1[2];
    a = cxx + eps2d;
    b = cxy;
    c = cyy + eps2d;
    det = a * c - b * b;
    ok_det = det > L(0);
    dets = select(ok_det, det, L(1));
    conic[0] = c / dets;
    conic[1] = -b / dets;
    conic[2] = a / dets;
    mean2d[0] = cam.fx * p[0] / zs + cam.cx;
    mean2d[1] = cam.fy * p[1] / zs + cam.cy;
  }

  // Gradients of (mean2d, conic, depth) into mean, quat, scale (accumulated) and the camera's R, t (accumulated).
  template <typename S>
  STUDIO_HD void backward(const studio_project::Camera<S>& cam, const L* mean, const L* scale, const L* gm2d, const L* gconic,
                L gdepth, L* gmean, L* gquat, L* gscale, L* gR, L* gt) const {
    const S* R = cam.R;
    L gp[3] = {L(0), L(0), gdepth};
    L gzs = L(0);
    // mean2d = (fx x / zs + cx, fy y / zs + cy)
    gp[0] += gm2d[0] * cam.fx / zs;
    gp[1] += gm2d[1] * cam.fy / zs;
    gzs -= (gm2d[0] * cam.fx * p[0] + gm2d[1] * cam.fy * p[1]) / (zs * zs);
    // conic = (c, -b, a) / dets; the determinant's term where det > 0 (dets = det there, else the constant 1)
    L ga = gconic[2] / dets, gb = -gconic[1] / dets, gc = gconic[0] / dets;
    {
      const L gd = -(gconic[0] * c - gconic[1] * b + gconic[2] * a) / (dets * dets);
      ga = select(ok_det, ga + gd * c, ga);
      gc = select(ok_det, gc + gd * a, gc);
      gb = select(ok_det, gb - L(2) * b * gd, gb);
    }
    // cov2d = Mj Sig Mj^T with rows m0, m1: cxx = m0.Sig.m0, cxy = m0.Sig.m1, cyy = m1.Sig.m1
    L gSig[9], gm0[3], gm1[3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        gSig[i * 3 + j] = ga * m0[i] * m0[j] + gb * m0[i] * m1[j] + gc * m1[i] * m1[j];
    for (int k = 0; k < 3; ++k) {
      L s0 = L(0), s1 = L(0), st0 = L(0), st1 = L(0);  // (Sig m)_k, (Sig^T m)_k
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
    L gj00 = L(0), gj02 = L(0), gj11 = L(0), gj12 = L(0);
    for (int k = 0; k < 3; ++k) {
      gj00 += gm0[k] * R[k];
      gj02 += gm0[k] * R[6 + k];
      gj11 += gm1[k] * R[3 + k];
      gj12 += gm1[k] * R[6 + k];
      gR[k] += gm0[k] * j00;
      gR[3 + k] += gm1[k] * j11;
      gR[6 + k] += gm0[k] * j02 + gm1[k] * j12;
    }
    const L z2 = zs * zs, z3 = z2 * zs;
    gzs += -gj00 * cam.fx / z2 - gj11 * cam.fy / z2 + gj02 * L(2) * cam.fx * tx / z3 +
           gj12 * L(2) * cam.fy * ty / z3;
    const L gtx = -gj02 * cam.fx / z2, gty = -gj12 * cam.fy / z2;
    // tx = zs * clamp(x / zs), ty likewise; the clamp passes the gradient where it is inactive
    gzs += gtx * (tx / zs) + gty * (ty / zs);
    {
      const L gr = gtx * zs;
      gp[0] = select(xfree, gp[0] + gr / zs, gp[0]);
      gzs = select(xfree, gzs - gr * p[0] / z2, gzs);
    }
    {
      const L gr = gty * zs;
      gp[1] = select(yfree, gp[1] + gr / zs, gp[1]);
      gzs = select(yfree, gzs - gr * p[1] / z2, gzs);
    }
    gp[2] = select(in_depth, gp[2] + gzs, gp[2]);
    // p = R mean + t
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        gR[i * 3 + j] += gp[i] * mean[j];
        gmean[j] += R[i * 3 + j] * gp[i];
      }
      gt[i] += gp[i];
    }
    // Sig = M M^T, M = Rq diag(s)
    L gM[9], gRq[9];
    for (int i = 0; i < 3; ++i)
      for (int k = 0; k < 3; ++k) {
        L s = L(0);
        for (int j = 0; j < 3; ++j) s += (gSig[i * 3 + j] + gSig[j * 3 + i]) * M_[j * 3 + k];
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
template <typename L>
STUDIO_HD inline void sh_basis(int deg, L x, L y, L z, L* out, L* grad) {
  out[0] = L(studio_project::kShC0);
  if (grad) grad[0] = grad[1] = grad[2] = L(0);
  if (deg < 1) return;
  const L c1 = L(studio_project::kShC1);
  out[1] = -c1 * y;
  out[2] = c1 * z;
  out[3] = -c1 * x;
  if (grad) {
    L* g = grad + 3;
    g[0] = L(0); g[1] = -c1; g[2] = L(0);
    g[3] = L(0); g[4] = L(0); g[5] = c1;
    g[6] = -c1; g[7] = L(0); g[8] = L(0);
  }
  if (deg < 2) return;
  const L xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
  L c2[5];
  for (int i = 0; i < 5; ++i) c2[i] = L(studio_project::kShC2(i));
  out[4] = c2[0] * xy;
  out[5] = c2[1] * yz;
  out[6] = c2[2] * (2 * zz - xx - yy);
  out[7] = c2[3] * xz;
  out[8] = c2[4] * (xx - yy);
  if (grad) {
    L* g = grad + 12;
    g[0] = c2[0] * y; g[1] = c2[0] * x; g[2] = L(0);
    g[3] = L(0); g[4] = c2[1] * z; g[5] = c2[1] * y;
    g[6] = -2 * c2[2] * x; g[7] = -2 * c2[2] * y; g[8] = 4 * c2[2] * z;
    g[9] = c2[3] * z; g[10] = L(0); g[11] = c2[3] * x;
    g[12] = 2 * c2[4] * x; g[13] = -2 * c2[4] * y; g[14] = L(0);
  }
  if (deg < 3) return;
  L c3[7];
  for (int i = 0; i < 7; ++i) c3[i] = L(studio_project::kShC3(i));
  out[9] = c3[0] * y * (3 * xx - yy);
  out[10] = c3[1] * xy * z;
  out[11] = c3[2] * y * (4 * zz - xx - yy);
  out[12] = c3[3] * z * (2 * zz - 3 * xx - 3 * yy);
  out[13] = c3[4] * x * (4 * zz - xx - yy);
  out[14] = c3[5] * z * (xx - yy);
  out[15] = c3[6] * x * (xx - 3 * yy);
  if (grad) {
    L* g = grad + 27;
    g[0] = c3[0] * 6 * xy; g[1] = c3[0] * (3 * xx - 3 * yy); g[2] = L(0);
    g[3] = c3[1] * yz; g[4] = c3[1] * xz; g[5] = c3[1] * xy;
    g[6] = c3[2] * (-2 * xy); g[7] = c3[2] * (4 * zz - xx - 3 * yy); g[8] = c3[2] * 8 * yz;
    g[9] = c3[3] * (-6 * xz); g[10] = c3[3] * (-6 * yz); g[11] = c3[3] * (6 * zz - 3 * xx - 3 * yy);
    g[12] = c3[4] * (4 * zz - 3 * xx - yy); g[13] = c3[4] * (-2 * xy); g[14] = c3[4] * 8 * xz;
    g[15] = c3[5] * 2 * xz; g[16] = c3[5] * (-2 * yz); g[17] = c3[5] * (xx - yy);
    g[18] = c3[6] * (3 * xx - 3 * yy); g[19] = c3[6] * (-6 * xy); g[20] = L(0);
  }
}

// View direction mean - centre normalised by max(|v|, 1e-12).
template <typename L>
struct ShDir {
  using M = lane_mask_t<L>;
  L v[3], d[3], inv;
  M clamped;
  template <typename S>
  STUDIO_HD void compute(const L* mean, const S* centre) {
    for (int i = 0; i < 3; ++i) v[i] = mean[i] - centre[i];
    const L n = lsqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
    clamped = !(n > L(1e-12));
    inv = L(1) / select(clamped, L(1e-12), n);
    for (int i = 0; i < 3; ++i) d[i] = v[i] * inv;
  }
  STUDIO_HD void backward(const L* gd, L* gv) const {
    const L dot = d[0] * gd[0] + d[1] * gd[1] + d[2] * gd[2];
    for (int i = 0; i < 3; ++i) gv[i] = select(clamped, gd[i] * inv, (gd[i] - d[i] * dot) * inv);
  }
};

// Half extents of the pixel box of the ellipse sigma <= thr of the conic (a, b, c) centred at (mx, my), in the
// precision of L (float64 in the fused path, see gaussian_extent in rasterize.cpp): sqrt(2 thr Sigma_xx) + 1 and
// sqrt(2 thr Sigma_yy) + 1 with Sigma = conic^-1; NaN where anything is degenerate (thr < 0 or not finite,
// det <= 0, a <= 0, a non-finite extent or centre).
template <typename L>
inline void ellipse_extent(L thr, L a, L b, L c, L mx, L my, L& ex, L& ey) {
  const L det = a * c - b * b;
  const L x = lsqrt(L(2) * thr * c / det) + L(1), y = lsqrt(L(2) * thr * a / det) + L(1);
  const auto ok = !(thr < L(0)) & (det > L(0)) & (a > L(0)) & lfinite(thr) & lfinite(x) & lfinite(y) & lfinite(mx) &
                  lfinite(my);
  const L nan = L(std::numeric_limits<double>::quiet_NaN());
  ex = select(ok, x, nan);
  ey = select(ok, y, nan);
}

// Opacity-aware radii as project_gaussians computes them under no_grad, per lane: returns the lanes that keep them
// (the others are culled: radii 0) and (rx, ry) = ceil(sqrt(k max(a, 0)) + 1), ceil(sqrt(k max(c, 0)) + 1) clamped to
// 4 max(W, H) + 16, from the depth and determinant tests, the 2D covariance diagonal (a, c), the projected centre,
// the opacity o and its term k = radius_log_term(o) (project.h).
template <typename L>
STUDIO_HD inline lane_mask_t<L> radii_lanes(lane_mask_t<L> in_depth, lane_mask_t<L> ok_det, L a, L c, L mx, L my, L o, L k,
                                  int W, int H, L& rx_out, L& ry_out) {
  const auto visible = o >= L(1.0 / 255.0);
  const L rx = lceil(lsqrt(k * lmax(a, L(0))) + L(1));
  const L ry = lceil(lsqrt(k * lmax(c, L(0))) + L(1));
  const auto on = (mx + rx > L(0)) & (mx - rx < L(W)) & (my + ry > L(0)) & (my - ry < L(H));
  const L big = L(4 * (W < H ? H : W) + 16);  // std::max(W, H)
  rx_out = lmin(rx, big);
  ry_out = lmin(ry, big);
  return in_depth & ok_det & visible & on & lfinite(rx) & lfinite(ry);
}
