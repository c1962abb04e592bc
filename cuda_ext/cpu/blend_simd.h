// Blend kernels of the fused native path for float32 and 1, 3 or 4 channels, vectorised over pixels. Included by
// rasterize.cpp twice: under `#pragma GCC target("avx2,fma")` (namespace blend_avx2) and for the baseline ISA
// (blend_generic); rasterize.cpp's blend_choice picks one at run time. (A .h so that package-data ships it, and
// deliberately without an include guard.) No intrinsics: GCC/Clang vector extensions (vf8 = 8 floats = one AVX2
// register; the baseline build splits them, which is slow, so it only runs when asked for).
//
// Per tile, with the same lists, order and blend rules as forward_impl / backward_impl:
//   * each list entry's parameters come from its packed 64-byte record (pack_gaussians at the end of this file: mean,
//     conic, opacity, reject threshold, pixel box, features), one cache line per entry, prefetched ahead;
//   * the tile's pixels form groups of kLanes consecutive pixels of a row, each group's per-pixel state in small
//     per-tile arrays (a few KB, in L1);
//   * both passes run Gaussian-major, as forward_impl / backward_impl: each entry, in list order (forward) or
//     reverse list order (backward), visits the groups its pixel box touches, 8 pixels at a time; every pixel
//     still sees its entries in depth order. Forward: transmittance in double exactly as the reference (so early
//     termination decides as the reference kernels), groups whose pixels have all terminated are skipped, the
//     tile stops when all have. Backward: from the tile's last consumed entry; each entry's terms are summed over
//     its groups in registers and over the lanes once, into the entry's record of the per-intersection buffer:
//     no atomics, deterministic for any thread count.
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
#if defined(STUDIO_BLEND_AVX2)  // (set by rasterize.cpp around the AVX2 build)
inline bool vany(vi8 m) { return !__builtin_ia32_ptestz256((__v4di)m, (__v4di)m); }
inline bool vall(vi8 m) { return __builtin_ia32_movmskps256((__v8sf)m) == 0xff; }
#else
inline bool vany(vi8 m) {
  int64_t q[4];
  std::memcpy(q, &m, sizeof(q));
  return (q[0] | q[1] | q[2] | q[3]) != 0;
}
inline bool vall(vi8 m) { return !vany(~m); }
#endif
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


inline vi8 vsplati(int32_t x) { return vi8{x, x, x, x, x, x, x, x}; }

// One tile-list entry: its packed record and its pixel box clipped to the tile, as group columns and rows.
struct Entry {
  const float* R;      // packed record (kPack floats)
  int g0, g1, r0, r1;  // group columns [g0, g1], tile-local rows [r0, r1]
};
inline bool entry_box(const Params<float>& p, int64_t id, int x0, int x1, int y0, int y1, Entry& en) {
  en.R = p.packed + id * kPack;
  int32_t b[4];
  std::memcpy(b, en.R + 7, sizeof(b));
  const int bx0 = std::max(b[0], x0), bx1 = std::min(b[1], x1), by0 = std::max(b[2], y0), by1 = std::min(b[3], y1);
  if (bx0 > bx1 || by0 > by1) return false;
  en.g0 = (bx0 - x0) / kLanes;
  en.g1 = (bx1 - x0) / kLanes;
  en.r0 = by0 - y0;
  en.r1 = by1 - y0;
  return true;
}
constexpr int kPrefetch = 4;  // entries ahead

