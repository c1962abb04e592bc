// Torch extension "studio_cuda_mesh": allocates tensors, scans the pair counts and calls the plain
// launchers of mesh_raster.h (implemented in mesh_raster.cu). Built only where torch has CUDA
// (studio.render._mesh_ext, via studio.ext.load). Same Python-facing contract as the native
// extension (cuda_ext/cpu/mesh_raster.cpp).
// Light includes (ATen, c10/cuda, the pybind11 tensor casters) instead of <torch/extension.h>, as in
// cuda_ext/cpu/rasterize.cpp, to keep the compile short.
#include <ATen/ATen.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <climits>
#include <cstdint>
#include <tuple>

#include "mesh_raster.h"

namespace {

using at::Tensor;

#define STUDIO_MESH_CUDA_OK(expr)                                                                          \
    do {                                                                                                   \
        const cudaError_t err_ = (expr);                                                                   \
        TORCH_CHECK(err_ == cudaSuccess, "studio_cuda_mesh: ", #expr, " failed: ", cudaGetErrorString(err_)); \
    } while (0)

void check_inputs(const Tensor& vs, const Tensor& faces, int64_t width, int64_t height) {
    TORCH_CHECK(vs.is_cuda() && faces.is_cuda(), "CUDA mesh rasterizer: inputs must be CUDA tensors");
    TORCH_CHECK(vs.device() == faces.device(), "CUDA mesh rasterizer: inputs must be on one device");
    TORCH_CHECK(vs.is_contiguous() && faces.is_contiguous(), "CUDA mesh rasterizer: inputs must be contiguous");
    TORCH_CHECK(vs.dim() == 3 && vs.size(2) == 3, "CUDA mesh rasterizer: verts_screen must be [C,V,3]");
    TORCH_CHECK(vs.scalar_type() == at::kFloat || vs.scalar_type() == at::kDouble,
                "CUDA mesh rasterizer: verts_screen must be float32 or float64");
    TORCH_CHECK(faces.dim() == 2 && faces.size(1) == 3 && faces.scalar_type() == at::kInt,
                "CUDA mesh rasterizer: faces must be int32 [F,3]");
    TORCH_CHECK(width > 0 && height > 0, "CUDA mesh rasterizer: width and height must be positive");
    TORCH_CHECK(faces.size(0) < INT_MAX && vs.size(0) < INT_MAX, "CUDA mesh rasterizer: too many faces or cameras");
    if (faces.numel() > 0) {
        const auto mm = at::aminmax(faces);
        TORCH_CHECK(std::get<0>(mm).item<int32_t>() >= 0 && std::get<1>(mm).item<int32_t>() < vs.size(1),
                    "CUDA mesh rasterizer: face indices out of range");
    }
}

template <typename T>
void forward_typed(const Tensor& vs, const Tensor& faces, int64_t width, int64_t height, double near_plane,
                   double far_plane, Tensor& fid, Tensor& bary, Tensor& depth, cudaStream_t stream) {
    studio_mesh_cuda::MeshRasterArgs<T> a;
    a.verts_screen = vs.data_ptr<T>();
    a.faces = faces.numel() > 0 ? faces.data_ptr<int32_t>() : nullptr;
    a.C = int(vs.size(0));
    a.V = vs.size(1);
    a.F = faces.size(0);
    a.width = int(width);
    a.height = int(height);
    a.near_plane = T(near_plane);
    a.far_plane = T(far_plane);
    const int64_t n_boxes = int64_t(a.C) * a.F;
    auto i32 = vs.options().dtype(at::kInt);
    auto i64 = vs.options().dtype(at::kLong);
    Tensor rects = at::empty({n_boxes, 4}, i32);
    Tensor counts = at::empty({n_boxes}, i64);
    a.rects = rects.data_ptr<int32_t>();
    a.counts = counts.data_ptr<int64_t>();
    STUDIO_MESH_CUDA_OK(studio_mesh_cuda::mesh_setup(a, stream));
    Tensor offsets = n_boxes > 0 ? at::cumsum(counts, 0) : counts;
    a.offsets = offsets.data_ptr<int64_t>();
    a.n_pairs = n_boxes > 0 ? offsets[n_boxes - 1].item<int64_t>() : 0;  // synchronises with the stream
    const int64_t n_pix = int64_t(a.C) * height * width;
    Tensor zbuf = at::full({n_pix}, -1, i64);  // all bits set = the largest uint64 key
    Tensor ibuf = at::full({n_pix}, INT_MAX, i32);
    a.zbuf = reinterpret_cast<unsigned long long*>(zbuf.data_ptr<int64_t>());
    a.ibuf = ibuf.data_ptr<int32_t>();
    a.face_id = fid.data_ptr<int32_t>();
    a.bary = bary.data_ptr<T>();
    a.depth = depth.data_ptr<T>();
    STUDIO_MESH_CUDA_OK(studio_mesh_cuda::mesh_depth_pass(a, stream));
    STUDIO_MESH_CUDA_OK(studio_mesh_cuda::mesh_id_pass(a, stream));
    STUDIO_MESH_CUDA_OK(studio_mesh_cuda::mesh_resolve(a, stream));
}

// -> (face_id [C,H,W] int32 (-1 background), bary [C,H,W,3], depth [C,H,W])
std::tuple<Tensor, Tensor, Tensor> rasterize_forward(const Tensor& verts_screen, const Tensor& faces, int64_t width,
                                                     int64_t height, double near_plane, double far_plane) {
    check_inputs(verts_screen, faces, width, height);
    const c10::cuda::CUDAGuard guard(verts_screen.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int64_t C = verts_screen.size(0);
    auto opts = verts_screen.options();
    Tensor fid = at::empty({C, height, width}, opts.dtype(at::kInt));
    Tensor bary = at::empty({C, height, width, 3}, opts);
    Tensor depth = at::empty({C, height, width}, opts);
    if (verts_screen.scalar_type() == at::kDouble) {
        forward_typed<double>(verts_screen, faces, width, height, near_plane, far_plane, fid, bary, depth, stream);
    } else {
        forward_typed<float>(verts_screen, faces, width, height, near_plane, far_plane, fid, bary, depth, stream);
    }
    return {fid, bary, depth};
}

template <typename T>
void backward_typed(const Tensor& vs, const Tensor& faces, const Tensor& fid, const Tensor& g_bary,
                    const Tensor& g_depth, int64_t width, int64_t height, Tensor& g_verts, cudaStream_t stream) {
    studio_mesh_cuda::MeshBackwardArgs<T> a;
    a.verts_screen = vs.data_ptr<T>();
    a.faces = faces.numel() > 0 ? faces.data_ptr<int32_t>() : nullptr;
    a.face_id = fid.data_ptr<int32_t>();
    a.g_bary = g_bary.data_ptr<T>();
    a.g_depth = g_depth.data_ptr<T>();
    a.C = int(vs.size(0));
    a.V = vs.size(1);
    a.width = int(width);
    a.height = int(height);
    a.g_verts = g_verts.data_ptr<T>();
    STUDIO_MESH_CUDA_OK(studio_mesh_cuda::mesh_backward(a, stream));
}

// -> d verts_screen [C,V,3]
Tensor rasterize_backward(const Tensor& verts_screen, const Tensor& faces, const Tensor& face_id, const Tensor& g_bary,
                          const Tensor& g_depth, int64_t width, int64_t height) {
    check_inputs(verts_screen, faces, width, height);
    const int64_t n_pix = verts_screen.size(0) * height * width;
    TORCH_CHECK(face_id.is_cuda() && face_id.is_contiguous() && face_id.scalar_type() == at::kInt &&
                    face_id.numel() == n_pix,
                "CUDA mesh rasterizer: face_id must be int32 [C,H,W]");
    TORCH_CHECK(g_bary.is_cuda() && g_bary.is_contiguous() && g_bary.scalar_type() == verts_screen.scalar_type() &&
                    g_bary.numel() == n_pix * 3,
                "CUDA mesh rasterizer: grad bary must be [C,H,W,3] of the vertices' dtype");
    TORCH_CHECK(g_depth.is_cuda() && g_depth.is_contiguous() && g_depth.scalar_type() == verts_screen.scalar_type() &&
                    g_depth.numel() == n_pix,
                "CUDA mesh rasterizer: grad depth must be [C,H,W] of the vertices' dtype");
    const c10::cuda::CUDAGuard guard(verts_screen.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    Tensor g_verts = at::zeros_like(verts_screen);
    if (verts_screen.scalar_type() == at::kDouble) {
        backward_typed<double>(verts_screen, faces, face_id, g_bary, g_depth, width, height, g_verts, stream);
    } else {
        backward_typed<float>(verts_screen, faces, face_id, g_bary, g_depth, width, height, g_verts, stream);
    }
    return g_verts;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "studio CUDA mesh rasterizer (cuda_ext/cuda/mesh_raster.cu)";
    m.def("rasterize_forward", &rasterize_forward, "(face_id int32, bary, depth)", pybind11::arg("verts_screen"),
          pybind11::arg("faces"), pybind11::arg("width"), pybind11::arg("height"), pybind11::arg("near_plane"), pybind11::arg("far_plane"));
    m.def("rasterize_backward", &rasterize_backward, "d verts_screen", pybind11::arg("verts_screen"), pybind11::arg("faces"),
          pybind11::arg("face_id"), pybind11::arg("g_bary"), pybind11::arg("g_depth"), pybind11::arg("width"), pybind11::arg("height"));
}
