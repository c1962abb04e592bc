// Blend kernels of the fused native path for float32 and 1, 3 or 4 channels, vectorised over pixels. Included by
// rasterize.cpp twice: under `#pragma GCC target("avx2,fma")` (namespace blend_avx2) and for the baseline ISA
// (blend_generic); rasterize.cpp's blend_choice picks one at run time. (A .h so that package-data ships it, and
// deliberately without an include guard.) No intrinsics: GCC/Clang vector extensions (vf8 = 8 floats = one AVX2
// register; the baseline build splits them, which is slow, so it only runs when asked for).
//
// Per tile, with the same lists, order and blend rules as forward_impl / backward_impl:
//   * the tile's list entries are gathered into a structure of arrays (TileCache; the per-Gaussian threshold and
//     ellipse extents come precomputed from the projection);
//   * the tile's pixels form groups of kLanes consecutive pixels of a row; GroupLists appends every entry whose
//     pixel box touches a group to that group's list (depth order kept);
//   * each group walks its list with its per-pixel state in registers: forward front to back (transmittance in
//     double, as the reference, plus its float rounding; stops when all its pixels have terminated: early
//     termination per pixel group); backward back to front from the group's largest consumed entry;
//   * the backward sums each entry's terms over the group's lanes into a per-entry accumulator and writes the
//     entry's record of the per-intersection buffer once per tile: no atomics, deterministic for any thread count.
// The exp is a branch-free polynomial (vexp8, ~1 ulp of expf).

constexpr int kLanes = 8;


// 8-lane vectors (GCC/Clang vector extensions): one AVX2 register each for floats and int32, two 4-lane halves
// for doubles. The baseline build lowers them to SSE2 pairs.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));
typedef int64_t vl4 __attribute__((vector_size(32)));

template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
inline bool vany(vi8 m) {
  int64_t q[4];
  std::memcpy(q, &m, sizeof(q));
  return (q[0] | q[1] | q[2] | q[3]) != 0;
}
inline vf8 vsplat(float x) { return vf8{x, x, x, x, x, x, x, x}; }
inline vf8 vexp8(vf8 x) {
  // Cephes-style expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, 2^n by the exponent bits.
  x = x > vsplat(-87.0f) ? x : vsplat(-87.0f);  // NaN -> -87 (masked by the caller)
  x = x < vsplat(88.0f) ? x : vsplat(88.0f);
  const vf8 t = x * 1.44269504088896341f + 0.5f;
  vf8 fx = __builtin_convertvector(__builtin_convertvector(t, vi8), vf8);  // trunc
  fx = fx > t ? fx - 1.0f : fx;                                             // floor
  vf8 r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  vf8 y = vsplat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const vi8 bits = (__builtin_convertvector(fx, vi8) + 127) << 23;
  return y * (vf8)bits;
}
// low / high 4 lanes of an 8-lane float or mask vector, widened to doubles / 64-bit masks, and back
inline vd4 lo_d(vf8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), vd4); }
inline vd4 hi_d(vf8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), vd4); }
inline vl4 lo_m(vi8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), vl4); }
inline vl4 hi_m(vi8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), vl4); }
inline vf8 join_f(vd4 a, vd4 b) {
  return __builtin_shufflevector(__builtin_convertvector(a, vf4), __builtin_convertvector(b, vf4), 0, 1, 2, 3, 4, 5,
                                 6, 7);
}
constexpr vf8 kIota = {0, 1, 2, 3, 4, 5, 6, 7};


// Per-tile group lists: a tile's pixels form groups of kLanes consecutive pixels of one row (GPR groups per row);
// every list entry whose pixel box touches a group is appended to that group's list, in list (depth) order.
struct GroupLists {
  std::vector<int32_t> ids, cnt;
  int len = 0;
  template <typename S>
  void build(const TileCache<S>& tc, int64_t n, int x0, int y0, int GPR, int ngroups) {
    len = static_cast<int>(n);
    cnt.assign(ngroups, 0);
    ids.resize(static_cast<size_t>(ngroups) * std::max<int64_t>(n, 1));
    for (int64_t k = 0; k < n; ++k) {
      const int32_t* bx = tc.boxp + kBox * k;
      if (bx[0] > bx[1]) continue;
      const int g0 = (bx[0] - x0) / kLanes, g1 = (bx[1] - x0) / kLanes;
      for (int py = bx[2]; py <= bx[3]; ++py) {
        const int row = (py - y0) * GPR;
        for (int g = row + g0; g <= row + g1; ++g) ids[static_cast<size_t>(g) * len + cnt[g]++] = static_cast<int32_t>(k);
      }
    }
  }
  const int32_t* list(int g) const { return ids.data() + static_cast<size_t>(g) * len; }
};