// Forward, float32, D in {1, 3, 4}: entries front to back; per pixel group the transmittance in double (as
// forward_impl), its float rounding, the colour accumulators, the last entry and the done lanes.
template <int D>
void forward_tiles(const Params<float>& p, float* render, float* alphas, float* tfinal, int32_t* last_out) {
  const int64_t T = static_cast<int64_t>(p.tw) * p.th;
  const int64_t ntiles = p.C * T;
  const float amin = static_cast<float>(kAlphaMin), amax = static_cast<float>(kAlphaMax),
              teps = static_cast<float>(kTEps);
  const int GPR = (p.ts + kLanes - 1) / kLanes;
  studio_parallel::run(ntiles, [&](const Claim& next) {
    const size_t maxg = static_cast<size_t>(GPR) * p.ts;
    std::vector<double> Tdv(maxg * kLanes);
    std::vector<float> Tfv(maxg * kLanes), accv(maxg * D * kLanes);
    std::vector<int32_t> lastv(maxg * kLanes), donev(maxg * kLanes);
    std::vector<uint8_t> gdone(maxg);
    for (int64_t t; next(t);) {
      const int64_t cam = t / T, tt = t % T;
      const int tyi = static_cast<int>(tt / p.tw), txi = static_cast<int>(tt % p.tw);
      const int x0 = txi * p.ts, x1 = std::min(p.W, x0 + p.ts);
      const int y0 = tyi * p.ts, y1 = std::min(p.H, y0 + p.ts);
      const int bw = x1 - x0, bh = y1 - y0;
      const int ng = GPR * bh;
      const int64_t s = p.offsets[t], e = (t + 1 < ntiles) ? p.offsets[t + 1] : p.n_isect;
      const int64_t len = e - s;
      const int32_t* ids = p.flat + s;
      double* Td = Tdv.data();
      float* Tfa = Tfv.data();
      float* acca = accv.data();
      int32_t* lasta = lastv.data();
      int32_t* donea = donev.data();
      std::fill(Td, Td + ng * kLanes, 1.0);
      std::fill(Tfa, Tfa + ng * kLanes, 1.0f);
      std::fill(acca, acca + ng * D * kLanes, 0.0f);
      std::fill(lasta, lasta + ng * kLanes, 0);
      int ngdone = 0;
      for (int g = 0; g < ng; ++g) {
        const int lx0 = (g % GPR) * kLanes;
        vstore(donea + g * kLanes, (lx0 + vi8{0, 1, 2, 3, 4, 5, 6, 7}) >= bw);  // lanes past the image edge
        gdone[g] = lx0 >= bw;
        ngdone += gdone[g];
      }
      for (int64_t k = 0; k < len && ngdone < ng; ++k) {
        if (k + kPrefetch < len) __builtin_prefetch(p.packed + static_cast<int64_t>(ids[k + kPrefetch]) * kPack);
        Entry en;
        if (!entry_box(p, ids[k], x0, x1 - 1, y0, y1 - 1, en)) continue;
        const float* R = en.R;
        const float mxk = R[0], myk = R[1], ak = R[2], bk = R[3], ck_ = R[4], ok = R[5], thk = R[6];
        const float* ck = R + 11;
        const vi8 kk = vsplati(static_cast<int32_t>(k + 1));
        for (int r = en.r0; r <= en.r1; ++r) {
          const float dy = (static_cast<float>(y0 + r) + 0.5f) - myk;
          const float cdy = ck_ * dy * dy, bdy = bk * dy;
          for (int gi = en.g0; gi <= en.g1; ++gi) {
            const int g = r * GPR + gi;
            if (gdone[g]) continue;
            const vf8 dx = ((static_cast<float>(x0 + gi * kLanes) + 0.5f) + kIota) - mxk;
            const vf8 sigma = 0.5f * (ak * dx * dx + cdy) + bdy * dx;
            const vf8 oG = ok * vexp8(-sigma);
            const vf8 alpha = oG > amax ? vsplat(amax) : oG;
            vi8 done = vload<vi8>(donea + g * kLanes);
            const vi8 valid = ~done & (sigma >= 0.0f) & (sigma <= thk) & (alpha >= amin);
            if (!vany(valid)) continue;
            double* Tg = Td + g * kLanes;
            const vd4 Tlo = vload<vd4>(Tg), Thi = vload<vd4>(Tg + 4);
            const vf8 Tf8 = vload<vf8>(Tfa + g * kLanes);
            // lanes that do not blend multiply T by exactly 1; terminating lanes (rare) are restored below
            const vf8 omv = valid ? 1.0f - alpha : vsplat(1.0f);
            vd4 nTl = Tlo * lo_d(omv), nTh = Thi * hi_d(omv);
            vf8 nTf = join_f(nTl, nTh);
            const vi8 term = valid & (nTf <= teps);
            vi8 add = valid;
            if (vany(term)) {  // early termination: the entry is not added, the pixel stops
              add = valid & ~term;
              nTl = lo_m(term) ? Tlo : nTl;
              nTh = hi_m(term) ? Thi : nTh;
              nTf = term ? Tf8 : nTf;
              done |= term;
              vstore(donea + g * kLanes, done);
              if (vall(done)) {  // every pixel of the group has terminated
                gdone[g] = 1;
                ++ngdone;
              }
            }
            const vf8 w = add ? alpha * Tf8 : vsplat(0.0f);
            float* ag = acca + g * D * kLanes;
            for (int d = 0; d < D; ++d) vstore(ag + d * kLanes, vload<vf8>(ag + d * kLanes) + w * ck[d]);
            vstore(Tg, nTl);
            vstore(Tg + 4, nTh);
            vstore(Tfa + g * kLanes, nTf);
            vstore(lasta + g * kLanes, add ? kk : vload<vi8>(lasta + g * kLanes));
          }
        }
      }
      const float* bgc = p.bg ? p.bg + cam * D : nullptr;
      for (int ly = 0; ly < bh; ++ly) {
        for (int gi = 0; gi < GPR; ++gi) {
          const int g = ly * GPR + gi, lx0 = gi * kLanes;
          for (int l = 0; l < kLanes && lx0 + l < bw; ++l) {
            const int64_t pix = (cam * p.H + (y0 + ly)) * p.W + (x0 + lx0 + l);
            const float Tf = Tfa[g * kLanes + l];
            float* out = render + pix * D;
            for (int d = 0; d < D; ++d) out[d] = acca[(g * D + d) * kLanes + l] + (bgc ? Tf * bgc[d] : 0.0f);
            alphas[pix] = 1.0f - Tf;
            tfinal[pix] = Tf;
            last_out[pix] = lasta[g * kLanes + l];
          }
        }
      }
    }
  });
}

