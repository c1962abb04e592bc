// Native CPU tile rasterizer for projected 2D Gaussians: forward blend and analytic backward.
//
// Blend rules are those documented in studio/render/_common.py (pixel centres at +0.5, sigma/alpha
// formula, ALPHA_MIN / ALPHA_MAX, T_EPS early termination); the dense torch twin in
// studio/render/_torch_impl.py is the reference this file is tested against.
//
// Pipeline (all cameras in one call each):
//   bin_gaussians      per camera: visible Gaussians (radii > 0), stable sort by depth, append each
//                      one to the lists of the tiles its radii box touches -> isect_offsets [C,th,tw],
//                      flatten_ids [M] (entries c*N+n, depth-ordered inside every tile).
//   rasterize_forward  parallel over (camera, tile): front-to-back blend with early termination;
//                      stores per-pixel final transmittance and the number of list entries consumed.
//   rasterize_backward parallel over (camera, tile): back-to-front walk recovering
//                      T_i = T_{i+1} / (1 - alpha_i); gradients land in a per-intersection buffer
//                      (each tile owns a disjoint slice, so no races), which is then reduced per
//                      Gaussian with every thread owning a disjoint range of Gaussians
//                      (deterministic regardless of the thread count).
// Inside a tile both passes run Gaussian-major: per-pixel state lives in a tile-sized buffer and
// each list entry visits only the pixels of the bounding box of its ellipse sigma <= ln(255 o)
// (+ margins), which is what makes the CPU version fast; each pixel still sees its Gaussians in
// depth order, so the result is the per-pixel loop of _common, reordered.
// Threads: studio_parallel::run (parallel.h), dynamic over items on torch's intra-op team.
// Light includes (ATen + the pybind11 tensor casters) instead of <torch/extension.h>: the
// extension needs no C++ frontend, and this roughly halves the first-use compile time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "parallel.h"
#include "project.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>
#include <cstring>
#include <string>
#include <cstdlib>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.999;
constexpr double kTEps = 1e-4;
// Cheap pre-test: alpha = o exp(-sigma) < 1/255 whenever sigma > ln(255 o); the margin keeps the
// pre-test strictly conservative so the exact alpha test below makes every real decision.
constexpr double kRejectMargin = 1e-3;

using studio_parallel::Claim;

// ---------------------------------------------------------------------------------------------
// Binning
// ---------------------------------------------------------------------------------------------

struct Rect {
  int32_t x0, x1, y0, y1;  // inclusive tile range
};

// Tiles touched by pixels whose centre lies in [mx - rx, mx + rx] x [my - ry, my + ry].
template <typename scalar_t>
inline bool tile_rect(scalar_t mx_, scalar_t my_, int32_t rx_, int32_t ry_, int W, int H, int ts, Rect& r) {
  const double mx = static_cast<double>(mx_), my = static_cast<double>(my_);
  if (!std::isfinite(mx) || !std::isfinite(my)) return false;
  const double rx = rx_, ry = ry_;
  // pixel j covers centre j + 0.5: |j + 0.5 - mx| <= rx  <=>  j in [mx - rx - 0.5, mx + rx - 0.5]
  double jx0 = std::ceil(mx - rx - 0.5), jx1 = std::floor(mx + rx - 0.5);
  double jy0 = std::ceil(my - ry - 0.5), jy1 = std::floor(my + ry - 0.5);
  jx0 = std::max(jx0, 0.0);
  jy0 = std::max(jy0, 0.0);
  jx1 = std::min(jx1, static_cast<double>(W - 1));
  jy1 = std::min(jy1, static_cast<double>(H - 1));
  if (jx0 > jx1 || jy0 > jy1) return false;
  r.x0 = static_cast<int32_t>(jx0) / ts;
  r.x1 = static_cast<int32_t>(jx1) / ts;
  r.y0 = static_cast<int32_t>(jy0) / ts;
  r.y1 = static_cast<int32_t>(jy1) / ts;
  return true;
}