inline vi8 vsplati(int32_t x) { return vi8{x, x, x, x, x, x, x, x}; }

// Forward, float32, D in {1, 3, 4}: per pixel group, the group's list front to back with the per-pixel state
// (transmittance in double, as forward_impl, colour, last entry, done) in registers; the group stops as soon as
// all its pixels have terminated.
template <int D>
void forward_tiles(const Params<float>& p, float* render, float* alphas, float* tfinal, int32_t* last_out) {
  const int64_t T = static_cast<int64_t>(p.tw) * p.th;
  const int64_t ntiles = p.C * T;
  const float amin = static_cast<float>(kAlphaMin), amax = static_cast<float>(kAlphaMax),
              teps = static_cast<float>(kTEps);
  const int GPR = (p.ts + kLanes - 1) / kLanes;
  studio_parallel::run(ntiles, [&](const Claim& next) {
    TileCache<float> tc;
    GroupLists gls;
    for (int64_t t; next(t);) {
      const int64_t cam = t / T, tt = t % T;
      const int tyi = static_cast<int>(tt / p.tw), txi = static_cast<int>(tt % p.tw);
      const int x0 = txi * p.ts, x1 = std::min(p.W, x0 + p.ts);
      const int y0 = tyi * p.ts, y1 = std::min(p.H, y0 + p.ts);
      const int bw = x1 - x0, bh = y1 - y0;
      const int64_t s = p.offsets[t], e = (t + 1 < ntiles) ? p.offsets[t + 1] : p.n_isect;
      const int64_t len = e - s;
      if (len > 0) {
        tc.gather(p, s, len, D, x0, x1 - 1, y0, y1 - 1, p.ext);
        if (p.keep_soa) tc.store(p.keep_soa, p.keep_col, p.keep_box, s, len, D);  // for the backward
      }
      gls.build(tc, len, x0, y0, GPR, GPR * bh);
      const float* bgc = p.bg ? p.bg + cam * D : nullptr;
      for (int ly = 0; ly < bh; ++ly) {
        const float py = static_cast<float>(y0 + ly) + 0.5f;
        for (int gi = 0; gi < GPR; ++gi) {
          const int lx0 = gi * kLanes;
          if (lx0 >= bw) break;
          const int g = ly * GPR + gi;
          const int32_t* lst = gls.list(g);
          const int n = gls.cnt[g];
          const vf8 px = (static_cast<float>(x0 + lx0) + 0.5f) + kIota;
          vd4 Tlo = {1, 1, 1, 1}, Thi = {1, 1, 1, 1};  // transmittance in double, as forward_impl
          vf8 Tf8 = vsplat(1.0f);                       // and rounded to float, where it is used
          vf8 acc[D];
          for (int d = 0; d < D; ++d) acc[d] = vsplat(0.0f);
          vi8 last = vsplati(0);
          vi8 done = (lx0 + vi8{0, 1, 2, 3, 4, 5, 6, 7}) >= bw;  // lanes past the image edge never blend
          for (int j = 0; j < n; ++j) {
            const int k = lst[j];
            const float dy = py - tc.my[k];
            const vf8 dx = px - tc.mx[k];
            const vf8 sigma = 0.5f * (tc.ca[k] * dx * dx + tc.cc[k] * dy * dy) + tc.cb[k] * dx * dy;
            const vf8 oG = tc.op[k] * vexp8(-sigma);
            const vf8 alpha = oG > amax ? vsplat(amax) : oG;
            const vi8 valid = ~done & (sigma >= 0.0f) & (sigma <= tc.thr[k]) & (alpha >= amin);
            // lanes that do not blend multiply T by exactly 1; terminating lanes (rare) are restored below
            const vf8 omv = valid ? 1.0f - alpha : vsplat(1.0f);
            vd4 nTl = Tlo * lo_d(omv), nTh = Thi * hi_d(omv);
            vf8 nTf = join_f(nTl, nTh);
            const vi8 term = valid & (nTf <= teps);
            vi8 add = valid;
            bool stop = false;
            if (vany(term)) {
              add = valid & ~term;
              nTl = lo_m(term) ? Tlo : nTl;
              nTh = hi_m(term) ? Thi : nTh;
              nTf = term ? Tf8 : nTf;
              done |= term;
              stop = !vany(~done);  // every pixel of the group has terminated
            }
            const vf8 w = add ? alpha * Tf8 : vsplat(0.0f);
            const float* ck = tc.colp + static_cast<int64_t>(k) * D;
            for (int d = 0; d < D; ++d) acc[d] += w * ck[d];
            Tlo = nTl;
            Thi = nTh;
            Tf8 = nTf;
            last = add ? vsplati(k + 1) : last;
            if (stop) break;
          }
          float Tf[kLanes], ac[D][kLanes];
          int32_t lb[kLanes];
          vstore(Tf, Tf8);
          vstore(lb, last);
          for (int d = 0; d < D; ++d) vstore(ac[d], acc[d]);
          for (int l = 0; l < kLanes && lx0 + l < bw; ++l) {
            const int64_t pix = (cam * p.H + (y0 + ly)) * p.W + (x0 + lx0 + l);
            float* out = render + pix * D;
            for (int d = 0; d < D; ++d) out[d] = ac[d][l] + (bgc ? Tf[l] * bgc[d] : 0.0f);
            alphas[pix] = 1.0f - Tf[l];
            tfinal[pix] = Tf[l];
            last_out[pix] = lb[l];
          }
        }
      }
    }
  });
}

