// Native CPU triangle rasterizer: z-buffered face ids, perspective-correct barycentrics, depth, and
// the analytic backward of barycentrics/depth w.r.t. the screen-space vertices.
//
// Inputs are already projected (studio/render/mesh.py does the camera transform in torch, so autograd
// carries gradients on to vertices, viewmats and Ks): verts_screen [C,V,3] = (x_pix, y_pix, z_view),
// faces [F,3] int32. The per-pixel math lives in ../cuda/mesh_math.h and is shared with the CUDA
// kernels; the dense torch twin (studio/render/_mesh_torch.py) is what this file is tested against.
//
// Visibility rule (identical in every backend): a pixel takes, among the faces that cover its centre
// (eval_pixel), the one with the smallest depth; exact depth ties go to the smallest face index.
//
//   rasterize_forward   per camera: face boxes (face_rect), binned into 16x16 tiles in ascending face
//                       order (CSR lists); parallel over (camera, tile): every face of the tile's list
//                       is tested on the pixels of its box inside the tile against a tile z-buffer
//                       with a strict "<", so ties keep the earlier (smaller) face index.
//   rasterize_backward  parallel over pixels: per-pixel vertex gradients (backward_pixel) into a
//                       [C,H,W,9] buffer, then a serial, pixel-ordered scatter into [C,V,3] per
//                       camera (parallel over cameras): deterministic for any thread count.
// Threads: studio_parallel::run (parallel.h), dynamic over items on torch's intra-op team.
// Light includes (ATen + the pybind11 tensor casters), as in rasterize.cpp, to keep the first-use
// compile short.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../cuda/mesh_math.h"

