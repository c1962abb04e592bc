// Native CPU multi-resolution hash-grid encoding (Instant-NGP), the kernel behind
// studio.students.fields.HashGridEncoding(backend="native"); the torch formulation in that class is the
// reference this file is tested against (tests/test_hashgrid_native.py).
//
// Per point p in [0,1]^3 (clamped by the caller) and level l with N_l cells per axis:
//   pos = p * N_l (in the input dtype, as torch), cell = min(floor(pos), N_l - 1), f = pos - cell,
//   corner (bx,by,bz), c = 4 bx + 2 by + bz, weight w_c = (a_x[bx] * a_y[by]) * a_z[bz] with
//   a[0] = 1 - f, a[1] = f, and table row
//     dense level  (N_l+1)^3 <= T:  offset_l + x + y (N_l+1) + z (N_l+1)^2
//     hashed level:                 offset_l + ((x * 1) xor (y * 2654435761) xor (z * 805459861)) mod T
//   out[n, l, :] = sum_c w_c E[row_c, :]    (levels >= n_active output 0: the progressive band)
//
// Derivatives (trilinear interpolation is linear in E and multilinear in f; d f / d p = N_l):
//   backward          gE[row_c] += w_c g[n,l]                       (scatter)
//                     gp[n, a]  += N_l sum_f g[n,l,f] sum_c dw_c/df_a E[row_c, f]
//   double_backward   upstream U = d/d gE (rows), V = d/d gp ([N,3]):
//                     g_g[n,l,f] = sum_c w_c U[row_c,f] + N_l sum_a V_a sum_c dw_c/df_a E[row_c,f]
//                     gE2[row_c,f] += N_l g[n,l,f] sum_a V_a dw_c/df_a
//                     gp2[n,b] += N_l sum_c dw_c/df_b sum_f U[row_c,f] g[n,l,f]
//                               + N_l^2 sum_{a != b} V_a sum_c d2w_c/(df_a df_b) sum_f g[n,l,f] E[row_c,f]
//   (d2w/df_a^2 = 0). The double backward is what NeuS's eikonal loss (and NeRF normal losses) need:
//   the gradient of d features / d points w.r.t. the embeddings, the upstream gradients and the points.
//
// Threading / determinism: per-point outputs (out, gp, g_g, gp2) run in parallel over (level, point chunk)
// or point chunks; table gradients (gE, gE2) run in parallel over levels: every level owns a disjoint
// row range, so each row is accumulated by one thread in point order -> race free and bit-identical
// for any thread count, with no per-thread copies of the table. Threads: studio_parallel::run
// (parallel.h): dynamic over items on torch's intra-op team.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 2048;

using studio_parallel::Claim;

struct Meta {
  std::vector<int64_t> res, offsets, dense;
  int64_t log2_size = 0, n_active = 0, n_levels = 0, n_feat = 0;
};

template <typename T>
struct Cell {
  int64_t row[8];
  T a[3][2];  // per-axis weights (1 - f, f)
};

template <typename T>
inline void make_cell(const T* p, int64_t res, bool dense, int64_t offset, uint64_t mask, Cell<T>& c) {
  int64_t ci[3];
  const T r = static_cast<T>(res);
  for (int a = 0; a < 3; ++a) {
    const T pos = p[a] * r;
    const T fl = std::floor(pos);
    int64_t k = (fl >= T(0)) ? static_cast<int64_t>(fl) : 0;  // NaN / negative guard (caller clamps)
    k = std::min(k, res - 1);
    const T f = pos - static_cast<T>(k);
    ci[a] = k;
    c.a[a][0] = T(1) - f;
    c.a[a][1] = f;
  }
  if (dense) {
    const int64_t v = res + 1;
    for (int bx = 0; bx < 2; ++bx)
      for (int by = 0; by < 2; ++by)
        for (int bz = 0; bz < 2; ++bz)
          c.row[bx * 4 + by * 2 + bz] = offset + (ci[0] + bx) + (ci[1] + by) * v + (ci[2] + bz) * v * v;
  } else {
    uint64_t hx[2], hy[2], hz[2];
    for (int b = 0; b < 2; ++b) {
      hx[b] = static_cast<uint64_t>(ci[0] + b) * 1ull;
      hy[b] = static_cast<uint64_t>(ci[1] + b) * 2654435761ull;
      hz[b] = static_cast<uint64_t>(ci[2] + b) * 805459861ull;
    }
    for (int bx = 0; bx < 2; ++bx)
      for (int by = 0; by < 2; ++by)
        for (int bz = 0; bz < 2; ++bz)
          c.row[bx * 4 + by * 2 + bz] = offset + static_cast<int64_t>((hx[bx] ^ hy[by] ^ hz[bz]) & mask);
  }
}