// Backward, float32, D in {1, 3, 4}: per pixel group, the group's list back to front from its last consumed
// entry, state (T recovered as T / (1 - alpha), suffix sum v, T_final term) in 8 float lanes; each entry's terms are
// summed over the group's lanes into its per-entry accumulator (kLanes float lanes per quantity, groups in a fixed
// order), written once per tile into the entry's record of the per-intersection buffer: no atomics, deterministic.
// (The reference backward_impl keeps T and v in double; on the 10k-Gaussian benchmark scene the two agree to
// 1e-6 of each gradient's largest entry, against the 1e-4 the parity tests allow.)
template <int D>
void backward_tiles(const Params<float>& p, const float* g_render, const float* g_alpha, const float* tfinal,
                    const int32_t* last_in, float* partial, float* bg_partial) {
  constexpr int Q = kRec + D;  // quantities per entry
  const int64_t T = static_cast<int64_t>(p.tw) * p.th;
  const int64_t ntiles = p.C * T;
  const float amin = static_cast<float>(kAlphaMin), amax = static_cast<float>(kAlphaMax);
  const int GPR = (p.ts + kLanes - 1) / kLanes;
  studio_parallel::run(ntiles, [&](const Claim& next) {
    TileCache<float> tc;
    GroupLists gls;
    std::vector<float> la;  // [entry][Q][kLanes] lane partial sums (plain floats: vector types may be under-aligned)
    for (int64_t t; next(t);) {
      const int64_t cam = t / T, tt = t % T;
      const int tyi = static_cast<int>(tt / p.tw), txi = static_cast<int>(tt % p.tw);
      const int x0 = txi * p.ts, x1 = std::min(p.W, x0 + p.ts);
      const int y0 = tyi * p.ts, y1 = std::min(p.H, y0 + p.ts);
      const int bw = x1 - x0, bh = y1 - y0;
      const int64_t s = p.offsets[t], e = (t + 1 < ntiles) ? p.offsets[t + 1] : p.n_isect;
      const int64_t len = e - s;
      const float* bgc = p.bg ? p.bg + cam * D : nullptr;
      float* bgp = bg_partial ? bg_partial + t * D : nullptr;
      int32_t maxlast = 0;
      for (int py = y0; py < y1; ++py)
        for (int px = x0; px < x1; ++px) {
          const int64_t pix = (cam * p.H + py) * p.W + px;
          maxlast = std::max(maxlast, last_in[pix]);
          if (bgc) {
            const double Tn = tfinal[pix];
            for (int d = 0; d < D; ++d) bgp[d] += static_cast<float>(Tn * g_render[pix * D + d]);
          }
        }
      float* part = partial + s * Q;
      if (maxlast < len) std::fill(part + maxlast * Q, part + len * Q, 0.0f);
      if (maxlast == 0) continue;
      if (p.keep_soa) {
        tc.view(p.keep_soa, p.keep_col, p.keep_box, s, len, D);  // the forward's gathered lists
      } else {
        tc.gather(p, s, maxlast, D, x0, x1 - 1, y0, y1 - 1, p.ext);
      }
      gls.build(tc, maxlast, x0, y0, GPR, GPR * bh);
      la.assign(static_cast<size_t>(maxlast) * Q * kLanes, 0.0f);
      for (int ly = 0; ly < bh; ++ly) {
        const float py = static_cast<float>(y0 + ly) + 0.5f;
        for (int gi = 0; gi < GPR; ++gi) {
          const int lx0 = gi * kLanes;
          if (lx0 >= bw) break;
          const int g = ly * GPR + gi;
          // per-lane state from the forward pass; lanes past the image edge get last = 0 (never contribute)
          float Tf[kLanes] = {0}, gd[D][kLanes] = {};
          int32_t lb[kLanes] = {0};
          double taild[kLanes] = {0};
          int32_t glast = 0;
          for (int l = 0; l < kLanes && lx0 + l < bw; ++l) {
            const int64_t pix = (cam * p.H + (y0 + ly)) * p.W + (x0 + lx0 + l);
            Tf[l] = tfinal[pix];
            lb[l] = last_in[pix];
            glast = std::max(glast, lb[l]);
            double bgdot = 0;
            for (int d = 0; d < D; ++d) {
              gd[d][l] = g_render[pix * D + d];
              if (bgc) bgdot += static_cast<double>(gd[d][l]) * bgc[d];
            }
            taild[l] = static_cast<double>(Tf[l]) * (bgdot - static_cast<double>(g_alpha[pix]));
          }
          if (glast == 0) continue;
          vf8 T8 = vload<vf8>(Tf), v8 = vsplat(0.0f);
          float tailf[kLanes];
          for (int l = 0; l < kLanes; ++l) tailf[l] = static_cast<float>(taild[l]);
          const vf8 tail8 = vload<vf8>(tailf);
          vf8 gf[D];
          for (int d = 0; d < D; ++d) gf[d] = vload<vf8>(gd[d]);
          const vi8 last = vload<vi8>(lb);
          const vf8 px = (static_cast<float>(x0 + lx0) + 0.5f) + kIota;
          const int32_t* lst = gls.list(g);
          int j = gls.cnt[g] - 1;
          while (j >= 0 && lst[j] >= glast) --j;
          for (; j >= 0; --j) {
            const int k = lst[j];
            const float dyf = py - tc.my[k];
            const vf8 dx = px - tc.mx[k];
            const vf8 sigma = 0.5f * (tc.ca[k] * dx * dx + tc.cc[k] * dyf * dyf) + tc.cb[k] * dx * dyf;
            const vf8 G = vexp8(-sigma);
            const vf8 oG = tc.op[k] * G;
            const vf8 alpha = oG > amax ? vsplat(amax) : oG;
            const vi8 valid = (k < last) & (sigma >= 0.0f) & (sigma <= tc.thr[k]) & (alpha >= amin);
            if (!vany(valid)) continue;
            const float* ck = tc.colp + static_cast<int64_t>(k) * D;
            // transmittance recovery, suffix sums and d loss / d alpha, 8 float lanes
            const vf8 ra = valid ? 1.0f / (1.0f - alpha) : vsplat(0.0f);
            const vf8 Ti = T8 * ra;
            const vf8 w = alpha * Ti;
            vf8 dot = vsplat(0.0f);
            for (int d = 0; d < D; ++d) dot += gf[d] * ck[d];
            const vf8 dLda = dot * Ti - (v8 + tail8) * ra;
            v8 += dot * w;
            T8 = valid ? Ti : T8;
            // the per-lane gradient terms, summed per entry over the groups' lanes
            const vi8 geo = valid & (oG <= amax);  // the ALPHA_MAX clamp blocks the gradient where it is active
            const vf8 dLds = geo ? -dLda * oG : vsplat(0.0f);
            const float a = tc.ca[k], b = tc.cb[k], c = tc.cc[k];
            vf8 q[Q];
            q[0] = -dLds * (a * dx + b * dyf);
            q[1] = -dLds * (c * dyf + b * dx);
            q[2] = dLds * 0.5f * dx * dx;
            q[3] = dLds * dx * dyf;
            q[4] = dLds * (0.5f * dyf * dyf);
            q[5] = geo ? dLda * G : vsplat(0.0f);
            for (int d = 0; d < D; ++d) q[kRec + d] = w * gf[d];
            float* L = la.data() + static_cast<size_t>(k) * Q * kLanes;
            for (int i = 0; i < Q; ++i) vstore(L + kLanes * i, vload<vf8>(L + kLanes * i) + q[i]);
          }
        }
      }
      for (int64_t k = 0; k < maxlast; ++k) {
        const float* L = la.data() + static_cast<size_t>(k) * Q * kLanes;
        float* rec = part + k * Q;
        for (int q = 0; q < Q; ++q) {
          double sum = 0;
          for (int l = 0; l < kLanes; ++l) sum += L[q * kLanes + l];
          rec[q] = static_cast<float>(sum);
        }
      }
    }
  });
}