namespace {

constexpr int kTile = 16;

using studio_parallel::Claim;

void check_inputs(const at::Tensor& vs, const at::Tensor& faces, int64_t width, int64_t height) {
  TORCH_CHECK(vs.device().is_cpu() && faces.device().is_cpu(), "native mesh rasterizer: inputs must be CPU tensors");
  TORCH_CHECK(vs.is_contiguous() && faces.is_contiguous(), "native mesh rasterizer: inputs must be contiguous");
  TORCH_CHECK(vs.dim() == 3 && vs.size(2) == 3, "native mesh rasterizer: verts_screen must be [C,V,3]");
  TORCH_CHECK(vs.scalar_type() == at::kFloat || vs.scalar_type() == at::kDouble,
              "native mesh rasterizer: verts_screen must be float32 or float64");
  TORCH_CHECK(faces.dim() == 2 && faces.size(1) == 3 && faces.scalar_type() == at::kInt,
              "native mesh rasterizer: faces must be int32 [F,3]");
  TORCH_CHECK(width > 0 && height > 0, "native mesh rasterizer: width and height must be positive");
  TORCH_CHECK(faces.size(0) < std::numeric_limits<int32_t>::max(), "native mesh rasterizer: too many faces");
  if (faces.numel() > 0) {
    const int32_t* f = faces.data_ptr<int32_t>();
    const auto mm = std::minmax_element(f, f + faces.numel());
    TORCH_CHECK(*mm.first >= 0 && *mm.second < vs.size(1), "native mesh rasterizer: face indices out of range");
  }
}

template <typename T>
void forward_impl(const T* vs, const int32_t* faces, int64_t C, int64_t V, int64_t F, int W, int H, T near_plane,
                  T far_plane, int32_t* fid, T* bary, T* depth) {
  const int tw = (W + kTile - 1) / kTile, th = (H + kTile - 1) / kTile;
  const int64_t T_per_cam = int64_t(tw) * th;
  // ---- per camera: face boxes and CSR tile lists (ascending face order inside every tile) ----
  std::vector<int32_t> rects(size_t(C * F) * 4);
  std::vector<uint8_t> ok(size_t(C * F));
  std::vector<std::vector<int64_t>> offsets(static_cast<size_t>(C));
  std::vector<std::vector<int32_t>> lists(static_cast<size_t>(C));
  studio_parallel::run(C, [&](const Claim& next) {
    for (int64_t c; next(c);) {
      const T* v = vs + c * V * 3;
      std::vector<int64_t>& off = offsets[size_t(c)];
      off.assign(size_t(T_per_cam) + 1, 0);
      for (int64_t f = 0; f < F; ++f) {
        const int32_t* fc = faces + f * 3;
        int32_t* r = rects.data() + (c * F + f) * 4;
        const bool good = studio_mesh::face_rect<T>(v + int64_t(fc[0]) * 3, v + int64_t(fc[1]) * 3,
                                                    v + int64_t(fc[2]) * 3, near_plane, W, H, r);
        ok[size_t(c * F + f)] = good ? 1 : 0;
        if (!good) continue;
        for (int ty = r[2] / kTile; ty <= r[3] / kTile; ++ty)
          for (int tx = r[0] / kTile; tx <= r[1] / kTile; ++tx) ++off[size_t(ty * tw + tx) + 1];
      }
      for (int64_t t = 0; t < T_per_cam; ++t) off[size_t(t) + 1] += off[size_t(t)];
      std::vector<int32_t>& lst = lists[size_t(c)];
      lst.resize(size_t(off[size_t(T_per_cam)]));
      std::vector<int64_t> fill(off.begin(), off.end() - 1);
      for (int64_t f = 0; f < F; ++f) {
        if (!ok[size_t(c * F + f)]) continue;
        const int32_t* r = rects.data() + (c * F + f) * 4;
        for (int ty = r[2] / kTile; ty <= r[3] / kTile; ++ty)
          for (int tx = r[0] / kTile; tx <= r[1] / kTile; ++tx) lst[size_t(fill[size_t(ty * tw + tx)]++)] = int32_t(f);
      }
    }
  });
  // ---- per (camera, tile): z-buffered coverage ----
  const int64_t n_jobs = C * T_per_cam;
  studio_parallel::run(n_jobs, [&](const Claim& next) {
    T zb[kTile * kTile];
    int32_t ib[kTile * kTile];
    T bb[kTile * kTile * 3];
    for (int64_t job; next(job);) {
      const int64_t c = job / T_per_cam, t = job % T_per_cam;
      const int tx = int(t % tw), ty = int(t / tw);
      const int x0 = tx * kTile, y0 = ty * kTile;
      const int x1 = std::min(W, x0 + kTile) - 1, y1 = std::min(H, y0 + kTile) - 1;
      for (int k = 0; k < kTile * kTile; ++k) {
        zb[k] = std::numeric_limits<T>::infinity();
        ib[k] = -1;
      }
      const T* v = vs + c * V * 3;
      const std::vector<int64_t>& off = offsets[size_t(c)];
      const std::vector<int32_t>& lst = lists[size_t(c)];
      for (int64_t e = off[size_t(t)]; e < off[size_t(t) + 1]; ++e) {
        const int32_t f = lst[size_t(e)];
        const int32_t* fc = faces + int64_t(f) * 3;
        const int32_t* r = rects.data() + (c * F + f) * 4;
        const T* a = v + int64_t(fc[0]) * 3;
        const T* b = v + int64_t(fc[1]) * 3;
        const T* cc = v + int64_t(fc[2]) * 3;
        const int px0 = std::max(r[0], x0), px1 = std::min(r[1], x1);
        const int py0 = std::max(r[2], y0), py1 = std::min(r[3], y1);
        for (int py = py0; py <= py1; ++py) {
          const T cy = T(py) + T(0.5);
          for (int px = px0; px <= px1; ++px) {
            T bw[3], d;
            if (!studio_mesh::eval_pixel<T>(a, b, cc, T(px) + T(0.5), cy, far_plane, bw, &d)) continue;
            const int k = (py - y0) * kTile + (px - x0);
            if (d < zb[k]) {
              zb[k] = d;
              ib[k] = f;
              bb[k * 3 + 0] = bw[0];
              bb[k * 3 + 1] = bw[1];
              bb[k * 3 + 2] = bw[2];
            }
          }
        }
      }
      for (int py = y0; py <= y1; ++py) {
        for (int px = x0; px <= x1; ++px) {
          const int k = (py - y0) * kTile + (px - x0);
          const int64_t o = (c * H + py) * W + px;
          fid[o] = ib[k];
          if (ib[k] >= 0) {
            depth[o] = zb[k];
            for (int j = 0; j < 3; ++j) bary[o * 3 + j] = bb[k * 3 + j];
          } else {
            depth[o] = T(0);
            for (int j = 0; j < 3; ++j) bary[o * 3 + j] = T(0);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* vs, const int32_t* faces, const int32_t* fid, const T* gbary, const T* gdepth, int64_t C,
                   int64_t V, int W, int H, T* gvs) {
  const int64_t P = int64_t(H) * W;
  std::vector<T> rec(size_t(C * P) * 9);
  constexpr int64_t kPixChunk = 1024;
  studio_parallel::run((C * P + kPixChunk - 1) / kPixChunk, [&](const Claim& next) {
    for (int64_t chunk; next(chunk);) {
      for (int64_t o = chunk * kPixChunk, end = std::min(C * P, o + kPixChunk); o < end; ++o) {
        const int32_t f = fid[o];
        if (f < 0) continue;
        const int64_t c = o / P, p = o % P;
        const T px = T(p % W) + T(0.5), py = T(p / W) + T(0.5);
        const T* v = vs + c * V * 3;
        const int32_t* fc = faces + int64_t(f) * 3;
        studio_mesh::backward_pixel<T>(v + int64_t(fc[0]) * 3, v + int64_t(fc[1]) * 3, v + int64_t(fc[2]) * 3, px,
                                       py, gbary + o * 3, gdepth[o], rec.data() + o * 9);
      }
    }
  });
  studio_parallel::run(C, [&](const Claim& next) {
    for (int64_t c; next(c);) {
      T* g = gvs + c * V * 3;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t o = c * P + p;
        const int32_t f = fid[o];
        if (f < 0) continue;
        const int32_t* fc = faces + int64_t(f) * 3;
        const T* r = rec.data() + o * 9;
        for (int k = 0; k < 3; ++k)
          for (int j = 0; j < 3; ++j) g[int64_t(fc[k]) * 3 + j] += r[k * 3 + j];
      }
    }
  });
}

// -> (face_id [C,H,W] int32 (-1 = background), bary [C,H,W,3], depth [C,H,W] (0 on background))
std::vector<at::Tensor> rasterize_forward(at::Tensor verts_screen, at::Tensor faces, int64_t width, int64_t height,
                                          double near_plane, double far_plane) {
  check_inputs(verts_screen, faces, width, height);
  const int64_t C = verts_screen.size(0), V = verts_screen.size(1), F = faces.size(0);
  auto fopt = verts_screen.options();
  at::Tensor fid = at::empty({C, height, width}, fopt.dtype(at::kInt));
  at::Tensor bary = at::empty({C, height, width, 3}, fopt);
  at::Tensor depth = at::empty({C, height, width}, fopt);
  AT_DISPATCH_FLOATING_TYPES(verts_screen.scalar_type(), "mesh_rasterize_forward", [&] {
    forward_impl<scalar_t>(verts_screen.data_ptr<scalar_t>(), faces.data_ptr<int32_t>(), C, V, F, int(width),
                           int(height), scalar_t(near_plane), scalar_t(far_plane), fid.data_ptr<int32_t>(),
                           bary.data_ptr<scalar_t>(), depth.data_ptr<scalar_t>());
  });
  return {fid, bary, depth};
}

// -> d verts_screen [C,V,3]
at::Tensor rasterize_backward(at::Tensor verts_screen, at::Tensor faces, at::Tensor face_id, at::Tensor g_bary,
                              at::Tensor g_depth, int64_t width, int64_t height) {
  check_inputs(verts_screen, faces, width, height);
  const int64_t C = verts_screen.size(0), V = verts_screen.size(1);
  TORCH_CHECK(face_id.scalar_type() == at::kInt && face_id.is_contiguous() && face_id.numel() == C * height * width,
              "native mesh rasterizer: face_id must be int32 [C,H,W]");
  TORCH_CHECK(g_bary.scalar_type() == verts_screen.scalar_type() && g_bary.is_contiguous() &&
                  g_bary.numel() == C * height * width * 3,
              "native mesh rasterizer: grad bary must be [C,H,W,3] of the vertices' dtype");
  TORCH_CHECK(g_depth.scalar_type() == verts_screen.scalar_type() && g_depth.is_contiguous() &&
                  g_depth.numel() == C * height * width,
              "native mesh rasterizer: grad depth must be [C,H,W] of the vertices' dtype");
  at::Tensor gvs = at::zeros({C, V, 3}, verts_screen.options());
  AT_DISPATCH_FLOATING_TYPES(verts_screen.scalar_type(), "mesh_rasterize_backward", [&] {
    backward_impl<scalar_t>(verts_screen.data_ptr<scalar_t>(), faces.data_ptr<int32_t>(), face_id.data_ptr<int32_t>(),
                            g_bary.data_ptr<scalar_t>(), g_depth.data_ptr<scalar_t>(), C, V, int(width), int(height),
                            gvs.data_ptr<scalar_t>());
  });
  return gvs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "studio native CPU mesh rasterizer (OpenMP, analytic backward)";
  m.def("rasterize_forward", &rasterize_forward, "(face_id int32, bary, depth)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rasterize_backward", &rasterize_backward, "d verts_screen",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