// weight of corner c and its first derivatives d w / d f_a
template <typename T>
inline void weights(const Cell<T>& c, T w[8], T dw[8][3]) {
  for (int bx = 0; bx < 2; ++bx)
    for (int by = 0; by < 2; ++by)
      for (int bz = 0; bz < 2; ++bz) {
        const int k = bx * 4 + by * 2 + bz;
        const T sx = bx ? T(1) : T(-1), sy = by ? T(1) : T(-1), sz = bz ? T(1) : T(-1);
        w[k] = (c.a[0][bx] * c.a[1][by]) * c.a[2][bz];
        dw[k][0] = sx * c.a[1][by] * c.a[2][bz];
        dw[k][1] = c.a[0][bx] * sy * c.a[2][bz];
        dw[k][2] = c.a[0][bx] * c.a[1][by] * sz;
      }
}

// d2 w_c / (d f_a d f_b) for the three pairs (xy, xz, yz)
template <typename T>
inline void second(const Cell<T>& c, T d2[8][3]) {
  for (int bx = 0; bx < 2; ++bx)
    for (int by = 0; by < 2; ++by)
      for (int bz = 0; bz < 2; ++bz) {
        const int k = bx * 4 + by * 2 + bz;
        const T sx = bx ? T(1) : T(-1), sy = by ? T(1) : T(-1), sz = bz ? T(1) : T(-1);
        d2[k][0] = sx * sy * c.a[2][bz];
        d2[k][1] = sx * c.a[1][by] * sz;
        d2[k][2] = c.a[0][bx] * sy * sz;
      }
}

template <typename T, int FT>
void forward_impl(const Meta& m, const T* p, const T* E, T* out, int64_t N) {
  const int64_t F = FT > 0 ? FT : m.n_feat, L = m.n_levels;
  const uint64_t mask = (1ull << m.log2_size) - 1;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  const int64_t work = L * n_chunks;
  studio_parallel::run(work, [&](const Claim& next) {
    for (int64_t item; next(item);) {
      const int64_t l = item / n_chunks, ch = item % n_chunks;
      const int64_t n0 = ch * kChunk, n1 = std::min(N, n0 + kChunk);
      const bool active = l < m.n_active;
      Cell<T> c;
      T w[8], dw[8][3];
      for (int64_t n = n0; n < n1; ++n) {
        T* o = out + n * L * F + l * F;
        if (!active) {
          for (int64_t f = 0; f < F; ++f) o[f] = T(0);
          continue;
        }
        make_cell<T>(p + n * 3, m.res[l], m.dense[l] != 0, m.offsets[l], mask, c);
        weights<T>(c, w, dw);
        for (int64_t f = 0; f < F; ++f) o[f] = T(0);
        for (int k = 0; k < 8; ++k) {
          const T* e = E + c.row[k] * F;
          for (int64_t f = 0; f < F; ++f) o[f] += w[k] * e[f];
        }
      }
    }
  });
}