// Backward, float32, D in {1, 3, 4}: entries back to front from the tile's last consumed one; per pixel group the
// state (T recovered as T / (1 - alpha), suffix sum v, the T_final term, last, d loss / d colour) in 8 float lanes;
// each entry's terms are summed over its groups (in group order) in registers, then over the lanes (in double), and
// written once into the entry's record of the per-intersection buffer: no atomics, deterministic.
// (The reference backward_impl keeps T and v in double; on the 10k-Gaussian benchmark scene the two agree to
// 1e-6 of each gradient's largest entry, against the 1e-4 the parity tests allow.)
template <int D>
void backward_tiles(const Params<float>& p, const float* g_render, const float* g_alpha, const float* tfinal,
                    const int32_t* last_in, float* partial, float* bg_partial) {
  constexpr int Q = kRec + D;  // quantities per entry
  constexpr int SV = 4 + D;    // state vectors per group: T, v, tail, last (int bits), d loss / d colour (D)
  const int64_t T = static_cast<int64_t>(p.tw) * p.th;
  const int64_t ntiles = p.C * T;
  const float amin = static_cast<float>(kAlphaMin), amax = static_cast<float>(kAlphaMax);
  const int GPR = (p.ts + kLanes - 1) / kLanes;
  studio_parallel::run(ntiles, [&](const Claim& next) {
    const size_t maxg = static_cast<size_t>(GPR) * p.ts;
    std::vector<float> st(maxg * SV * kLanes);
    std::vector<int32_t> glast(maxg);
    for (int64_t t; next(t);) {
      const int64_t cam = t / T, tt = t % T;
      const int tyi = static_cast<int>(tt / p.tw), txi = static_cast<int>(tt % p.tw);
      const int x0 = txi * p.ts, x1 = std::min(p.W, x0 + p.ts);
      const int y0 = tyi * p.ts, y1 = std::min(p.H, y0 + p.ts);
      const int bw = x1 - x0, bh = y1 - y0;
      const int ng = GPR * bh;
      const int64_t s = p.offsets[t], e = (t + 1 < ntiles) ? p.offsets[t + 1] : p.n_isect;
      const int64_t len = e - s;
      const int32_t* ids = p.flat + s;
      const float* bgc = p.bg ? p.bg + cam * D : nullptr;
      float* bgp = bg_partial ? bg_partial + t * D : nullptr;
      // per-lane state from the forward pass; lanes past the image edge get last = 0 (never contribute)
      int32_t maxlast = 0;
      for (int g = 0; g < ng; ++g) {
        const int ly = g / GPR, lx0 = (g % GPR) * kLanes;
        float* sg = st.data() + static_cast<size_t>(g) * SV * kLanes;
        std::fill(sg, sg + SV * kLanes, 0.0f);
        int32_t lb[kLanes] = {0};
        int32_t gl = 0;
        for (int l = 0; l < kLanes && lx0 + l < bw; ++l) {
          const int64_t pix = (cam * p.H + (y0 + ly)) * p.W + (x0 + lx0 + l);
          const float Tf = tfinal[pix];
          lb[l] = last_in[pix];
          gl = std::max(gl, lb[l]);
          double bgdot = 0;
          for (int d = 0; d < D; ++d) {
            const float gd = g_render[pix * D + d];
            sg[(4 + d) * kLanes + l] = gd;
            if (bgc) bgdot += static_cast<double>(gd) * bgc[d];
          }
          sg[l] = Tf;
          sg[2 * kLanes + l] = static_cast<float>(static_cast<double>(Tf) * (bgdot - static_cast<double>(g_alpha[pix])));
        }
        std::memcpy(sg + 3 * kLanes, lb, sizeof(lb));
        glast[g] = gl;
        maxlast = std::max(maxlast, gl);
      }
      if (bgc) {  // d loss / d background, pixels in row order as backward_impl
        for (int py = y0; py < y1; ++py)
          for (int px = x0; px < x1; ++px) {
            const int64_t pix = (cam * p.H + py) * p.W + px;
            const double Tn = tfinal[pix];
            for (int d = 0; d < D; ++d) bgp[d] += static_cast<float>(Tn * g_render[pix * D + d]);
          }
      }
      float* part = partial + s * Q;
      if (maxlast < len) std::fill(part + maxlast * Q, part + len * Q, 0.0f);
      for (int64_t k = maxlast - 1; k >= 0; --k) {
        if (k >= kPrefetch) __builtin_prefetch(p.packed + static_cast<int64_t>(ids[k - kPrefetch]) * kPack);
        float* rec = part + k * Q;
        Entry en;
        if (!entry_box(p, ids[k], x0, x1 - 1, y0, y1 - 1, en)) {
          std::fill(rec, rec + Q, 0.0f);
          continue;
        }
        const float* R = en.R;
        const float mxk = R[0], myk = R[1], a = R[2], b = R[3], c = R[4], ok = R[5], thk = R[6];
        const float* ck = R + 11;
        vf8 q[Q];
        for (int i = 0; i < Q; ++i) q[i] = vsplat(0.0f);
        const int32_t kk = static_cast<int32_t>(k);
        for (int r = en.r0; r <= en.r1; ++r) {
          const float dyf = (static_cast<float>(y0 + r) + 0.5f) - myk;
          const float cdy = c * dyf * dyf, bdy = b * dyf;
          for (int gi = en.g0; gi <= en.g1; ++gi) {
            const int g = r * GPR + gi;
            if (kk >= glast[g]) continue;
            float* sg = st.data() + static_cast<size_t>(g) * SV * kLanes;
            const vf8 dx = ((static_cast<float>(x0 + gi * kLanes) + 0.5f) + kIota) - mxk;
            const vf8 sigma = 0.5f * (a * dx * dx + cdy) + bdy * dx;
            const vf8 G = vexp8(-sigma);
            const vf8 oG = ok * G;
            const vf8 alpha = oG > amax ? vsplat(amax) : oG;
            const vi8 last = vload<vi8>(sg + 3 * kLanes);
            const vi8 valid = (kk < last) & (sigma >= 0.0f) & (sigma <= thk) & (alpha >= amin);
            if (!vany(valid)) continue;
            const vf8 T8 = vload<vf8>(sg), v8 = vload<vf8>(sg + kLanes), tail8 = vload<vf8>(sg + 2 * kLanes);
            vf8 gf[D];
            for (int d = 0; d < D; ++d) gf[d] = vload<vf8>(sg + (4 + d) * kLanes);
            // transmittance recovery, suffix sums and d loss / d alpha, 8 float lanes
            const vf8 ra = valid ? 1.0f / (1.0f - alpha) : vsplat(0.0f);
            const vf8 Ti = T8 * ra;
            const vf8 w = alpha * Ti;
            vf8 dot = vsplat(0.0f);
            for (int d = 0; d < D; ++d) dot += gf[d] * ck[d];
            const vf8 dLda = dot * Ti - (v8 + tail8) * ra;
            vstore(sg + kLanes, v8 + dot * w);
            vstore(sg, valid ? Ti : T8);
            // the per-lane gradient terms, summed over the entry's groups
            const vi8 geo = valid & (oG <= amax);  // the ALPHA_MAX clamp blocks the gradient where it is active
            const vf8 dLds = geo ? -dLda * oG : vsplat(0.0f);
            q[0] += -dLds * (a * dx + bdy);
            q[1] += -dLds * (c * dyf + b * dx);
            q[2] += dLds * 0.5f * dx * dx;
            q[3] += dLds * dx * dyf;
            q[4] += dLds * (0.5f * dyf * dyf);
            q[5] += geo ? dLda * G : vsplat(0.0f);
            for (int d = 0; d < D; ++d) q[kRec + d] += w * gf[d];
          }
        }
        for (int i = 0; i < Q; ++i) {  // the lane sum in double, pairwise: halves, then pairs, then the two
          const vd4 h = lo_d(q[i]) + hi_d(q[i]);
          rec[i] = static_cast<float>((h[0] + h[2]) + (h[1] + h[3]));
        }
      }
    }
  });
}

