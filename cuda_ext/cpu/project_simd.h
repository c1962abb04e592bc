// Projection + SH of the fused native path, float32, 8 Gaussians of one camera at a time: project_math.h's maths
// instantiated over 8 float lanes. Included by rasterize.cpp into each vector build's namespace (blend_avx2 under
// `#pragma GCC target("avx2,fma")`, blend_generic), after blend_simd.h (vf8 / vi8 / vsplat) and after FusedDims;
// deliberately without an include guard.
//
// project_forward_chunk / project_backward_chunk do, for the Gaussians [lo, hi) of one chunk, what the scalar
// loops of render_forward / render_backward do, with the same per-(camera, Gaussian) formulas (see
// project_math.h): the 8 Gaussians' inputs are gathered into lanes (transposed loads; the lanes past the chunk's
// end repeat its last Gaussian and are never stored), computed, and scattered back. gaussian_extent's half
// extents run in float64 lanes (ellipse_extent over D4); the two logs of the opacity (the radii's and the
// extent's threshold, once per Gaussian) and the copies run per lane with the scalar code. In the backward, the
// lanes of Gaussians that were not binned keep their accumulators unchanged (as the scalar `continue`), and the
// camera gradients are added to the chunk's double partial sums lane by lane, in Gaussian order: the same sums
// in the same order as the scalar loop, so the result does not depend on the thread count.

struct M8;
struct V8 {
  vf8 v;
  V8() = default;
  V8(float x) : v(vsplat(x)) {}
  V8(double x) : v(vsplat(static_cast<float>(x))) {}
  V8(int x) : v(vsplat(static_cast<float>(x))) {}
  explicit V8(vf8 x) : v(x) {}
  friend V8 operator+(V8 a, V8 b) { return V8(a.v + b.v); }
  friend V8 operator-(V8 a, V8 b) { return V8(a.v - b.v); }
  friend V8 operator*(V8 a, V8 b) { return V8(a.v * b.v); }
  friend V8 operator/(V8 a, V8 b) { return V8(a.v / b.v); }
  friend V8 operator-(V8 a) { return V8(-a.v); }
  V8& operator+=(V8 b) {
    v += b.v;
    return *this;
  }
  V8& operator-=(V8 b) {
    v -= b.v;
    return *this;
  }
  friend M8 operator<(V8 a, V8 b);
  friend M8 operator>(V8 a, V8 b);
  friend M8 operator<=(V8 a, V8 b);
  friend M8 operator>=(V8 a, V8 b);
};
struct M8 {
  vi8 m;
  friend M8 operator&(M8 a, M8 b) { return M8{a.m & b.m}; }
  friend M8 operator|(M8 a, M8 b) { return M8{a.m | b.m}; }
  friend M8 operator!(M8 a) { return M8{~a.m}; }
};
inline M8 operator<(V8 a, V8 b) { return M8{a.v < b.v}; }
inline M8 operator>(V8 a, V8 b) { return M8{a.v > b.v}; }
inline M8 operator<=(V8 a, V8 b) { return M8{a.v <= b.v}; }
inline M8 operator>=(V8 a, V8 b) { return M8{a.v >= b.v}; }
inline V8 select(M8 m, V8 a, V8 b) { return V8(m.m ? a.v : b.v); }
inline V8 lmin(V8 a, V8 b) { return select(b < a, b, a); }
inline V8 lmax(V8 a, V8 b) { return select(a < b, b, a); }
inline V8 lsqrt(V8 a) {
#if defined(STUDIO_BLEND_AVX2)
  return V8(__builtin_ia32_sqrtps256(a.v));
#elif defined(__SSE__)
  const vf4 lo = __builtin_shufflevector(a.v, a.v, 0, 1, 2, 3), hi = __builtin_shufflevector(a.v, a.v, 4, 5, 6, 7);
  return V8(__builtin_shufflevector(__builtin_ia32_sqrtps(lo), __builtin_ia32_sqrtps(hi), 0, 1, 2, 3, 4, 5, 6, 7));
#else
  vf8 r;
  for (int j = 0; j < kLanes; ++j) r[j] = std::sqrt(a.v[j]);
  return V8(r);
#endif
}