// gE: parallel over levels (disjoint row ranges), points in order.
template <typename T, int FT>
void backward_table(const Meta& m, const T* g, const T* p, T* gE, int64_t N) {
  const int64_t F = FT > 0 ? FT : m.n_feat, L = m.n_levels;
  const uint64_t mask = (1ull << m.log2_size) - 1;
  studio_parallel::run(m.n_active, [&](const Claim& next) {
    for (int64_t l; next(l);) {
      Cell<T> c;
      T w[8], dw[8][3];
      for (int64_t n = 0; n < N; ++n) {
        make_cell<T>(p + n * 3, m.res[l], m.dense[l] != 0, m.offsets[l], mask, c);
        weights<T>(c, w, dw);
        const T* gg = g + n * L * F + l * F;
        for (int k = 0; k < 8; ++k) {
          T* e = gE + c.row[k] * F;
          for (int64_t f = 0; f < F; ++f) e[f] += w[k] * gg[f];
        }
      }
    }
  });
}

// gp: parallel over point chunks, levels in order.
template <typename T, int FT>
void backward_points(const Meta& m, const T* g, const T* p, const T* E, T* gp, int64_t N) {
  const int64_t F = FT > 0 ? FT : m.n_feat, L = m.n_levels;
  const uint64_t mask = (1ull << m.log2_size) - 1;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  studio_parallel::run(n_chunks, [&](const Claim& next) {
    for (int64_t ch; next(ch);) {
      const int64_t n0 = ch * kChunk, n1 = std::min(N, n0 + kChunk);
      Cell<T> c;
      T w[8], dw[8][3];
      for (int64_t n = n0; n < n1; ++n) {
        T acc[3] = {T(0), T(0), T(0)};
        for (int64_t l = 0; l < m.n_active; ++l) {
          make_cell<T>(p + n * 3, m.res[l], m.dense[l] != 0, m.offsets[l], mask, c);
          weights<T>(c, w, dw);
          const T* gg = g + n * L * F + l * F;
          T s[3] = {T(0), T(0), T(0)};
          for (int k = 0; k < 8; ++k) {
            const T* e = E + c.row[k] * F;
            T ge = T(0);
            for (int64_t f = 0; f < F; ++f) ge += gg[f] * e[f];
            for (int a = 0; a < 3; ++a) s[a] += dw[k][a] * ge;
          }
          const T r = static_cast<T>(m.res[l]);
          for (int a = 0; a < 3; ++a) acc[a] += r * s[a];
        }
        for (int a = 0; a < 3; ++a) gp[n * 3 + a] = acc[a];
      }
    }
  });
}