// The packed records (see kPack in rasterize.cpp), one per (camera, Gaussian), from the projection's outputs.
void pack_gaussians(const float* m2, const float* cn, const float* oc, const float* ft, const double* ep,
                    int64_t CN, int64_t D, int W, int H, float* out) {
  studio_parallel::run((CN + 1023) / 1024, [&](const Claim& next) {
    for (int64_t ch; next(ch);) {
      for (int64_t g = ch * 1024; g < std::min(CN, (ch + 1) * 1024); ++g) {
        float* R = out + g * kPack;
        const float mx = m2[g * 2], my = m2[g * 2 + 1], a = cn[g * 3], b = cn[g * 3 + 1], c = cn[g * 3 + 2];
        R[0] = mx; R[1] = my; R[2] = a; R[3] = b; R[4] = c; R[5] = oc[g];
        const double thr = ep[g * 3];
        R[6] = static_cast<float>(thr);
        int32_t box[4] = {0, W - 1, 0, H - 1};
        if (thr < 0) {
          box[0] = 1; box[1] = 0;
        } else if (std::isfinite(ep[g * 3 + 1])) {  // (then det > 0, a > 0, thr and the mean finite)
          double ex = ep[g * 3 + 1], ey = ep[g * 3 + 2];
          const double ad = a, bd = b, cd = c, det = ad * cd - bd * bd;
          if (ad * cd <= 1e6 * det) {
            ex = std::sqrt(2.0 * thr * cd / det) + 1e-3;
            ey = std::sqrt(2.0 * thr * ad / det) + 1e-3;
          }
          const double jx0 = std::max(std::ceil(mx - ex - 0.5), 0.0);
          const double jx1 = std::min(std::floor(mx + ex - 0.5), static_cast<double>(W - 1));
          const double jy0 = std::max(std::ceil(my - ey - 0.5), 0.0);
          const double jy1 = std::min(std::floor(my + ey - 0.5), static_cast<double>(H - 1));
          if (jx0 > jx1 || jy0 > jy1) {
            box[0] = 1; box[1] = 0;
          } else {
            box[0] = static_cast<int32_t>(jx0); box[1] = static_cast<int32_t>(jx1);
            box[2] = static_cast<int32_t>(jy0); box[3] = static_cast<int32_t>(jy1);
          }
        }
        std::memcpy(R + 7, box, sizeof(box));
        for (int64_t d = 0; d < kPack - 11; ++d) R[11 + d] = d < D ? ft[g * D + d] : 0.0f;
      }
    }
  });
}