// 4 float64 lanes (ellipse_extent, in float64 as gaussian_extent), the same operators.
struct MD4;
struct D4 {
  vd4 v;
  D4() = default;
  D4(double x) : v(vd4{x, x, x, x}) {}
  D4(int x) : D4(static_cast<double>(x)) {}
  explicit D4(vd4 x) : v(x) {}
  friend D4 operator+(D4 a, D4 b) { return D4(a.v + b.v); }
  friend D4 operator-(D4 a, D4 b) { return D4(a.v - b.v); }
  friend D4 operator*(D4 a, D4 b) { return D4(a.v * b.v); }
  friend D4 operator/(D4 a, D4 b) { return D4(a.v / b.v); }
  friend MD4 operator<(D4 a, D4 b);
  friend MD4 operator>(D4 a, D4 b);
};
struct MD4 {
  vl4 m;
  friend MD4 operator&(MD4 a, MD4 b) { return MD4{a.m & b.m}; }
  friend MD4 operator!(MD4 a) { return MD4{~a.m}; }
};
inline MD4 operator<(D4 a, D4 b) { return MD4{a.v < b.v}; }
inline MD4 operator>(D4 a, D4 b) { return MD4{a.v > b.v}; }
inline D4 select(MD4 m, D4 a, D4 b) { return D4(m.m ? a.v : b.v); }
inline MD4 lfinite(D4 a) { return MD4{(a.v - a.v) == vd4{0, 0, 0, 0}}; }  // NaN and +-Inf give NaN
inline D4 lsqrt(D4 a) {
#if defined(STUDIO_BLEND_AVX2)
  return D4(__builtin_ia32_sqrtpd256(a.v));
#else
  vd4 r;
  for (int j = 0; j < 4; ++j) r[j] = std::sqrt(a.v[j]);
  return D4(r);
#endif
}
inline M8 lfinite(V8 a) { return M8{(a.v - a.v) == vsplat(0.0f)}; }  // NaN and +-Inf give NaN
inline V8 lceil(V8 a) {
#if defined(STUDIO_BLEND_AVX2)
  return V8(__builtin_ia32_roundps256(a.v, 0x0A));  // _MM_FROUND_CEIL | _MM_FROUND_NO_EXC
#else
  vf8 r;
  for (int j = 0; j < kLanes; ++j) r[j] = std::ceil(a.v[j]);
  return V8(r);
#endif
}

#include "project_math.h"

// Transposed load: out[k] lane j = base[j * stride + k * step] for k < cnt, j < nv; lanes j >= nv repeat lane nv-1.
inline void gather_lanes(const float* base, int64_t stride, int64_t step, int cnt, int nv, V8* out) {
  alignas(32) float buf[16][kLanes];
  for (int j = 0; j < kLanes; ++j) {
    const float* src = base + (j < nv ? j : nv - 1) * stride;
    for (int k = 0; k < cnt; ++k) buf[k][j] = src[k * step];
  }
  for (int k = 0; k < cnt; ++k) out[k] = V8(vload<vf8>(buf[k]));
}
inline void lanes_of(V8 x, float* out) { vstore(out, x.v); }
inline void lanes_of(M8 x, int32_t* out) { vstore(out, x.m); }