// g_g and gp2 (per point), U = d/d gE may be null, V = d/d gp may be null.
template <typename T, int FT>
void double_points(const Meta& m, const T* g, const T* p, const T* E, const T* U, const T* V, T* g_g, T* gp2,
                   int64_t N) {
  const int64_t F = FT > 0 ? FT : m.n_feat, L = m.n_levels;
  const uint64_t mask = (1ull << m.log2_size) - 1;
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  static const int pa[3] = {0, 0, 1}, pb[3] = {1, 2, 2};  // pairs of d2
  studio_parallel::run(n_chunks, [&](const Claim& next) {
    for (int64_t ch; next(ch);) {
      const int64_t n0 = ch * kChunk, n1 = std::min(N, n0 + kChunk);
      Cell<T> c;
      T w[8], dw[8][3], d2[8][3];
      for (int64_t n = n0; n < n1; ++n) {
        T acc[3] = {T(0), T(0), T(0)};
        const T* v = V ? V + n * 3 : nullptr;
        for (int64_t l = 0; l < L; ++l) {
          T* ogg = g_g ? g_g + n * L * F + l * F : nullptr;
          if (l >= m.n_active) {
            if (ogg)
              for (int64_t f = 0; f < F; ++f) ogg[f] = T(0);
            continue;
          }
          make_cell<T>(p + n * 3, m.res[l], m.dense[l] != 0, m.offsets[l], mask, c);
          weights<T>(c, w, dw);
          const T r = static_cast<T>(m.res[l]);
          const T* gg = g + n * L * F + l * F;
          // sum_a V_a dw_c/df_a per corner
          T vd[8];
          for (int k = 0; k < 8; ++k) vd[k] = v ? (v[0] * dw[k][0] + v[1] * dw[k][1] + v[2] * dw[k][2]) : T(0);
          if (ogg) {
            for (int64_t f = 0; f < F; ++f) ogg[f] = T(0);
            for (int k = 0; k < 8; ++k) {
              const T* u = U ? U + c.row[k] * F : nullptr;
              const T* e = E + c.row[k] * F;
              for (int64_t f = 0; f < F; ++f) {
                T val = v ? r * vd[k] * e[f] : T(0);
                if (u) val += w[k] * u[f];
                ogg[f] += val;
              }
            }
          }
          if (gp2) {
            T s[3] = {T(0), T(0), T(0)};
            if (U) {
              for (int k = 0; k < 8; ++k) {
                const T* u = U + c.row[k] * F;
                T ug = T(0);
                for (int64_t f = 0; f < F; ++f) ug += u[f] * gg[f];
                for (int a = 0; a < 3; ++a) s[a] += dw[k][a] * ug;
              }
            }
            for (int a = 0; a < 3; ++a) acc[a] += r * s[a];
            if (v) {
              second<T>(c, d2);
              T t[3] = {T(0), T(0), T(0)};
              for (int k = 0; k < 8; ++k) {
                const T* e = E + c.row[k] * F;
                T ge = T(0);
                for (int64_t f = 0; f < F; ++f) ge += gg[f] * e[f];
                for (int q = 0; q < 3; ++q) {
                  const T h = d2[k][q] * ge;
                  t[pb[q]] += v[pa[q]] * h;  // d/df_b of V_a dw/df_a, b = pb, a = pa
                  t[pa[q]] += v[pb[q]] * h;
                }
              }
              for (int a = 0; a < 3; ++a) acc[a] += r * r * t[a];
            }
          }
        }
        if (gp2)
          for (int a = 0; a < 3; ++a) gp2[n * 3 + a] = acc[a];
      }
    }
  });
}

// gE2 (table rows), parallel over levels.
template <typename T, int FT>
void double_table(const Meta& m, const T* g, const T* p, const T* V, T* gE2, int64_t N) {
  const int64_t F = FT > 0 ? FT : m.n_feat, L = m.n_levels;
  const uint64_t mask = (1ull << m.log2_size) - 1;
  studio_parallel::run(m.n_active, [&](const Claim& next) {
    for (int64_t l; next(l);) {
      Cell<T> c;
      T w[8], dw[8][3];
      const T r = static_cast<T>(m.res[l]);
      for (int64_t n = 0; n < N; ++n) {
        make_cell<T>(p + n * 3, m.res[l], m.dense[l] != 0, m.offsets[l], mask, c);
        weights<T>(c, w, dw);
        const T* v = V + n * 3;
        const T* gg = g + n * L * F + l * F;
        for (int k = 0; k < 8; ++k) {
          const T s = r * (v[0] * dw[k][0] + v[1] * dw[k][1] + v[2] * dw[k][2]);
          T* e = gE2 + c.row[k] * F;
          for (int64_t f = 0; f < F; ++f) e[f] += s * gg[f];
        }
      }
    }
  });
}