template <typename scalar_t>
void bin_impl(const scalar_t* means, const int32_t* radii, const scalar_t* depths, int64_t C, int64_t N, int W,
              int H, int ts, int tw, int th, std::vector<int32_t>& flat, int32_t* offsets, int32_t* tiles_per_gauss,
              bool radix = false) {
  const int64_t T = static_cast<int64_t>(tw) * th;
  std::vector<std::vector<int32_t>> order(C);
  std::vector<std::vector<Rect>> rects(C);
  std::vector<int64_t> counts(C * T + 1, 0);

  // Phase 1 (per camera): visible set, stable depth sort, per-tile counts.
  studio_parallel::run(C, [&](const Claim& next) {
    for (int64_t c; next(c);) {
      std::vector<int32_t> vis;
      vis.reserve(N);
      for (int64_t n = 0; n < N; ++n) {
        const int32_t* rr = radii + (c * N + n) * 2;
        if (rr[0] > 0 && rr[1] > 0) vis.push_back(static_cast<int32_t>(n));
      }
      const scalar_t* dep = depths + c * N;
      // Ascending depth, NaN last, ties in ascending index (a stable sort). float32 depths that are all > 0 (what
      // projection gives visible Gaussians) sort as 64-bit keys (depth bits, index): the bits of positive floats
      // order as the floats do, and the index breaks ties, so the order is the stable one, found faster.
      bool keyed = std::is_same_v<scalar_t, float>;
      for (size_t i = 0; keyed && i < vis.size(); ++i) keyed = dep[vis[i]] > scalar_t(0) && std::isfinite(dep[vis[i]]);
      if (keyed && radix) {
        // (depth bits, index) order: a stable LSD radix sort of the 32 depth bits (3 passes of 11 bits) of the
        // visible list, which is in ascending index order, so ties keep ascending index
        const size_t nv = vis.size();
        std::vector<uint32_t> kb(nv), kb2(nv);
        std::vector<int32_t> vis2(nv);
        for (size_t i = 0; i < nv; ++i) {
          const float d = static_cast<float>(dep[vis[i]]);
          std::memcpy(&kb[i], &d, sizeof(uint32_t));
        }
        for (int shift = 0; shift < 32; shift += 11) {
          size_t cnt[2048] = {0};
          for (size_t i = 0; i < nv; ++i) ++cnt[(kb[i] >> shift) & 2047u];
          if (nv == 0 || cnt[(kb[0] >> shift) & 2047u] == nv) continue;  // one digit value: order unchanged
          size_t run = 0;
          for (size_t& c : cnt) {
            const size_t n = c;
            c = run;
            run += n;
          }
          for (size_t i = 0; i < nv; ++i) {
            const size_t j = cnt[(kb[i] >> shift) & 2047u]++;
            kb2[j] = kb[i];
            vis2[j] = vis[i];
          }
          kb.swap(kb2);
          vis.swap(vis2);
        }
      } else if (keyed) {  // the same order by a comparison sort of 64-bit (depth bits, index) keys
        std::vector<uint64_t> keys(vis.size());
        for (size_t i = 0; i < vis.size(); ++i) {
          const float d = static_cast<float>(dep[vis[i]]);
          uint32_t bits;
          std::memcpy(&bits, &d, sizeof(bits));
          keys[i] = (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(vis[i]);
        }
        std::sort(keys.begin(), keys.end());
        for (size_t i = 0; i < vis.size(); ++i) vis[i] = static_cast<int32_t>(keys[i] & 0xffffffffu);
      } else {
        std::stable_sort(vis.begin(), vis.end(), [dep](int32_t a, int32_t b) {
          const scalar_t da = dep[a], db = dep[b];
          const bool na = std::isnan(da), nb = std::isnan(db);
          if (na || nb) return !na && nb;
          return da < db;
        });
      }
      std::vector<int32_t>& ord = order[c];
      std::vector<Rect>& rc = rects[c];
      ord.reserve(vis.size());
      rc.reserve(vis.size());
      int64_t* cnt = counts.data() + c * T;
      for (int32_t n : vis) {
        const int64_t g = c * N + n;
        Rect r;
        if (!tile_rect(means[g * 2], means[g * 2 + 1], radii[g * 2], radii[g * 2 + 1], W, H, ts, r)) continue;
        ord.push_back(n);
        rc.push_back(r);
        tiles_per_gauss[g] = (r.x1 - r.x0 + 1) * (r.y1 - r.y0 + 1);
        for (int32_t ty = r.y0; ty <= r.y1; ++ty)
          for (int32_t tx = r.x0; tx <= r.x1; ++tx) ++cnt[ty * tw + tx];
      }
    }
  });

  // Phase 2: exclusive prefix sum over all (camera, tile) lists.
  int64_t total = 0;
  for (int64_t t = 0; t < C * T; ++t) {
    const int64_t n = counts[t];
    counts[t] = total;
    total += n;
  }
  TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(),
              "native rasterizer: too many tile intersections (", total, ") for int32 offsets");
  for (int64_t t = 0; t < C * T; ++t) offsets[t] = static_cast<int32_t>(counts[t]);
  flat.assign(static_cast<size_t>(total), 0);

  // Phase 3 (per camera): fill the lists in depth order.
  studio_parallel::run(C, [&](const Claim& next) {
    for (int64_t c; next(c);) {
      int64_t* cur = counts.data() + c * T;
      const std::vector<int32_t>& ord = order[c];
      const std::vector<Rect>& rc = rects[c];
      for (size_t i = 0; i < ord.size(); ++i) {
        const int32_t id = static_cast<int32_t>(c * N + ord[i]);
        const Rect& r = rc[i];
        for (int32_t ty = r.y0; ty <= r.y1; ++ty)
          for (int32_t tx = r.x0; tx <= r.x1; ++tx) flat[cur[ty * tw + tx]++] = id;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Blend: shared parameters and per-tile gather
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Params {
  const scalar_t* means;   // [C,N,2]
  const scalar_t* conics;  // [C,N,3]
  const scalar_t* colors;  // [C,N,D]
  const scalar_t* opac;    // [C,N]
  const scalar_t* bg;      // [C,D] or nullptr
  const int32_t* offsets;  // [C*th*tw]
  const int32_t* flat;     // [n_isect]
  int64_t C, N, D, n_isect;
  int W, H, ts, tw, th;
  const double* ext = nullptr;  // [C,N,3] gaussian_extent per Gaussian (fused path), or nullptr
  // fused path, float32 SIMD blend: one packed record per (camera, Gaussian), see pack_gaussians
  const float* packed = nullptr;  // [C*N, kPack]
};

constexpr int kBox = 4;  // x0, x1, y0, y1: inclusive pixel box inside the tile

// Per Gaussian: the reject threshold ln(255 o) + margin (o <= 0: -inf, rejects everything; NaN opacity: NaN, never
// pre-rejected, the exact test decides) and the half extents of the pixel box of the ellipse sigma <= thr,
// sqrt(2 thr Sigma_xx) + 1 and sqrt(2 thr Sigma_yy) + 1 with Sigma = conic^-1 (NaN where anything is degenerate:
// the box falls back to the whole tile). out = {thr, ex, ey}.
template <typename scalar_t>
inline double extent_threshold(scalar_t ok) {
  return ok > scalar_t(0) ? std::log(static_cast<double>(ok) / kAlphaMin) + kRejectMargin
                          : (ok <= scalar_t(0) ? -std::numeric_limits<double>::infinity() : static_cast<double>(ok));
}
template <typename scalar_t>
inline void gaussian_extent(scalar_t ok, scalar_t a, scalar_t b, scalar_t c, scalar_t mx, scalar_t my, double* out) {
  const double thr_d = extent_threshold(ok);
  out[0] = thr_d;
  studio_project::ellipse_extent<double>(thr_d, a, b, c, mx, my, out[1], out[2]);
}

// Structure-of-arrays copy of one tile's list: mx, my, a, b, c, o, reject threshold, colours
// [len,D], and each Gaussian's pixel box clipped to the tile (empty box: x0 > x1).
template <typename scalar_t>
struct TileCache {
  std::vector<scalar_t> buf, col;
  std::vector<int32_t> box;
  const scalar_t *mx, *my, *ca, *cb, *cc, *op, *thr, *colp = nullptr;
  const int32_t* boxp = nullptr;

  // ext (optional, [C*N*3] doubles from gaussian_extent): the per-Gaussian threshold and ellipse half extents,
  // computed once per Gaussian instead of once per intersection; the result is the same.
  void gather(const Params<scalar_t>& p, int64_t s, int64_t len, int64_t D, int tx0, int tx1, int ty0, int ty1,
              const double* ext = nullptr) {
    buf.resize(static_cast<size_t>(7 * len));
    col.resize(static_cast<size_t>(len * D));
    box.resize(static_cast<size_t>(kBox * len));
    scalar_t* b = buf.data();
    scalar_t *x = b, *y = b + len, *a = b + 2 * len, *bb = b + 3 * len, *c = b + 4 * len, *o = b + 5 * len,
             *th = b + 6 * len;
    for (int64_t k = 0; k < len; ++k) {
      const int64_t g = p.flat[s + k];
      x[k] = p.means[g * 2];
      y[k] = p.means[g * 2 + 1];
      a[k] = p.conics[g * 3];
      bb[k] = p.conics[g * 3 + 1];
      c[k] = p.conics[g * 3 + 2];
      o[k] = p.opac[g];
      double e3[3];
      if (ext) {
        e3[0] = ext[g * 3]; e3[1] = ext[g * 3 + 1]; e3[2] = ext[g * 3 + 2];
      } else {
        gaussian_extent(o[k], a[k], bb[k], c[k], x[k], y[k], e3);
      }
      th[k] = static_cast<scalar_t>(e3[0]);
      const scalar_t* src = p.colors + g * D;
      std::copy(src, src + D, col.data() + k * D);
      int32_t* bx = box.data() + kBox * k;
      bx[0] = tx0; bx[1] = tx1; bx[2] = ty0; bx[3] = ty1;
      if (e3[0] < 0) {  // nothing can pass the alpha test
        bx[0] = 1; bx[1] = 0;
        continue;
      }
      const double ex = e3[1], ey = e3[2];
      if (std::isfinite(ex)) {
        const double mxd = x[k], myd = y[k];
        const double jx0 = std::max(std::ceil(mxd - ex - 0.5), static_cast<double>(tx0));
        const double jx1 = std::min(std::floor(mxd + ex - 0.5), static_cast<double>(tx1));
        const double jy0 = std::max(std::ceil(myd - ey - 0.5), static_cast<double>(ty0));
        const double jy1 = std::min(std::floor(myd + ey - 0.5), static_cast<double>(ty1));
        if (jx0 > jx1 || jy0 > jy1) {
          bx[0] = 1; bx[1] = 0;
        } else {
          bx[0] = static_cast<int32_t>(jx0); bx[1] = static_cast<int32_t>(jx1);
          bx[2] = static_cast<int32_t>(jy0); bx[3] = static_cast<int32_t>(jy1);
        }
      }
    }
    mx = x; my = y; ca = a; cb = bb; cc = c; op = o; thr = th;
    colp = col.data();
    boxp = box.data();
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
//
// Gaussian-major within a tile: per-pixel state (T, accumulated colour, done flag) lives in a
// tile-sized buffer and each list entry, in depth order, updates only the pixels of its box. Every
// pixel still sees its Gaussians front to back, so this is the per-pixel loop of _common reordered.

template <typename scalar_t, int DC>
void forward_impl(const Params<scalar_t>& p, scalar_t* render, scalar_t* alphas, scalar_t* tfinal, int32_t* last_out) {
  const int64_t D = DC > 0 ? DC : p.D;
  const int64_t T = static_cast<int64_t>(p.tw) * p.th;
  const int64_t ntiles = p.C * T;
  const scalar_t amin = static_cast<scalar_t>(kAlphaMin), amax = static_cast<scalar_t>(kAlphaMax),
                 teps = static_cast<scalar_t>(kTEps);
  studio_parallel::run(ntiles, [&](const Claim& next) {
    TileCache<scalar_t> tc;
    const size_t tpix = static_cast<size_t>(p.ts) * p.ts;
    // Transmittance is carried in double and rounded to scalar_t where used, which reproduces
    // torch.cumprod on CPU (double accumulator, each prefix rounded) bit for bit.
    std::vector<double> Tr_v(tpix);
    std::vector<scalar_t> acc_v(tpix * D);
    std::vector<int32_t> last_v(tpix);
    std::vector<uint8_t> done_v(tpix);
    for (int64_t t; next(t);) {
      const int64_t cam = t / T, tt = t % T;
      const int tyi = static_cast<int>(tt / p.tw), txi = static_cast<int>(tt % p.tw);
      const int x0 = txi * p.ts, x1 = std::min(p.W, x0 + p.ts);
      const int y0 = tyi * p.ts, y1 = std::min(p.H, y0 + p.ts);
      const int bw = x1 - x0;
      const int npix = bw * (y1 - y0);
      const int64_t s = p.offsets[t], e = (t + 1 < ntiles) ? p.offsets[t + 1] : p.n_isect;
      const int64_t len = e - s;
      tc.gather(p, s, len, D, x0, x1 - 1, y0, y1 - 1, p.ext);
      const scalar_t* colc = tc.col.data();
      double* Tr = Tr_v.data();
      scalar_t* acc = acc_v.data();
      int32_t* lastp = last_v.data();
      uint8_t* done = done_v.data();
      std::fill(Tr, Tr + npix, 1.0);
      std::fill(acc, acc + static_cast<int64_t>(npix) * D, scalar_t(0));
      std::fill(lastp, lastp + npix, 0);
      std::fill(done, done + npix, uint8_t(0));
      int ndone = 0;
      for (int64_t k = 0; k < len && ndone < npix; ++k) {
        const int32_t* bx = tc.box.data() + kBox * k;
        if (bx[0] > bx[1]) continue;
        const scalar_t mxk = tc.mx[k], myk = tc.my[k], ak = tc.ca[k], bk = tc.cb[k], ck_ = tc.cc[k];
        const scalar_t ok = tc.op[k], thk = tc.thr[k];
        const scalar_t* ck = colc + k * D;
        for (int py = bx[2]; py <= bx[3]; ++py) {
          const scalar_t dy = (static_cast<scalar_t>(py) + scalar_t(0.5)) - myk;
          const int row = (py - y0) * bw - x0;
          for (int px = bx[0]; px <= bx[1]; ++px) {
            const int i = row + px;
            if (done[i]) continue;
            const scalar_t dx = (static_cast<scalar_t>(px) + scalar_t(0.5)) - mxk;
            const scalar_t sigma = scalar_t(0.5) * (ak * dx * dx + ck_ * dy * dy) + bk * dx * dy;
            if (sigma < scalar_t(0) || sigma > thk) continue;
            const scalar_t oG = ok * std::exp(-sigma);
            const scalar_t alpha = oG > amax ? amax : oG;
            if (!(alpha >= amin)) continue;
            const double nextT = Tr[i] * static_cast<double>(scalar_t(1) - alpha);
            if (static_cast<scalar_t>(nextT) <= teps) {  // early termination: not added, pixel stops
              done[i] = 1;
              ++ndone;
              continue;
            }
            const scalar_t w = alpha * static_cast<scalar_t>(Tr[i]);
            scalar_t* ai = acc + static_cast<int64_t>(i) * D;
            for (int64_t d = 0; d < D; ++d) ai[d] += w * ck[d];
            Tr[i] = nextT;
            lastp[i] = static_cast<int32_t>(k + 1);
          }
        }
      }
      const scalar_t* bgc = p.bg ? p.bg + cam * D : nullptr;
      for (int py = y0; py < y1; ++py) {
        for (int px = x0; px < x1; ++px) {
          const int i = (py - y0) * bw + (px - x0);
          const int64_t pix = (cam * p.H + py) * p.W + px;
          scalar_t* out = render + pix * D;
          const scalar_t* ai = acc + static_cast<int64_t>(i) * D;
          const scalar_t Tf = static_cast<scalar_t>(Tr[i]);
          if (bgc) {
            for (int64_t d = 0; d < D; ++d) out[d] = ai[d] + Tf * bgc[d];
          } else {
            for (int64_t d = 0; d < D; ++d) out[d] = ai[d];
          }
          alphas[pix] = scalar_t(1) - Tf;
          tfinal[pix] = Tf;
          last_out[pix] = lastp[i];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
//
// Gaussian-major again, now back to front: each pixel keeps T_{k+1} (starting at T_final) and the
// suffix sum v = sum_{j>k} (dL/dC . c_j) alpha_j T_j; entry k of a pixel's list is processed only if
// k < last (the entries the forward pass consumed), recovering T_k = T_{k+1} / (1 - alpha_k).
//
//   dL/dalpha_k = (g . c_k) T_k - (v + T_final * (g . bg - dL/dalphas)) / (1 - alpha_k)
//
// The record of entry k (this tile's slice of the per-intersection buffer) is written exactly once.

// Per-intersection gradient record: [d mean x, d mean y, d conic a, b, c, d opacity, d colour(D)].
constexpr int kRec = 6;

template <typename scalar_t, int DC>
void backward_impl(const Params<scalar_t>& p, const scalar_t* g_render, const scalar_t* g_alpha, const scalar_t* tfinal,
                   const int32_t* last_in, scalar_t* partial, scalar_t* bg_partial) {
  using acc_t = double;  // running per-pixel quantities (T recovery, suffix sums) in double
  const int64_t D = DC > 0 ? DC : p.D;
  const int64_t S = kRec + D;
  const int64_t T = static_cast<int64_t>(p.tw) * p.th;
  const int64_t ntiles = p.C * T;
  const scalar_t amin = static_cast<scalar_t>(kAlphaMin), amax = static_cast<scalar_t>(kAlphaMax);
  studio_parallel::run(ntiles, [&](const Claim& next) {
    TileCache<scalar_t> tc;
    const size_t tpix = static_cast<size_t>(p.ts) * p.ts;
    std::vector<acc_t> Tr_v(tpix), v_v(tpix), tail_v(tpix), gacc(S);
    std::vector<int32_t> last_v(tpix);
    std::vector<scalar_t> g_v(tpix * D);
    for (int64_t t; next(t);) {
      const int64_t cam = t / T, tt = t % T;
      const int tyi = static_cast<int>(tt / p.tw), txi = static_cast<int>(tt % p.tw);
      const int x0 = txi * p.ts, x1 = std::min(p.W, x0 + p.ts);
      const int y0 = tyi * p.ts, y1 = std::min(p.H, y0 + p.ts);
      const int bw = x1 - x0;
      const int64_t s = p.offsets[t], e = (t + 1 < ntiles) ? p.offsets[t + 1] : p.n_isect;
      const int64_t len = e - s;
      const scalar_t* bgc = p.bg ? p.bg + cam * D : nullptr;
      scalar_t* bgp = bg_partial ? bg_partial + t * D : nullptr;
      acc_t* Tr = Tr_v.data();
      acc_t* vv = v_v.data();
      acc_t* tail = tail_v.data();
      int32_t* lastp = last_v.data();
      scalar_t* gl = g_v.data();
      int32_t maxlast = 0;
      for (int py = y0; py < y1; ++py) {
        for (int px = x0; px < x1; ++px) {
          const int i = (py - y0) * bw + (px - x0);
          const int64_t pix = (cam * p.H + py) * p.W + px;
          const scalar_t* gC = g_render + pix * D;
          std::copy(gC, gC + D, gl + static_cast<int64_t>(i) * D);
          const acc_t Tn = tfinal[pix];
          acc_t bgdot = 0;
          if (bgc) {
            for (int64_t d = 0; d < D; ++d) {
              bgdot += static_cast<acc_t>(gC[d]) * bgc[d];
              bgp[d] += static_cast<scalar_t>(Tn * gC[d]);
            }
          }
          Tr[i] = Tn;
          vv[i] = 0;
          tail[i] = Tn * (bgdot - static_cast<acc_t>(g_alpha[pix]));  // T_final * dL/dT_final
          lastp[i] = last_in[pix];
          maxlast = std::max(maxlast, lastp[i]);
        }
      }
      scalar_t* part = partial + s * S;
      if (maxlast < len) std::fill(part + maxlast * S, part + len * S, scalar_t(0));
      if (maxlast == 0) continue;
      tc.gather(p, s, maxlast, D, x0, x1 - 1, y0, y1 - 1, p.ext);
      const scalar_t* colc = tc.col.data();
      for (int64_t k = maxlast - 1; k >= 0; --k) {
        scalar_t* rec = part + k * S;
        const int32_t* bx = tc.box.data() + kBox * k;
        if (bx[0] > bx[1]) {
          std::fill(rec, rec + S, scalar_t(0));
          continue;
        }
        std::fill(gacc.begin(), gacc.end(), acc_t(0));
        acc_t* ga = gacc.data();
        const scalar_t mxk = tc.mx[k], myk = tc.my[k], ak = tc.ca[k], bk = tc.cb[k], ck_ = tc.cc[k];
        const scalar_t ok = tc.op[k], thk = tc.thr[k];
        const acc_t ad = ak, bd = bk, cd = ck_;
        const scalar_t* ck = colc + k * D;
        for (int py = bx[2]; py <= bx[3]; ++py) {
          const scalar_t dy = (static_cast<scalar_t>(py) + scalar_t(0.5)) - myk;
          const int row = (py - y0) * bw - x0;
          for (int px = bx[0]; px <= bx[1]; ++px) {
            const int i = row + px;
            if (k >= lastp[i]) continue;
            const scalar_t dx = (static_cast<scalar_t>(px) + scalar_t(0.5)) - mxk;
            const scalar_t sigma = scalar_t(0.5) * (ak * dx * dx + ck_ * dy * dy) + bk * dx * dy;
            if (sigma < scalar_t(0) || sigma > thk) continue;
            const scalar_t G = std::exp(-sigma);
            const scalar_t oG = ok * G;
            const scalar_t alpha = oG > amax ? amax : oG;
            if (!(alpha >= amin)) continue;
            const acc_t ra = acc_t(1) / (acc_t(1) - static_cast<acc_t>(alpha));
            const acc_t Ti = Tr[i] * ra;
            const acc_t w = static_cast<acc_t>(alpha) * Ti;
            const scalar_t* gC = gl + static_cast<int64_t>(i) * D;
            acc_t dot = 0;
            for (int64_t d = 0; d < D; ++d) {
              dot += static_cast<acc_t>(gC[d]) * ck[d];
              ga[kRec + d] += w * gC[d];
            }
            const acc_t dLda = dot * Ti - (vv[i] + tail[i]) * ra;
            vv[i] += dot * w;
            Tr[i] = Ti;
            if (oG <= amax) {  // the ALPHA_MAX clamp blocks the gradient where it is active
              const acc_t dLds = -dLda * static_cast<acc_t>(oG);  // d alpha / d sigma = -o G
              const acc_t ddx = dx, ddy = dy;
              // sigma depends on the mean through d = pixel - mean
              ga[0] -= dLds * (ad * ddx + bd * ddy);
              ga[1] -= dLds * (cd * ddy + bd * ddx);
              ga[2] += dLds * 0.5 * ddx * ddx;
              ga[3] += dLds * ddx * ddy;
              ga[4] += dLds * 0.5 * ddy * ddy;
              ga[5] += dLda * static_cast<acc_t>(G);
            }
          }
        }
        for (int64_t j = 0; j < S; ++j) rec[j] = static_cast<scalar_t>(ga[j]);
      }
    }
  });
}

// Sum the per-intersection records into per-Gaussian gradients; item i of nt owns Gaussians
// [G*i/nt, G*(i+1)/nt), so every output element is written by one item in isect order.
template <typename scalar_t>
void reduce_impl(const int32_t* flat, int64_t n_isect, const scalar_t* partial, int64_t D, int64_t G, scalar_t* gmeans,
                 scalar_t* gconics, scalar_t* gopac, scalar_t* gcolors) {
  const int64_t S = kRec + D;
  const int nt = static_cast<int>(
      std::min<int64_t>(studio_parallel::max_threads(), std::max<int64_t>(1, n_isect / 4096)));
  studio_parallel::run(nt, [&](const Claim& next) {
    for (int64_t item; next(item);) {
      const int64_t lo = G * item / nt, hi = G * (item + 1) / nt;
      for (int64_t k = 0; k < n_isect; ++k) {
        const int64_t g = flat[k];
        if (g < lo || g >= hi) continue;
        const scalar_t* rec = partial + k * S;
        gmeans[g * 2] += rec[0];
        gmeans[g * 2 + 1] += rec[1];
        gconics[g * 3] += rec[2];
        gconics[g * 3 + 1] += rec[3];
        gconics[g * 3 + 2] += rec[4];
        gopac[g] += rec[5];
        scalar_t* gc = gcolors + g * D;
        for (int64_t d = 0; d < D; ++d) gc[d] += rec[kRec + d];
      }
    }
  }, nt);
}

// reduce_impl for the fused path: the same sums in the same order (each element from 0, in isect order), gathered
// into one record per Gaussian (stride kRec + D rounded up to 16 floats: one or two cache lines per scattered
// update instead of four arrays), then split into the four outputs.
template <typename scalar_t>
void reduce_records(const int32_t* flat, int64_t n_isect, const scalar_t* partial, int64_t D, int64_t G,
                    scalar_t* gmeans, scalar_t* gconics, scalar_t* gopac, scalar_t* gcolors) {
  const int64_t S = kRec + D, SP = (S + 15) / 16 * 16;
  std::vector<scalar_t> acc(static_cast<size_t>(G * SP), scalar_t(0));
  const int nt = static_cast<int>(
      std::min<int64_t>(studio_parallel::max_threads(), std::max<int64_t>(1, n_isect / 4096)));
  studio_parallel::run(nt, [&](const Claim& next) {
    for (int64_t item; next(item);) {
      const int64_t lo = G * item / nt, hi = G * (item + 1) / nt;
      for (int64_t k = 0; k < n_isect; ++k) {
        const int64_t g = flat[k];
        if (g < lo || g >= hi) continue;
        const scalar_t* rec = partial + k * S;
        scalar_t* a = acc.data() + g * SP;
        for (int64_t j = 0; j < S; ++j) a[j] += rec[j];
      }
      for (int64_t g = lo; g < hi; ++g) {
        const scalar_t* a = acc.data() + g * SP;
        gmeans[g * 2] = a[0];
        gmeans[g * 2 + 1] = a[1];
        gconics[g * 3] = a[2];
        gconics[g * 3 + 1] = a[3];
        gconics[g * 3 + 2] = a[4];
        gopac[g] = a[5];
        for (int64_t d = 0; d < D; ++d) gcolors[g * D + d] = a[kRec + d];
      }
    }
  }, nt);
}

// Compile-time channel counts for the common widths, a runtime loop otherwise.
template <typename F>
void dispatch_channels(int64_t D, F&& f) {
  switch (D) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}


// ---------------------------------------------------------------------------------------------
// Packed Gaussian records of the vectorised blend
// ---------------------------------------------------------------------------------------------
//
// One 64-byte record (a cache line) per (camera, Gaussian), written once after the projection, so that the blend
// reads one line per tile-list entry instead of gathering six arrays: 0 mean x, 1 mean y, 2-4 conic a, b, c,
// 5 opacity, 6 the reject threshold ln(255 o) + margin (gaussian_extent), 7-10 the Gaussian's pixel box
// (int32 bits: x0, x1, y0, y1, inclusive, clipped to the image; x0 > x1: empty), 11.. the features (D <= 4).
//
// The box is the bounding box of the ellipse sigma <= thr plus 1e-3 pixel, not gaussian_extent's (which adds a
// whole pixel each side, as the scalar kernels use it): sigma <= thr is the exact test's own pre-test, and thr
// exceeds the alpha test's limit ln(255 o) by kRejectMargin (1e-3 in sigma, far above the float rounding of sigma
// for conics with a c <= 1e6 det), so a pixel outside the tight box cannot reach alpha >= 1/255 and skipping it
// changes no result. More elongated conics keep gaussian_extent's box; degenerate ones the whole image.
constexpr int kPack = 16;

// pack_gaussians (blend_simd.h, in both builds; pack_records below picks one) writes the records.

// ---------------------------------------------------------------------------------------------
// Vectorised blend of the fused path (blend_simd.h): an AVX2+FMA build and a baseline build, chosen at
// run time (blend_choice below).
// ---------------------------------------------------------------------------------------------
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define STUDIO_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define STUDIO_BLEND_AVX2 1
namespace blend_avx2 {
#include "blend_simd.h"
}  // namespace blend_avx2
#undef STUDIO_BLEND_AVX2
#pragma GCC pop_options
#endif
namespace blend_generic {
#include "blend_simd.h"
}  // namespace blend_generic

// Which blend the fused path runs (STUDIO_NATIVE_SIMD, read on every call):
//   unset / "1" / "auto": the AVX2+FMA build where the CPU has AVX2 and FMA, else the reference scalar kernels
//       (the baseline build of the vector code measured ~3x slower than the scalar kernels: without AVX2 its 8-lane
//       vectors and selects are split and emulated);
//   "generic": the baseline build of the vector kernels (for tests and measurements);
//   "scalar" / "0": the reference scalar kernels (forward_impl / backward_impl).
bool cpu_has_avx2() {
#ifdef STUDIO_HAVE_AVX2_BUILD
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

enum class Blend { kAvx2, kGeneric, kScalar };

Blend blend_choice() {
  const char* env = std::getenv("STUDIO_NATIVE_SIMD");
  if (env != nullptr && (std::strcmp(env, "scalar") == 0 || std::strcmp(env, "0") == 0)) return Blend::kScalar;
  if (env != nullptr && std::strcmp(env, "generic") == 0) return Blend::kGeneric;
  return cpu_has_avx2() ? Blend::kAvx2 : Blend::kScalar;
}

// The packed records in the build of the blend that reads them (the AVX2 build's ceil / floor are single
// instructions); both builds compute the same records.
void pack_records(Blend choice, const float* m2, const float* cn, const float* oc, const float* ft, const double* ep,
                  int64_t CN, int64_t D, int W, int H, float* out) {
#ifdef STUDIO_HAVE_AVX2_BUILD
  if (choice == Blend::kAvx2) {
    blend_avx2::pack_gaussians(m2, cn, oc, ft, ep, CN, D, W, H, out);
    return;
  }
#endif
  blend_generic::pack_gaussians(m2, cn, oc, ft, ep, CN, D, W, H, out);
}

std::string simd_isa() {
  const Blend b = blend_choice();
  return b == Blend::kAvx2 ? "avx2" : (b == Blend::kGeneric ? "generic" : "scalar");
}

// ---------------------------------------------------------------------------------------------
// Python-facing entry points
// ---------------------------------------------------------------------------------------------

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "native rasterizer: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "native rasterizer: ", name, " must be contiguous");
}

void tile_dims(int64_t W, int64_t H, int64_t ts, int& tw, int& th) {
  TORCH_CHECK(W > 0 && H > 0, "native rasterizer: width/height must be positive");
  TORCH_CHECK(ts > 0, "native rasterizer: tile_size must be positive");
  tw = static_cast<int>((W + ts - 1) / ts);
  th = static_cast<int>((H + ts - 1) / ts);
}

std::vector<at::Tensor> bin_gaussians(at::Tensor means2d, at::Tensor radii, at::Tensor depths, int64_t width,
                                         int64_t height, int64_t tile_size) {
  check_cpu(means2d, "means2d");
  check_cpu(radii, "radii");
  check_cpu(depths, "depths");
  TORCH_CHECK(means2d.dim() == 3 && means2d.size(2) == 2, "means2d must be [C,N,2]");
  const int64_t C = means2d.size(0), N = means2d.size(1);
  TORCH_CHECK(radii.scalar_type() == at::kInt && radii.dim() == 3 && radii.size(0) == C && radii.size(1) == N &&
                  radii.size(2) == 2,
              "radii must be int32 [C,N,2]");
  TORCH_CHECK(depths.scalar_type() == means2d.scalar_type() && depths.dim() == 2 && depths.size(0) == C &&
                  depths.size(1) == N,
              "depths must be [C,N] with the dtype of means2d");
  TORCH_CHECK(C * N <= std::numeric_limits<int32_t>::max(), "native rasterizer: C*N must fit in int32");
  int tw, th;
  tile_dims(width, height, tile_size, tw, th);
  auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor offsets = at::empty({C, th, tw}, i32);
  at::Tensor tiles_per_gauss = at::zeros({C, N}, i32);
  std::vector<int32_t> flat;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "bin_gaussians", [&] {
    bin_impl<scalar_t>(means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(), depths.data_ptr<scalar_t>(), C, N,
                       static_cast<int>(width), static_cast<int>(height), static_cast<int>(tile_size), tw, th, flat,
                       offsets.data_ptr<int32_t>(), tiles_per_gauss.data_ptr<int32_t>());
  });
  at::Tensor flatten_ids = at::empty({static_cast<int64_t>(flat.size())}, i32);
  std::copy(flat.begin(), flat.end(), flatten_ids.data_ptr<int32_t>());
  return {offsets, flatten_ids, tiles_per_gauss};
}

template <typename scalar_t>
Params<scalar_t> make_params(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors,
                             const at::Tensor& opacities, const at::Tensor& backgrounds,
                             const at::Tensor& isect_offsets, const at::Tensor& flatten_ids, int64_t W, int64_t H,
                             int64_t ts) {
  Params<scalar_t> p;
  p.C = means2d.size(0);
  p.N = means2d.size(1);
  p.D = colors.size(2);
  p.means = means2d.data_ptr<scalar_t>();
  p.conics = conics.data_ptr<scalar_t>();
  p.colors = colors.data_ptr<scalar_t>();
  p.opac = opacities.data_ptr<scalar_t>();
  p.bg = backgrounds.numel() > 0 ? backgrounds.data_ptr<scalar_t>() : nullptr;
  p.offsets = isect_offsets.data_ptr<int32_t>();
  p.flat = flatten_ids.data_ptr<int32_t>();
  p.n_isect = flatten_ids.numel();
  p.W = static_cast<int>(W);
  p.H = static_cast<int>(H);
  p.ts = static_cast<int>(ts);
  tile_dims(W, H, ts, p.tw, p.th);
  return p;
}

void check_blend_inputs(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors,
                        const at::Tensor& opacities, const at::Tensor& backgrounds,
                        const at::Tensor& isect_offsets, const at::Tensor& flatten_ids, int64_t W, int64_t H,
                        int64_t ts) {
  check_cpu(means2d, "means2d");
  check_cpu(conics, "conics");
  check_cpu(colors, "colors");
  check_cpu(opacities, "opacities");
  check_cpu(backgrounds, "backgrounds");
  check_cpu(isect_offsets, "isect_offsets");
  check_cpu(flatten_ids, "flatten_ids");
  TORCH_CHECK(means2d.dim() == 3 && means2d.size(2) == 2, "means2d must be [C,N,2]");
  const int64_t C = means2d.size(0), N = means2d.size(1);
  const auto st = means2d.scalar_type();
  TORCH_CHECK(conics.sizes() == at::IntArrayRef({C, N, 3}) && conics.scalar_type() == st, "conics must be [C,N,3]");
  TORCH_CHECK(colors.dim() == 3 && colors.size(0) == C && colors.size(1) == N && colors.size(2) >= 1 &&
                  colors.scalar_type() == st,
              "colors must be [C,N,D]");
  TORCH_CHECK(opacities.sizes() == at::IntArrayRef({C, N}) && opacities.scalar_type() == st,
              "opacities must be [C,N]");
  TORCH_CHECK(backgrounds.numel() == 0 ||
                  (backgrounds.sizes() == at::IntArrayRef({C, colors.size(2)}) && backgrounds.scalar_type() == st),
              "backgrounds must be [C,D] or empty");
  int tw, th;
  tile_dims(W, H, ts, tw, th);
  TORCH_CHECK(isect_offsets.scalar_type() == at::kInt && isect_offsets.numel() == C * tw * th,
              "isect_offsets must be int32 [C,th,tw]");
  TORCH_CHECK(flatten_ids.scalar_type() == at::kInt && flatten_ids.dim() == 1, "flatten_ids must be int32 [M]");
}

std::vector<at::Tensor> rasterize_forward(at::Tensor means2d, at::Tensor conics, at::Tensor colors,
                                             at::Tensor opacities, at::Tensor backgrounds,
                                             at::Tensor isect_offsets, at::Tensor flatten_ids, int64_t width,
                                             int64_t height, int64_t tile_size) {
  check_blend_inputs(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, width, height,
                     tile_size);
  const int64_t C = means2d.size(0), D = colors.size(2);
  auto fopt = means2d.options();
  at::Tensor render = at::empty({C, height, width, D}, fopt);
  at::Tensor alphas = at::empty({C, height, width, 1}, fopt);
  at::Tensor tfinal = at::empty({C, height, width}, fopt);
  at::Tensor last = at::empty({C, height, width}, fopt.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_forward", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(means2d, conics, colors, opacities, backgrounds, isect_offsets,
                                                     flatten_ids, width, height, tile_size);
    dispatch_channels(D, [&](auto dc) {
      forward_impl<scalar_t, decltype(dc)::value>(p, render.data_ptr<scalar_t>(), alphas.data_ptr<scalar_t>(),
                                                  tfinal.data_ptr<scalar_t>(), last.data_ptr<int32_t>());
    });
  });
  return {render, alphas, tfinal, last};
}

std::vector<at::Tensor> rasterize_backward(at::Tensor means2d, at::Tensor conics, at::Tensor colors,
                                              at::Tensor opacities, at::Tensor backgrounds,
                                              at::Tensor isect_offsets, at::Tensor flatten_ids,
                                              at::Tensor tfinal, at::Tensor last, at::Tensor g_render,
                                              at::Tensor g_alphas, int64_t width, int64_t height,
                                              int64_t tile_size) {
  check_blend_inputs(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, width, height,
                     tile_size);
  check_cpu(tfinal, "T_final");
  check_cpu(last, "last_ids");
  check_cpu(g_render, "grad render");
  check_cpu(g_alphas, "grad alphas");
  const int64_t C = means2d.size(0), N = means2d.size(1), D = colors.size(2);
  TORCH_CHECK(g_render.numel() == C * height * width * D && g_render.scalar_type() == means2d.scalar_type(),
              "grad render must be [C,H,W,D]");
  TORCH_CHECK(g_alphas.numel() == C * height * width && g_alphas.scalar_type() == means2d.scalar_type(),
              "grad alphas must be [C,H,W,1]");
  TORCH_CHECK(tfinal.numel() == C * height * width && last.numel() == C * height * width &&
                  last.scalar_type() == at::kInt,
              "T_final / last_ids do not match the image");
  auto fopt = means2d.options();
  at::Tensor gmeans = at::zeros({C, N, 2}, fopt);
  at::Tensor gconics = at::zeros({C, N, 3}, fopt);
  at::Tensor gcolors = at::zeros({C, N, D}, fopt);
  at::Tensor gopac = at::zeros({C, N}, fopt);
  const bool has_bg = backgrounds.numel() > 0;
  at::Tensor gbg = has_bg ? at::zeros({C, D}, fopt) : at::empty({0}, fopt);
  const int64_t n_isect = flatten_ids.numel();
  const int64_t ntiles = isect_offsets.numel();
  at::Tensor partial = at::empty({n_isect, kRec + D}, fopt);  // every record is written once
  at::Tensor bg_partial = has_bg ? at::zeros({ntiles, D}, fopt) : at::empty({0}, fopt);
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_backward", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(means2d, conics, colors, opacities, backgrounds, isect_offsets,
                                                     flatten_ids, width, height, tile_size);
    dispatch_channels(D, [&](auto dc) {
      backward_impl<scalar_t, decltype(dc)::value>(p, g_render.data_ptr<scalar_t>(), g_alphas.data_ptr<scalar_t>(),
                                                   tfinal.data_ptr<scalar_t>(), last.data_ptr<int32_t>(),
                                                   partial.data_ptr<scalar_t>(),
                                                   has_bg ? bg_partial.data_ptr<scalar_t>() : nullptr);
    });
    reduce_impl<scalar_t>(p.flat, n_isect, partial.data_ptr<scalar_t>(), D, C * N, gmeans.data_ptr<scalar_t>(),
                          gconics.data_ptr<scalar_t>(), gopac.data_ptr<scalar_t>(), gcolors.data_ptr<scalar_t>());
    if (has_bg) {
      const scalar_t* bp = bg_partial.data_ptr<scalar_t>();
      scalar_t* gb = gbg.data_ptr<scalar_t>();
      const int64_t T = ntiles / C;
      for (int64_t t = 0; t < ntiles; ++t)
        for (int64_t d = 0; d < D; ++d) gb[(t / T) * D + d] += bp[t * D + d];
    }
  });
  return {gmeans, gconics, gcolors, gopac, gbg};
}

// ---------------------------------------------------------------------------------------------
// Fused path: Gaussians -> image in one call (projection + SH + binning + blend), and back in one call
// ---------------------------------------------------------------------------------------------
//
// render_forward(means [N,3], quats [N,4], scales [N,3], opacities [N], colors, viewmats [C,4,4], Ks [C,3,3],
//                backgrounds [C,Dt] or empty, W, H, tile_size, sh_degree (-1: colors are features),
//                depth_mode (0: none, 1: depth appended as the last channel, 2: depth only), near, far, eps2d,
//                keep_lists (keep the vector blend's packed records for the backward))
//   colors: features [N,D] / [C,N,D], or SH coefficients [N,K',D] / [C,N,K',D] (the first (deg+1)^2 used).
//   -> render [C,H,W,Dt], alphas [C,H,W,1], means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N,2],
//      feats [C,N,Dt], opac [C,N], isect_offsets, flatten_ids, tiles_per_gauss, T_final, last_ids,
//      ext [C,N,3] (float64: per-Gaussian reject threshold and ellipse half extents, see gaussian_extent),
//      keep_soa (the vector blend's packed Gaussian records [C*N*kPack], see pack_gaussians, kept for the backward
//      when keep_lists; empty otherwise), keep_col, keep_box (empty; the slots of an earlier layout)
// render_backward(the inputs, the saved outputs, grad render, grad alphas, the settings)
//   -> grads of means, quats, scales, opacities, colors (input shape), viewmats [C,4,4], backgrounds, and
//      d loss / d means2d [C,N,2] (the screen-space gradient densification reads)
// Per-Gaussian work is parallel over fixed chunks of Gaussians; camera gradients are summed per chunk and then
// over chunks in order, so results do not depend on the thread count.

constexpr int64_t kChunk = 256;

struct FusedDims {
  int64_t C, N, D, Kp, K, Dt, col_cam_stride, col_g_stride;
  int sh, depth_mode;
  bool per_cam;
};

FusedDims fused_dims(const at::Tensor& means, const at::Tensor& colors, const at::Tensor& viewmats, int64_t sh,
                     int64_t depth_mode) {
  FusedDims f;
  f.C = viewmats.size(0);
  f.N = means.size(0);
  f.sh = static_cast<int>(sh);
  f.depth_mode = static_cast<int>(depth_mode);
  TORCH_CHECK(sh >= -1 && sh <= 3, "sh_degree must be -1 (features) or 0..3");
  TORCH_CHECK(depth_mode >= 0 && depth_mode <= 2, "depth_mode must be 0, 1 or 2");
  const int64_t base_dim = sh < 0 ? 2 : 3;
  TORCH_CHECK(colors.dim() == base_dim || colors.dim() == base_dim + 1, "colors has the wrong number of dims");
  f.per_cam = colors.dim() == base_dim + 1;
  if (f.per_cam) TORCH_CHECK(colors.size(0) == f.C, "per-camera colors must have C rows");
  TORCH_CHECK(colors.size(f.per_cam ? 1 : 0) == f.N, "colors must have N Gaussians");
  f.D = colors.size(-1);
  f.Kp = sh < 0 ? 1 : colors.size(-2);
  f.K = sh < 0 ? 1 : (sh + 1) * (sh + 1);
  TORCH_CHECK(f.Kp >= f.K, "colors has fewer SH coefficients than sh_degree needs");
  f.col_g_stride = f.Kp * f.D;
  f.col_cam_stride = f.per_cam ? f.N * f.col_g_stride : 0;
  f.Dt = depth_mode == 2 ? 1 : f.D + (depth_mode == 1 ? 1 : 0);
  return f;
}

template <typename S>
std::vector<studio_project::Camera<S>> load_cameras(const at::Tensor& viewmats, const at::Tensor& Ks, int W, int H) {
  const int64_t C = viewmats.size(0);
  std::vector<studio_project::Camera<S>> cams(C);
  const S* V = viewmats.data_ptr<S>();
  const S* K = Ks.data_ptr<S>();
  for (int64_t c = 0; c < C; ++c) cams[c].load(V + c * 16, K + c * 9, W, H);
  return cams;
}

// Whether any of p[0..n) is NaN or +-Inf, read from the exponent bits (so no compiler flag can fold it away);
// branch-free, so the loop vectorises.
template <typename S>
bool any_nonfinite(const S* p, int64_t n) {
  using U = std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>;
  constexpr U kExp = sizeof(S) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof(U));
    bad |= (u & kExp) == kExp;
  }
  return bad;
}

// The fused path's input check: the non-finite inputs as bits in the order of rasterize_gaussians' own check
// (means, quats, scales, opacities, colors, viewmats, Ks, backgrounds). The per-Gaussian inputs are read chunk by
// chunk inside the projection loop (while in cache), the small ones here; the Python side skips its own pass.
constexpr const char* kInputNames[] = {"means", "quats", "scales", "opacities", "colors", "viewmats", "Ks",
                                       "backgrounds"};

template <typename S>
unsigned nonfinite_chunk(const S* mp, const S* qp, const S* sp, const S* op, const S* cp, const FusedDims& f,
                         int64_t lo, int64_t hi) {
  const int64_t n = hi - lo;
  unsigned bad = 0;
  bad |= any_nonfinite(mp + lo * 3, n * 3) ? 1u : 0u;
  bad |= any_nonfinite(qp + lo * 4, n * 4) ? 2u : 0u;
  bad |= any_nonfinite(sp + lo * 3, n * 3) ? 4u : 0u;
  bad |= any_nonfinite(op + lo, n) ? 8u : 0u;
  for (int64_t c = 0; c < (f.per_cam ? f.C : 1); ++c)
    bad |= any_nonfinite(cp + c * f.col_cam_stride + lo * f.col_g_stride, n * f.col_g_stride) ? 16u : 0u;
  return bad;
}

void raise_nonfinite(unsigned bad) {
  for (int i = 0; i < 8; ++i)
    TORCH_CHECK_VALUE(!(bad & (1u << i)), kInputNames[i], " contains NaN or Inf values; check the values you pass");
}

template <typename F>
void dispatch_blend(int64_t D, F&& f) {
  dispatch_channels(D, std::forward<F>(f));
}

// Vectorised projection + SH of the fused path (project_simd.h: project_math.h over 8 float lanes), in the same two
// builds as the blend; render_forward / render_backward use it for float32 whenever they use the vector blend
// (blend_choice), the scalar loops otherwise (float64, STUDIO_NATIVE_SIMD=scalar).
#ifdef STUDIO_HAVE_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define STUDIO_BLEND_AVX2 1
namespace blend_avx2 {
#include "project_simd.h"
}  // namespace blend_avx2
#undef STUDIO_BLEND_AVX2
#pragma GCC pop_options
#endif
namespace blend_generic {
#include "project_simd.h"
}  // namespace blend_generic

// The chunk's projection in the vector build that `choice` names, for float32; false (nothing done: the caller runs
// the scalar loop) for float64 or the scalar choice.
template <typename S, typename... A>
bool project_forward_vec(Blend choice, const std::vector<studio_project::Camera<S>>& cams, A... args) {
  if constexpr (std::is_same_v<S, float>) {
    if (choice == Blend::kScalar) return false;
#ifdef STUDIO_HAVE_AVX2_BUILD
    if (choice == Blend::kAvx2) {
      blend_avx2::project_forward_chunk(cams.data(), args...);
      return true;
    }
#endif
    blend_generic::project_forward_chunk(cams.data(), args...);
    return true;
  } else {
    return false;
  }
}
template <typename S, typename... A>
bool project_backward_vec(Blend choice, const std::vector<studio_project::Camera<S>>& cams, A... args) {
  if constexpr (std::is_same_v<S, float>) {
    if (choice == Blend::kScalar) return false;
#ifdef STUDIO_HAVE_AVX2_BUILD
    if (choice == Blend::kAvx2) {
      blend_avx2::project_backward_chunk(cams.data(), args...);
      return true;
    }
#endif
    blend_generic::project_backward_chunk(cams.data(), args...);
    return true;
  } else {
    return false;
  }
}

std::vector<at::Tensor> render_forward(at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor opacities,
                                       at::Tensor colors, at::Tensor viewmats, at::Tensor Ks, at::Tensor backgrounds,
                                       int64_t width, int64_t height, int64_t tile_size, int64_t sh_degree,
                                       int64_t depth_mode, double near_plane, double far_plane, double eps2d,
                                       bool keep_lists) {
  for (auto* pr : {&means, &quats, &scales, &opacities, &colors, &viewmats, &Ks, &backgrounds})
    check_cpu(*pr, "input");
  const auto st = means.scalar_type();
  for (auto* pr : {&quats, &scales, &opacities, &colors, &viewmats, &Ks})
    TORCH_CHECK(pr->scalar_type() == st, "native fused render: every input must have the dtype of means");
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 3, "means must be [N,3]");
  const FusedDims f = fused_dims(means, colors, viewmats, sh_degree, depth_mode);
  const int64_t C = f.C, N = f.N, Dt = f.Dt;
  TORCH_CHECK(C * N <= std::numeric_limits<int32_t>::max(), "native rasterizer: C*N must fit in int32");
  TORCH_CHECK(backgrounds.numel() == 0 || backgrounds.numel() == C * Dt, "backgrounds must be [C,Dt] or empty");
  const int W = static_cast<int>(width), H = static_cast<int>(height), ts = static_cast<int>(tile_size);
  int tw, th;
  tile_dims(width, height, tile_size, tw, th);
  auto fopt = means.options();
  auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor means2d = at::empty({C, N, 2}, fopt), conics = at::empty({C, N, 3}, fopt);
  at::Tensor depths = at::empty({C, N}, fopt), feats = at::empty({C, N, Dt}, fopt), opac = at::empty({C, N}, fopt);
  at::Tensor radii = at::empty({C, N, 2}, i32);
  at::Tensor render = at::empty({C, height, width, Dt}, fopt), alphas = at::empty({C, height, width, 1}, fopt);
  at::Tensor tfinal = at::empty({C, height, width}, fopt), last = at::empty({C, height, width}, i32);
  at::Tensor offsets = at::empty({C, th, tw}, i32), tiles_per_gauss = at::zeros({C, N}, i32);
  at::Tensor ext = at::empty({C, N, 3}, fopt.dtype(at::kDouble));
  std::vector<int32_t> flat;
  AT_DISPATCH_FLOATING_TYPES(st, "render_forward", [&] {
    using S = scalar_t;
    const auto cams = load_cameras<S>(viewmats, Ks, W, H);
    const S *mp = means.data_ptr<S>(), *qp = quats.data_ptr<S>(), *sp = scales.data_ptr<S>();
    const S *op = opacities.data_ptr<S>(), *cp = colors.data_ptr<S>();
    S *m2 = means2d.data_ptr<S>(), *cn = conics.data_ptr<S>(), *dp = depths.data_ptr<S>();
    S *fp = feats.data_ptr<S>(), *oc = opac.data_ptr<S>();
    int32_t* rp = radii.data_ptr<int32_t>();
    double* ep = ext.data_ptr<double>();
    const int64_t nchunks = (N + kChunk - 1) / kChunk;
    std::vector<unsigned> chunk_bad(nchunks, 0u);
    const Blend proj_choice = blend_choice();
    studio_parallel::run(nchunks, [&](const Claim& next) {
      studio_project::Projected<S> pr;
      studio_project::ShDir<S> dir;
      S basis[16];
      for (int64_t ch; next(ch);) {
        chunk_bad[ch] = nonfinite_chunk<S>(mp, qp, sp, op, cp, f, ch * kChunk, std::min(N, (ch + 1) * kChunk));
        if (project_forward_vec(proj_choice, cams, f, ch * kChunk, std::min(N, (ch + 1) * kChunk), mp, qp, sp, op, cp,
                                S(eps2d), S(near_plane), S(far_plane), W, H, m2, cn, dp, fp, oc, rp, ep))
          continue;  // 8 Gaussians at a time (project_simd.h), the same outputs
        for (int64_t n = ch * kChunk; n < std::min(N, (ch + 1) * kChunk); ++n) {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t g = c * N + n;
            pr.compute(cams[c], mp + n * 3, qp + n * 4, sp + n * 3, S(eps2d), S(near_plane), S(far_plane));
            m2[g * 2] = pr.mean2d[0];
            m2[g * 2 + 1] = pr.mean2d[1];
            for (int j = 0; j < 3; ++j) cn[g * 3 + j] = pr.conic[j];
            dp[g] = pr.p[2];
            oc[g] = op[n];
            studio_project::radii_of<S>(pr.in_depth, pr.ok_det, pr.a, pr.c, pr.mean2d[0], pr.mean2d[1], op[n], W, H,
                                        rp + g * 2);
            gaussian_extent<S>(op[n], pr.conic[0], pr.conic[1], pr.conic[2], pr.mean2d[0], pr.mean2d[1], ep + g * 3);
            S* fo = fp + g * Dt;
            if (f.depth_mode != 2) {
              const S* col = cp + c * f.col_cam_stride + n * f.col_g_stride;
              if (f.sh < 0) {
                for (int64_t d = 0; d < f.D; ++d) fo[d] = col[d];
              } else {
                dir.compute(mp + n * 3, cams[c].centre);
                studio_project::sh_basis<S>(f.sh, dir.d[0], dir.d[1], dir.d[2], basis, nullptr);
                for (int64_t d = 0; d < f.D; ++d) {
                  S v = 0;
                  for (int64_t k = 0; k < f.K; ++k) v += basis[k] * col[k * f.D + d];
                  v += S(0.5);
                  fo[d] = v > S(0) ? v : S(0);
                }
              }
            }
            if (f.depth_mode != 0) fo[Dt - 1] = pr.p[2];
          }
        }
      }
    });
    unsigned bad = 0;
    for (unsigned b : chunk_bad) bad |= b;
    bad |= any_nonfinite(viewmats.data_ptr<S>(), viewmats.numel()) ? 32u : 0u;
    bad |= any_nonfinite(Ks.data_ptr<S>(), Ks.numel()) ? 64u : 0u;
    if (backgrounds.numel() > 0) bad |= any_nonfinite(backgrounds.data_ptr<S>(), backgrounds.numel()) ? 128u : 0u;
    raise_nonfinite(bad);  // before binning: a NaN centre must not reach the tile counts
    bin_impl<S>(m2, rp, dp, C, N, W, H, ts, tw, th, flat, offsets.data_ptr<int32_t>(),
                tiles_per_gauss.data_ptr<int32_t>(), /*radix=*/true);
  });
  at::Tensor flatten_ids = at::empty({static_cast<int64_t>(flat.size())}, i32);
  std::copy(flat.begin(), flat.end(), flatten_ids.data_ptr<int32_t>());
  at::Tensor keep_soa = at::empty({0}, fopt), keep_col = at::empty({0}, fopt), keep_box = at::empty({0}, i32);
  AT_DISPATCH_FLOATING_TYPES(st, "render_forward_blend", [&] {
    Params<scalar_t> p = make_params<scalar_t>(means2d, conics, feats, opac, backgrounds, offsets, flatten_ids, width,
                                               height, tile_size);
    p.ext = ext.data_ptr<double>();
    if constexpr (std::is_same_v<scalar_t, float>) {
      if ((Dt == 1 || Dt == 3 || Dt == 4) && blend_choice() != Blend::kScalar) {
        // the vector blend's packed records, kept for the backward (keep_lists) in the first kept slot
        keep_soa = at::empty({C * N * kPack}, fopt);
        pack_records(blend_choice(), means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(),
                       feats.data_ptr<float>(), ext.data_ptr<double>(), C * N, Dt, W, H, keep_soa.data_ptr<float>());
        p.packed = keep_soa.data_ptr<float>();
      }
    }
    dispatch_blend(Dt, [&](auto dc) {
      constexpr int DC = decltype(dc)::value;
      constexpr bool kSimd = std::is_same_v<scalar_t, float> && (DC == 1 || DC == 3 || DC == 4);
      if constexpr (kSimd) {
        const Blend choice = blend_choice();
        if (choice != Blend::kScalar) {
#ifdef STUDIO_HAVE_AVX2_BUILD
          if (choice == Blend::kAvx2) {
            blend_avx2::forward_tiles<DC>(p, render.data_ptr<float>(), alphas.data_ptr<float>(),
                                          tfinal.data_ptr<float>(), last.data_ptr<int32_t>());
            return;
          }
#endif
          blend_generic::forward_tiles<DC>(p, render.data_ptr<float>(), alphas.data_ptr<float>(),
                                           tfinal.data_ptr<float>(), last.data_ptr<int32_t>());
          return;
        }
      }
      forward_impl<scalar_t, DC>(p, render.data_ptr<scalar_t>(), alphas.data_ptr<scalar_t>(),
                                 tfinal.data_ptr<scalar_t>(), last.data_ptr<int32_t>());
    });
  });
  if (!keep_lists) keep_soa = at::empty({0}, fopt);
  return {render, alphas, means2d, conics, depths, radii, feats, opac, offsets, flatten_ids, tiles_per_gauss,
          tfinal, last, ext, keep_soa, keep_col, keep_box};
}

std::vector<at::Tensor> render_backward(at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor opacities,
                                        at::Tensor colors, at::Tensor viewmats, at::Tensor Ks, at::Tensor backgrounds,
                                        at::Tensor means2d, at::Tensor conics, at::Tensor feats, at::Tensor opac,
                                        at::Tensor radii, at::Tensor offsets, at::Tensor flatten_ids, at::Tensor tfinal,
                                        at::Tensor last, at::Tensor ext, at::Tensor keep_soa, at::Tensor keep_col,
                                        at::Tensor keep_box, at::Tensor g_render, at::Tensor g_alphas,
                                        int64_t width,
                                        int64_t height, int64_t tile_size, int64_t sh_degree, int64_t depth_mode,
                                        double near_plane, double far_plane, double eps2d) {
  for (auto* pr : {&means, &quats, &scales, &opacities, &colors, &viewmats, &Ks, &backgrounds, &means2d, &conics,
                   &feats, &opac, &radii, &offsets, &flatten_ids, &tfinal, &last, &ext, &keep_soa, &keep_col, &keep_box,
                   &g_render, &g_alphas})
    check_cpu(*pr, "input");
  const FusedDims f = fused_dims(means, colors, viewmats, sh_degree, depth_mode);
  const int64_t C = f.C, N = f.N, Dt = f.Dt;
  TORCH_CHECK(g_render.numel() == C * height * width * Dt && g_render.scalar_type() == means.scalar_type(),
              "grad render must be [C,H,W,Dt]");
  TORCH_CHECK(g_alphas.numel() == C * height * width && g_alphas.scalar_type() == means.scalar_type(),
              "grad alphas must be [C,H,W,1]");
  const int W = static_cast<int>(width), H = static_cast<int>(height);
  auto fopt = means.options();
  // 1. blend backward: per-intersection records, reduced per (camera, Gaussian)
  at::Tensor gm2 = at::zeros({C, N, 2}, fopt), gcn = at::zeros({C, N, 3}, fopt);
  at::Tensor gft = at::zeros({C, N, Dt}, fopt), gop = at::zeros({C, N}, fopt);
  const bool has_bg = backgrounds.numel() > 0;
  at::Tensor gbg = has_bg ? at::zeros({C, Dt}, fopt) : at::empty({0}, fopt);
  const int64_t n_isect = flatten_ids.numel(), ntiles = offsets.numel();
  at::Tensor partial = at::empty({n_isect, kRec + Dt}, fopt);
  at::Tensor bg_partial = has_bg ? at::zeros({ntiles, Dt}, fopt) : at::empty({0}, fopt);
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "render_backward_blend", [&] {
    Params<scalar_t> p = make_params<scalar_t>(means2d, conics, feats, opac, backgrounds, offsets, flatten_ids, width,
                                               height, tile_size);
    TORCH_CHECK(ext.scalar_type() == at::kDouble && ext.numel() == C * N * 3, "ext must be float64 [C,N,3]");
    p.ext = ext.data_ptr<double>();
    at::Tensor packed = keep_soa;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if ((Dt == 1 || Dt == 3 || Dt == 4) && blend_choice() != Blend::kScalar) {
        if (packed.numel() != C * N * kPack) {  // not kept by the forward (it ran the scalar blend): pack now
          packed = at::empty({C * N * kPack}, fopt);
          pack_records(blend_choice(), means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(),
                         feats.data_ptr<float>(), ext.data_ptr<double>(), C * N, Dt, W, H, packed.data_ptr<float>());
        }
        TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous(), "kept records do not match");
        p.packed = packed.data_ptr<float>();
      }
    }
    dispatch_blend(Dt, [&](auto dc) {
      constexpr int DC = decltype(dc)::value;
      scalar_t* bgp = has_bg ? bg_partial.data_ptr<scalar_t>() : nullptr;
      constexpr bool kSimd = std::is_same_v<scalar_t, float> && (DC == 1 || DC == 3 || DC == 4);
      if constexpr (kSimd) {
        const Blend choice = blend_choice();
        if (choice != Blend::kScalar) {
#ifdef STUDIO_HAVE_AVX2_BUILD
          if (choice == Blend::kAvx2) {
            blend_avx2::backward_tiles<DC>(p, g_render.data_ptr<float>(), g_alphas.data_ptr<float>(),
                                           tfinal.data_ptr<float>(), last.data_ptr<int32_t>(),
                                           partial.data_ptr<float>(), bgp);
            return;
          }
#endif
          blend_generic::backward_tiles<DC>(p, g_render.data_ptr<float>(), g_alphas.data_ptr<float>(),
                                            tfinal.data_ptr<float>(), last.data_ptr<int32_t>(),
                                            partial.data_ptr<float>(), bgp);
          return;
        }
      }
      backward_impl<scalar_t, DC>(p, g_render.data_ptr<scalar_t>(), g_alphas.data_ptr<scalar_t>(),
                                  tfinal.data_ptr<scalar_t>(), last.data_ptr<int32_t>(), partial.data_ptr<scalar_t>(),
                                  bgp);
    });
    reduce_records<scalar_t>(p.flat, n_isect, partial.data_ptr<scalar_t>(), Dt, C * N, gm2.data_ptr<scalar_t>(),
                          gcn.data_ptr<scalar_t>(), gop.data_ptr<scalar_t>(), gft.data_ptr<scalar_t>());
    if (has_bg) {
      const scalar_t* bp = bg_partial.data_ptr<scalar_t>();
      scalar_t* gb = gbg.data_ptr<scalar_t>();
      const int64_t T = ntiles / C;
      for (int64_t t = 0; t < ntiles; ++t)
        for (int64_t d = 0; d < Dt; ++d) gb[(t / T) * Dt + d] += bp[t * Dt + d];
    }
  });
  // 2. projection + SH backward, per Gaussian over all cameras
  at::Tensor gmeans = at::zeros({N, 3}, fopt), gquats = at::zeros({N, 4}, fopt), gscales = at::zeros({N, 3}, fopt);
  at::Tensor gopac = at::zeros({N}, fopt), gcolors = at::zeros(colors.sizes(), fopt);
  at::Tensor gview = at::zeros({C, 4, 4}, fopt);
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  std::vector<double> cam_part(static_cast<size_t>(nchunks * C * 12), 0.0);  // per chunk: dR (9), dt (3)
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "render_backward_project", [&] {
    using S = scalar_t;
    const auto cams = load_cameras<S>(viewmats, Ks, W, H);
    const S *mp = means.data_ptr<S>(), *qp = quats.data_ptr<S>(), *sp = scales.data_ptr<S>();
    const S* cp = colors.data_ptr<S>();
    const int32_t* rp = radii.data_ptr<int32_t>();
    const S *g2 = gm2.data_ptr<S>(), *gq = gcn.data_ptr<S>(), *gf = gft.data_ptr<S>(), *go = gop.data_ptr<S>();
    S *gM = gmeans.data_ptr<S>(), *gQ = gquats.data_ptr<S>(), *gS = gscales.data_ptr<S>();
    S *gO = gopac.data_ptr<S>(), *gC = gcolors.data_ptr<S>();
    const Blend proj_choice = blend_choice();
    studio_parallel::run(nchunks, [&](const Claim& next) {
      studio_project::Projected<S> pr;
      studio_project::ShDir<S> dir;
      S basis[16], dbasis[48];
      for (int64_t ch; next(ch);) {
        double* part = cam_part.data() + ch * C * 12;
        if (project_backward_vec(proj_choice, cams, f, ch * kChunk, std::min(N, (ch + 1) * kChunk), mp, qp, sp, cp, rp,
                                 g2, gq, gf, go, S(eps2d), S(near_plane), S(far_plane), gM, gQ, gS, gO, gC, part))
          continue;  // 8 Gaussians at a time (project_simd.h), the same sums in the same order
        for (int64_t n = ch * kChunk; n < std::min(N, (ch + 1) * kChunk); ++n) {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t g = c * N + n;
            if (rp[g * 2] <= 0 || rp[g * 2 + 1] <= 0) continue;  // not binned: every incoming gradient is zero
            const auto& cam = cams[c];
            S gR[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, gt[3] = {0, 0, 0}, gcen[3] = {0, 0, 0};
            const S* gfo = gf + g * Dt;
            if (f.depth_mode != 2) {
              const int64_t coff = c * f.col_cam_stride + n * f.col_g_stride;
              const S* col = cp + coff;
              S* gcol = gC + coff;
              if (f.sh < 0) {
                for (int64_t d = 0; d < f.D; ++d) gcol[d] += gfo[d];
              } else {
                dir.compute(mp + n * 3, cam.centre);
                studio_project::sh_basis<S>(f.sh, dir.d[0], dir.d[1], dir.d[2], basis, dbasis);
                S gdir[3] = {0, 0, 0};
                for (int64_t d = 0; d < f.D; ++d) {
                  S v = 0;
                  for (int64_t k = 0; k < f.K; ++k) v += basis[k] * col[k * f.D + d];
                  if (!(v + S(0.5) >= S(0))) continue;  // clamp_min(., 0) blocks the gradient
                  const S gd = gfo[d];
                  for (int64_t k = 0; k < f.K; ++k) {
                    gcol[k * f.D + d] += basis[k] * gd;
                    const S gb = col[k * f.D + d] * gd;
                    gdir[0] += gb * dbasis[3 * k];
                    gdir[1] += gb * dbasis[3 * k + 1];
                    gdir[2] += gb * dbasis[3 * k + 2];
                  }
                }
                S gv[3];
                dir.backward(gdir, gv);
                for (int j = 0; j < 3; ++j) {
                  gM[n * 3 + j] += gv[j];
                  gcen[j] -= gv[j];
                }
              }
            }
            const S gdepth = f.depth_mode != 0 ? gfo[Dt - 1] : S(0);
            gO[n] += go[g];
            pr.compute(cam, mp + n * 3, qp + n * 4, sp + n * 3, S(eps2d), S(near_plane), S(far_plane));
            pr.backward(cam, mp + n * 3, sp + n * 3, g2 + g * 2, gq + g * 3, gdepth, gM + n * 3, gQ + n * 4,
                        gS + n * 3, gR, gt);
            // centre = -R^T t
            for (int i = 0; i < 3; ++i)
              for (int j = 0; j < 3; ++j) {
                gR[i * 3 + j] -= gcen[j] * cam.t[i];
                gt[i] -= cam.R[i * 3 + j] * gcen[j];
              }
            double* pc = part + c * 12;
            for (int j = 0; j < 9; ++j) pc[j] += gR[j];
            for (int j = 0; j < 3; ++j) pc[9 + j] += gt[j];
          }
        }
      }
    });
    S* gV = gview.data_ptr<S>();
    for (int64_t c = 0; c < C; ++c) {
      double acc[12] = {0};
      for (int64_t ch = 0; ch < nchunks; ++ch)
        for (int j = 0; j < 12; ++j) acc[j] += cam_part[(ch * C + c) * 12 + j];
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) gV[c * 16 + i * 4 + j] = static_cast<S>(acc[i * 3 + j]);
        gV[c * 16 + i * 4 + 3] = static_cast<S>(acc[9 + i]);
      }
    }
  });
  return {gmeans, gquats, gscales, gopac, gcolors, gview, gbg, gm2};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "studio native CPU Gaussian tile rasterizer (OpenMP, analytic backward)";
  m.def("bin_gaussians", &bin_gaussians, "Depth-sorted tile lists: (isect_offsets, flatten_ids, tiles_per_gauss)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rasterize_forward", &rasterize_forward, "Blend: (render, alphas, T_final, last_ids)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("render_forward", &render_forward,
        "Fused Gaussians -> image: (render, alphas, means2d, conics, depths, radii, feats, opac, isect_offsets, "
        "flatten_ids, tiles_per_gauss, T_final, last_ids, ext, keep_soa, keep_col, keep_box)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("render_backward", &render_backward,
        "Fused backward: (d means, d quats, d scales, d opacities, d colors, d viewmats, d backgrounds, d means2d)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("simd_isa", &simd_isa, "The blend the fused path uses now: 'avx2', 'generic' or 'scalar'");
  m.def("rasterize_backward", &rasterize_backward,
        "Analytic backward: (d means2d, d conics, d colors, d opacities, d backgrounds)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