// Forward: means2d, conics, depths, opacities, radii, extents and features of Gaussians [lo, hi) for every camera
// (the loop body of render_forward's scalar path; the same outputs).
inline void project_forward_chunk(const studio_project::Camera<float>* cams, const FusedDims& f, int64_t lo,
                                  int64_t hi, const float* mp, const float* qp, const float* sp, const float* op,
                                  const float* cp, float eps2d, float near, float far, int W, int H, float* m2,
                                  float* cn, float* dp, float* fp, float* oc, int32_t* rp, double* ep) {
  const int64_t C = f.C, N = f.N, Dt = f.Dt;
  for (int64_t n0 = lo; n0 < hi; n0 += kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(kLanes, hi - n0));
    V8 mean[3], quat[4], scale[3];
    gather_lanes(mp + n0 * 3, 3, 1, 3, nv, mean);
    gather_lanes(qp + n0 * 4, 4, 1, 4, nv, quat);
    gather_lanes(sp + n0 * 3, 3, 1, 3, nv, scale);
    alignas(32) double thr[kLanes];  // gaussian_extent's reject threshold (per Gaussian)
    alignas(32) float rk[kLanes];    // the radii's opacity term (per Gaussian)
    V8 ov;
    gather_lanes(op + n0, 1, 1, 1, nv, &ov);
    for (int j = 0; j < kLanes; ++j) {
      const float o = op[n0 + (j < nv ? j : nv - 1)];
      thr[j] = extent_threshold(o);
      rk[j] = studio_project::radius_log_term(o);
    }
    const V8 kv(vload<vf8>(rk));
    for (int64_t c = 0; c < C; ++c) {
      const auto& cam = cams[c];
      Projected<V8> pr;
      pr.compute(cam, mean, quat, scale, eps2d, near, far);
      alignas(32) float mx[kLanes], my[kLanes], c0[kLanes], c1[kLanes], c2[kLanes], pz[kLanes];
      alignas(32) int32_t rx[kLanes], ry[kLanes];
      lanes_of(pr.mean2d[0], mx);
      lanes_of(pr.mean2d[1], my);
      lanes_of(pr.conic[0], c0);
      lanes_of(pr.conic[1], c1);
      lanes_of(pr.conic[2], c2);
      lanes_of(pr.p[2], pz);
      {
        V8 rxv, ryv;
        const M8 keep = radii_lanes<V8>(pr.in_depth, pr.ok_det, pr.a, pr.c, pr.mean2d[0], pr.mean2d[1], ov, kv, W, H,
                                        rxv, ryv);
        // kept radii are finite and in [1, 4 max(W, H) + 16]: the truncation is static_cast<int32_t>'s
        vstore(rx, __builtin_convertvector(select(keep, rxv, V8(0)).v, vi8));
        vstore(ry, __builtin_convertvector(select(keep, ryv, V8(0)).v, vi8));
      }
      alignas(32) double ex[kLanes], ey[kLanes];  // gaussian_extent's half extents, in float64, 4 lanes at a time
      for (int h = 0; h < 2; ++h) {
        const auto half = [h](const V8& x) { return D4(h == 0 ? lo_d(x.v) : hi_d(x.v)); };
        D4 hx, hy;
        ellipse_extent<D4>(D4(vload<vd4>(thr + 4 * h)), half(pr.conic[0]), half(pr.conic[1]), half(pr.conic[2]),
                           half(pr.mean2d[0]), half(pr.mean2d[1]), hx, hy);
        vstore(ex + 4 * h, hx.v);
        vstore(ey + 4 * h, hy.v);
      }
      for (int j = 0; j < nv; ++j) {
        const int64_t n = n0 + j, g = c * N + n;
        m2[g * 2] = mx[j];
        m2[g * 2 + 1] = my[j];
        cn[g * 3] = c0[j];
        cn[g * 3 + 1] = c1[j];
        cn[g * 3 + 2] = c2[j];
        dp[g] = pz[j];
        oc[g] = op[n];
        rp[g * 2] = rx[j];
        rp[g * 2 + 1] = ry[j];
        ep[g * 3] = thr[j];
        ep[g * 3 + 1] = ex[j];
        ep[g * 3 + 2] = ey[j];
        if (f.depth_mode != 0) fp[g * Dt + Dt - 1] = pz[j];
      }
      if (f.depth_mode == 2) continue;
      const float* col = cp + c * f.col_cam_stride + n0 * f.col_g_stride;
      if (f.sh < 0) {
        for (int j = 0; j < nv; ++j)
          for (int64_t d = 0; d < f.D; ++d) fp[(c * N + n0 + j) * Dt + d] = col[j * f.col_g_stride + d];
        continue;
      }
      ShDir<V8> dir;
      dir.compute(mean, cam.centre);
      V8 basis[16], coef[16];
      sh_basis<V8>(f.sh, dir.d[0], dir.d[1], dir.d[2], basis, nullptr);
      for (int64_t d = 0; d < f.D; ++d) {
        gather_lanes(col + d, f.col_g_stride, f.D, static_cast<int>(f.K), nv, coef);
        V8 v = V8(0);
        for (int64_t k = 0; k < f.K; ++k) v += basis[k] * coef[k];
        v += V8(0.5f);
        alignas(32) float out[kLanes];
        lanes_of(select(v > V8(0), v, V8(0)), out);
        for (int j = 0; j < nv; ++j) fp[(c * N + n0 + j) * Dt + d] = out[j];
      }
    }
  }
}