Meta make_meta(const at::Tensor& p, const at::Tensor& E, const std::vector<int64_t>& res,
               const std::vector<int64_t>& offsets, const std::vector<int64_t>& dense, int64_t log2_size,
               int64_t n_active) {
  TORCH_CHECK(p.device().is_cpu() && E.device().is_cpu(), "native hash grid: inputs must be CPU tensors");
  TORCH_CHECK(p.is_contiguous() && E.is_contiguous(), "native hash grid: inputs must be contiguous");
  TORCH_CHECK(p.dim() == 2 && p.size(1) == 3, "native hash grid: points must be [N,3]");
  TORCH_CHECK(E.dim() == 2 && E.size(1) >= 1, "native hash grid: embeddings must be [rows,F]");
  TORCH_CHECK(p.scalar_type() == E.scalar_type(), "native hash grid: points and embeddings must share a dtype");
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
              "native hash grid: dtype must be float32 or float64");
  const int64_t L = static_cast<int64_t>(res.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(offsets.size()) == L && static_cast<int64_t>(dense.size()) == L,
              "native hash grid: resolutions, offsets and dense flags must have one entry per level");
  TORCH_CHECK(log2_size >= 1 && log2_size <= 30, "native hash grid: log2 table size out of range");
  const int64_t T = int64_t(1) << log2_size, rows = E.size(0);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(res[l] >= 1, "native hash grid: resolutions must be >= 1");
    const int64_t size = dense[l] ? (res[l] + 1) * (res[l] + 1) * (res[l] + 1) : T;
    TORCH_CHECK(!dense[l] || size <= T, "native hash grid: a dense level does not fit the table size");
    TORCH_CHECK(offsets[l] >= 0 && offsets[l] + size <= rows, "native hash grid: level ", l,
                " exceeds the embedding table");
  }
  Meta m;
  m.res = res;
  m.offsets = offsets;
  m.dense = dense;
  m.log2_size = log2_size;
  m.n_levels = L;
  m.n_active = std::max<int64_t>(0, std::min(n_active, L));
  m.n_feat = E.size(1);
  return m;
}

#define HG_DISPATCH_F(F, NAME, ...)        \
  switch (F) {                             \
    case 1: NAME<scalar_t, 1>(__VA_ARGS__); break; \
    case 2: NAME<scalar_t, 2>(__VA_ARGS__); break; \
    case 4: NAME<scalar_t, 4>(__VA_ARGS__); break; \
    case 8: NAME<scalar_t, 8>(__VA_ARGS__); break; \
    default: NAME<scalar_t, 0>(__VA_ARGS__); break; \
  }

void check_g(const at::Tensor& g, const at::Tensor& p, const Meta& m) {
  TORCH_CHECK(g.is_contiguous() && g.scalar_type() == p.scalar_type() && g.dim() == 2 && g.size(0) == p.size(0) &&
                  g.size(1) == m.n_levels * m.n_feat,
              "native hash grid: grad_output must be contiguous [N, levels * features] of the points' dtype");
}

at::Tensor hash_forward(const at::Tensor& p, const at::Tensor& E, std::vector<int64_t> res,
                        std::vector<int64_t> offsets, std::vector<int64_t> dense, int64_t log2_size,
                        int64_t n_active) {
  const Meta m = make_meta(p, E, res, offsets, dense, log2_size, n_active);
  const int64_t N = p.size(0);
  at::Tensor out = at::empty({N, m.n_levels * m.n_feat}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hash_forward", [&] {
    HG_DISPATCH_F(m.n_feat, forward_impl, m, p.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(),
                  out.data_ptr<scalar_t>(), N);
  });
  return out;
}

std::vector<at::Tensor> hash_backward(const at::Tensor& g, const at::Tensor& p, const at::Tensor& E,
                                      std::vector<int64_t> res, std::vector<int64_t> offsets,
                                      std::vector<int64_t> dense, int64_t log2_size, int64_t n_active,
                                      bool need_points, bool need_table) {
  const Meta m = make_meta(p, E, res, offsets, dense, log2_size, n_active);
  check_g(g, p, m);
  const int64_t N = p.size(0);
  at::Tensor gp = need_points ? at::empty({N, 3}, p.options()) : at::empty({0}, p.options());
  at::Tensor gE = need_table ? at::zeros_like(E) : at::empty({0}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hash_backward", [&] {
    if (need_table)
      HG_DISPATCH_F(m.n_feat, backward_table, m, g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                    gE.data_ptr<scalar_t>(), N);
    if (need_points)
      HG_DISPATCH_F(m.n_feat, backward_points, m, g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                    E.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(), N);
  });
  return {gp, gE};
}

std::vector<at::Tensor> hash_double_backward(const at::Tensor& g, const at::Tensor& p, const at::Tensor& E,
                                             const at::Tensor& gg_points, const at::Tensor& gg_table,
                                             std::vector<int64_t> res, std::vector<int64_t> offsets,
                                             std::vector<int64_t> dense, int64_t log2_size, int64_t n_active,
                                             bool need_g, bool need_points, bool need_table) {
  const Meta m = make_meta(p, E, res, offsets, dense, log2_size, n_active);
  check_g(g, p, m);
  const int64_t N = p.size(0);
  const bool has_v = gg_points.numel() > 0, has_u = gg_table.numel() > 0;
  if (has_v)
    TORCH_CHECK(gg_points.is_contiguous() && gg_points.scalar_type() == p.scalar_type() &&
                    gg_points.sizes() == p.sizes(),
                "native hash grid: grad of grad_points must be contiguous [N,3]");
  if (has_u)
    TORCH_CHECK(gg_table.is_contiguous() && gg_table.scalar_type() == p.scalar_type() &&
                    gg_table.sizes() == E.sizes(),
                "native hash grid: grad of grad_embeddings must be contiguous [rows,F]");
  at::Tensor g_g = need_g ? at::empty_like(g) : at::empty({0}, p.options());
  at::Tensor gp2 = need_points ? at::empty({N, 3}, p.options()) : at::empty({0}, p.options());
  at::Tensor gE2 = need_table ? at::zeros_like(E) : at::empty({0}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hash_double_backward", [&] {
    const scalar_t* U = has_u ? gg_table.data_ptr<scalar_t>() : nullptr;
    const scalar_t* V = has_v ? gg_points.data_ptr<scalar_t>() : nullptr;
    if (need_g || need_points)
      HG_DISPATCH_F(m.n_feat, double_points, m, g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                    E.data_ptr<scalar_t>(), U, V, need_g ? g_g.data_ptr<scalar_t>() : nullptr,
                    need_points ? gp2.data_ptr<scalar_t>() : nullptr, N);
    if (need_table && has_v)
      HG_DISPATCH_F(m.n_feat, double_table, m, g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), V,
                    gE2.data_ptr<scalar_t>(), N);
  });
  return {g_g, gp2, gE2};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native CPU multi-resolution hash-grid encoding (forward, backward, double backward)";
  m.def("hash_forward", &hash_forward, "features [N, L*F]", py::arg("points"), py::arg("embeddings"),
        py::arg("resolutions"), py::arg("offsets"), py::arg("dense"), py::arg("log2_size"), py::arg("n_active"));
  m.def("hash_backward", &hash_backward, "(d points [N,3] | empty, d embeddings [rows,F] | empty)",
        py::arg("grad_out"), py::arg("points"), py::arg("embeddings"), py::arg("resolutions"), py::arg("offsets"),
        py::arg("dense"), py::arg("log2_size"), py::arg("n_active"), py::arg("need_points"), py::arg("need_table"));
  m.def("hash_double_backward", &hash_double_backward,
        "(d grad_out, d points, d embeddings) of the backward, given the gradients of its outputs",
        py::arg("grad_out"), py::arg("points"), py::arg("embeddings"), py::arg("gg_points"), py::arg("gg_table"),
        py::arg("resolutions"), py::arg("offsets"), py::arg("dense"), py::arg("log2_size"), py::arg("n_active"),
        py::arg("need_g"), py::arg("need_points"), py::arg("need_table"));
}