// Backward: the gradients of Gaussians [lo, hi) (means, quats, scales, opacities, colours: accumulated over the
// cameras in camera order) and the chunk's camera partial sums part[C][12] (dR 9, dt 3), from the blend's
// gradients of means2d (g2), conics (gq), features (gf) and opacities (go).
inline void project_backward_chunk(const studio_project::Camera<float>* cams, const FusedDims& f, int64_t lo,
                                   int64_t hi, const float* mp, const float* qp, const float* sp, const float* cp,
                                   const int32_t* rp, const float* g2, const float* gq, const float* gf,
                                   const float* go, float eps2d, float near, float far, float* gM, float* gQ,
                                   float* gS, float* gO, float* gC, double* part) {
  const int64_t C = f.C, N = f.N, Dt = f.Dt, D = f.D, K = f.K;
  for (int64_t n0 = lo; n0 < hi; n0 += kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(kLanes, hi - n0));
    V8 mean[3], quat[4], scale[3], am[3], aq[4], as[3];
    gather_lanes(mp + n0 * 3, 3, 1, 3, nv, mean);
    gather_lanes(qp + n0 * 4, 4, 1, 4, nv, quat);
    gather_lanes(sp + n0 * 3, 3, 1, 3, nv, scale);
    gather_lanes(gM + n0 * 3, 3, 1, 3, nv, am);
    gather_lanes(gQ + n0 * 4, 4, 1, 4, nv, aq);
    gather_lanes(gS + n0 * 3, 3, 1, 3, nv, as);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t gb0 = c * N + n0;
      alignas(32) int32_t act[kLanes];
      bool any = false;
      for (int j = 0; j < kLanes; ++j) {
        const int64_t g = gb0 + j;
        act[j] = (j < nv && rp[g * 2] > 0 && rp[g * 2 + 1] > 0) ? -1 : 0;  // binned: else every gradient is zero
        any |= act[j] != 0;
      }
      if (!any) continue;
      const M8 active{vload<vi8>(act)};
      const auto& cam = cams[c];
      V8 gR[9], gt[3], gcen[3];
      for (auto& x : gR) x = V8(0);
      for (auto& x : gt) x = V8(0);
      for (auto& x : gcen) x = V8(0);
      V8 om[3], oq[4], os[3];  // the accumulators before this camera: inactive lanes keep them
      std::copy(am, am + 3, om);
      std::copy(aq, aq + 4, oq);
      std::copy(as, as + 3, os);
      if (f.depth_mode != 2) {
        const int64_t coff = c * f.col_cam_stride + n0 * f.col_g_stride;
        const float* col = cp + coff;
        float* gcol = gC + coff;
        if (f.sh < 0) {
          for (int j = 0; j < nv; ++j)
            if (act[j])
              for (int64_t d = 0; d < D; ++d) gcol[j * f.col_g_stride + d] += gf[(gb0 + j) * Dt + d];
        } else {
          ShDir<V8> dir;
          dir.compute(mean, cam.centre);
          V8 basis[16], dbasis[48], coef[16], gfd;
          sh_basis<V8>(f.sh, dir.d[0], dir.d[1], dir.d[2], basis, dbasis);
          alignas(32) float bl[16][kLanes];
          for (int64_t k = 0; k < K; ++k) lanes_of(basis[k], bl[k]);
          V8 gdir[3] = {V8(0), V8(0), V8(0)};
          for (int64_t d = 0; d < D; ++d) {
            gather_lanes(col + d, f.col_g_stride, D, static_cast<int>(K), nv, coef);
            gather_lanes(gf + gb0 * Dt + d, Dt, 1, 1, nv, &gfd);
            V8 v = V8(0);
            for (int64_t k = 0; k < K; ++k) v += basis[k] * coef[k];
            const M8 pass = v + V8(0.5f) >= V8(0);  // clamp_min(., 0) blocks the gradient elsewhere
            for (int64_t k = 0; k < K; ++k) {
              const V8 gbk = coef[k] * gfd;
              gdir[0] = select(pass, gdir[0] + gbk * dbasis[3 * k], gdir[0]);
              gdir[1] = select(pass, gdir[1] + gbk * dbasis[3 * k + 1], gdir[1]);
              gdir[2] = select(pass, gdir[2] + gbk * dbasis[3 * k + 2], gdir[2]);
            }
            alignas(32) int32_t pl[kLanes];
            alignas(32) float gl[kLanes];
            lanes_of(pass, pl);
            lanes_of(gfd, gl);
            for (int j = 0; j < nv; ++j)
              if (act[j] && pl[j])
                for (int64_t k = 0; k < K; ++k) gcol[j * f.col_g_stride + k * D + d] += bl[k][j] * gl[j];
          }
          V8 gv[3];
          dir.backward(gdir, gv);
          for (int j = 0; j < 3; ++j) {
            am[j] += gv[j];
            gcen[j] -= gv[j];
          }
        }
      }
      V8 gdepth = V8(0);
      if (f.depth_mode != 0) gather_lanes(gf + gb0 * Dt + Dt - 1, Dt, 1, 1, nv, &gdepth);
      for (int j = 0; j < nv; ++j)
        if (act[j]) gO[n0 + j] += go[gb0 + j];
      V8 g2v[2], gqv[3];
      gather_lanes(g2 + gb0 * 2, 2, 1, 2, nv, g2v);
      gather_lanes(gq + gb0 * 3, 3, 1, 3, nv, gqv);
      Projected<V8> pr;
      pr.compute(cam, mean, quat, scale, eps2d, near, far);
      pr.backward(cam, mean, scale, g2v, gqv, gdepth, am, aq, as, gR, gt);
      // centre = -R^T t
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
          gR[i * 3 + j] -= gcen[j] * cam.t[i];
          gt[i] -= cam.R[i * 3 + j] * gcen[j];
        }
      for (int i = 0; i < 3; ++i) am[i] = select(active, am[i], om[i]);
      for (int i = 0; i < 4; ++i) aq[i] = select(active, aq[i], oq[i]);
      for (int i = 0; i < 3; ++i) as[i] = select(active, as[i], os[i]);
      alignas(32) float cg[12][kLanes];
      for (int k = 0; k < 9; ++k) lanes_of(gR[k], cg[k]);
      for (int k = 0; k < 3; ++k) lanes_of(gt[k], cg[9 + k]);
      double* pc = part + c * 12;
      double acc[12];
      std::copy(pc, pc + 12, acc);
      for (int j = 0; j < nv; ++j)
        if (act[j])
          for (int k = 0; k < 12; ++k) acc[k] += cg[k][j];
      std::copy(acc, acc + 12, pc);
    }
    alignas(32) float buf[4][kLanes];
    for (int k = 0; k < 3; ++k) lanes_of(am[k], buf[k]);
    for (int j = 0; j < nv; ++j)
      for (int k = 0; k < 3; ++k) gM[(n0 + j) * 3 + k] = buf[k][j];
    for (int k = 0; k < 4; ++k) lanes_of(aq[k], buf[k]);
    for (int j = 0; j < nv; ++j)
      for (int k = 0; k < 4; ++k) gQ[(n0 + j) * 4 + k] = buf[k][j];
    for (int k = 0; k < 3; ++k) lanes_of(as[k], buf[k]);
    for (int j = 0; j < nv; ++j)
      for (int k = 0; k < 3; ++k) gS[(n0 + j) * 3 + k] = buf[k][j];
  }
}
