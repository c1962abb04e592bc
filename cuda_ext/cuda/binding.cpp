// Torch extension "studio_cuda_raster": allocates tensors, picks the current CUDA stream and calls the
// plain launchers declared in raster.h (implemented in binning.cu, raster_fwd.cu, raster_bwd.cu) and
// project_args.h (project.cu: projection + SH, forward and backward).
// Built only where torch has CUDA (studio.render._cuda, via studio.ext.load).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "project_args.h"
#include "raster.h"

namespace {

using torch::Tensor;

#define STUDIO_CUDA_OK(expr)                                                                              \
    do {                                                                                                  \
        const cudaError_t err_ = (expr);                                                                  \
        TORCH_CHECK(err_ == cudaSuccess, "studio_cuda_raster: ", #expr, " failed: ", cudaGetErrorString(err_)); \
    } while (0)

void check_input(const Tensor& t, const char* name, int64_t dims) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dims, got ", t.dim());
}

void check_float(const Tensor& t, const char* name, const Tensor& ref) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(), ", got ",
                t.scalar_type());
}

template <typename S>
const S* ptr_or_null(const Tensor& t) {
    return t.numel() > 0 ? t.data_ptr<S>() : nullptr;
}

struct Grid {
    int C, N, tiles_x, tiles_y;
    int64_t n_tiles;
};

Grid make_grid(const Tensor& means2d, int64_t width, int64_t height, int64_t tile_size) {
    TORCH_CHECK(width > 0 && height > 0, "width and height must be positive");
    TORCH_CHECK(studio_cuda::tile_size_supported(int(tile_size)),
                "tile_size must be <= 32 with tile_size^2 a multiple of 32 (e.g. 8, 16), got ", tile_size);
    Grid g;
    g.C = int(means2d.size(0));
    g.N = int(means2d.size(1));
    TORCH_CHECK(means2d.size(0) * means2d.size(1) < INT_MAX, "too many Gaussians x cameras for int32 ids");
    g.tiles_x = int((width + tile_size - 1) / tile_size);
    g.tiles_y = int((height + tile_size - 1) / tile_size);
    g.n_tiles = int64_t(g.C) * g.tiles_x * g.tiles_y;
    return g;
}

// -> (tile_ranges [C*tiles_y*tiles_x, 2] int32, gauss_ids [n_isects] int32 sorted, n_isects)
std::tuple<Tensor, Tensor, int64_t> bin_gaussians(const Tensor& means2d, const Tensor& radii, const Tensor& depths,
                                                  int64_t width, int64_t height, int64_t tile_size) {
    check_input(means2d, "means2d", 3);
    check_input(radii, "radii", 3);
    check_input(depths, "depths", 2);
    TORCH_CHECK(means2d.size(2) == 2 && radii.size(2) == 2, "means2d and radii must be [C,N,2]");
    TORCH_CHECK(radii.scalar_type() == torch::kInt32, "radii must be int32");
    TORCH_CHECK(radii.size(0) == means2d.size(0) && radii.size(1) == means2d.size(1), "radii shape mismatch");
    TORCH_CHECK(depths.size(0) == means2d.size(0) && depths.size(1) == means2d.size(1), "depths shape mismatch");
    check_float(depths, "depths", means2d);
    TORCH_CHECK(means2d.scalar_type() == torch::kFloat32 || means2d.scalar_type() == torch::kFloat64,
                "means2d must be float32 or float64");
    const c10::cuda::CUDAGuard guard(means2d.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const Grid g = make_grid(means2d, width, height, tile_size);
    const int64_t n = int64_t(g.C) * g.N;
    auto i64 = means2d.options().dtype(torch::kInt64);
    auto i32 = means2d.options().dtype(torch::kInt32);
    auto u8 = means2d.options().dtype(torch::kUInt8);

    Tensor ranges = torch::zeros({g.n_tiles, 2}, i32);
    if (n == 0) return {ranges, torch::empty({0}, i32), 0};

    Tensor counts = torch::empty({n}, i64);
    if (means2d.scalar_type() == torch::kFloat64) {
        STUDIO_CUDA_OK(studio_cuda::tile_counts(means2d.data_ptr<double>(), radii.data_ptr<int32_t>(), n, g.tiles_x,
                                                g.tiles_y, int(tile_size), counts.data_ptr<int64_t>(), stream));
    } else {
        STUDIO_CUDA_OK(studio_cuda::tile_counts(means2d.data_ptr<float>(), radii.data_ptr<int32_t>(), n, g.tiles_x,
                                                g.tiles_y, int(tile_size), counts.data_ptr<int64_t>(), stream));
    }
    Tensor offsets = torch::empty({n}, i64);
    size_t scan_bytes = 0;
    STUDIO_CUDA_OK(studio_cuda::inclusive_scan_temp_bytes(n, &scan_bytes));
    Tensor scan_temp = torch::empty({int64_t(scan_bytes) + 1}, u8);
    STUDIO_CUDA_OK(studio_cuda::inclusive_scan(counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), n,
                                               scan_temp.data_ptr(), scan_bytes, stream));
    const int64_t n_isects = offsets[n - 1].item<int64_t>();  // synchronises with the stream
    TORCH_CHECK(n_isects < INT_MAX, "too many tile intersections (", n_isects, ") for int32 ranges");
    if (n_isects == 0) return {ranges, torch::empty({0}, i32), 0};

    Tensor keys = torch::empty({n_isects}, i64);
    Tensor ids = torch::empty({n_isects}, i32);
    auto* keys_ptr = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
    if (means2d.scalar_type() == torch::kFloat64) {
        STUDIO_CUDA_OK(studio_cuda::emit_intersections(means2d.data_ptr<double>(), radii.data_ptr<int32_t>(),
                                                       depths.data_ptr<double>(), offsets.data_ptr<int64_t>(), g.C,
                                                       g.N, g.tiles_x, g.tiles_y, int(tile_size), keys_ptr,
                                                       ids.data_ptr<int32_t>(), stream));
    } else {
        STUDIO_CUDA_OK(studio_cuda::emit_intersections(means2d.data_ptr<float>(), radii.data_ptr<int32_t>(),
                                                       depths.data_ptr<float>(), offsets.data_ptr<int64_t>(), g.C,
                                                       g.N, g.tiles_x, g.tiles_y, int(tile_size), keys_ptr,
                                                       ids.data_ptr<int32_t>(), stream));
    }
    const int end_bit = studio_cuda::sort_end_bit(g.n_tiles);
    Tensor keys_sorted = torch::empty({n_isects}, i64);
    Tensor ids_sorted = torch::empty({n_isects}, i32);
    auto* keys_sorted_ptr = reinterpret_cast<uint64_t*>(keys_sorted.data_ptr<int64_t>());
    size_t sort_bytes = 0;
    STUDIO_CUDA_OK(studio_cuda::sort_pairs_temp_bytes(n_isects, end_bit, &sort_bytes));
    Tensor sort_temp = torch::empty({int64_t(sort_bytes) + 1}, u8);
    STUDIO_CUDA_OK(studio_cuda::sort_pairs(keys_ptr, keys_sorted_ptr, ids.data_ptr<int32_t>(),
                                           ids_sorted.data_ptr<int32_t>(), n_isects, end_bit, sort_temp.data_ptr(),
                                           sort_bytes, stream));
    STUDIO_CUDA_OK(studio_cuda::tile_ranges(keys_sorted_ptr, n_isects, g.n_tiles, ranges.data_ptr<int32_t>(), stream));
    return {ranges, ids_sorted, n_isects};
}

void check_blend_inputs(const Tensor& means2d, const Tensor& conics, const Tensor& colors, const Tensor& opacities,
                        const Tensor& backgrounds, const Tensor& tile_ranges, const Tensor& gauss_ids) {
    check_input(means2d, "means2d", 3);
    check_input(conics, "conics", 3);
    check_input(colors, "colors", 3);
    check_input(opacities, "opacities", 2);
    check_input(tile_ranges, "tile_ranges", 2);
    check_input(gauss_ids, "gauss_ids", 1);
    const auto C = means2d.size(0), N = means2d.size(1);
    TORCH_CHECK(means2d.size(2) == 2, "means2d must be [C,N,2]");
    TORCH_CHECK(conics.size(0) == C && conics.size(1) == N && conics.size(2) == 3, "conics must be [C,N,3]");
    TORCH_CHECK(colors.size(0) == C && colors.size(1) == N && colors.size(2) >= 1, "colors must be [C,N,D]");
    TORCH_CHECK(opacities.size(0) == C && opacities.size(1) == N, "opacities must be [C,N]");
    TORCH_CHECK(means2d.scalar_type() == torch::kFloat32 || means2d.scalar_type() == torch::kFloat64,
                "means2d must be float32 or float64");
    check_float(conics, "conics", means2d);
    check_float(colors, "colors", means2d);
    check_float(opacities, "opacities", means2d);
    if (backgrounds.numel() > 0) {
        check_input(backgrounds, "backgrounds", 2);
        check_float(backgrounds, "backgrounds", means2d);
        TORCH_CHECK(backgrounds.size(0) == C && backgrounds.size(1) == colors.size(2), "backgrounds must be [C,D]");
    }
    TORCH_CHECK(tile_ranges.scalar_type() == torch::kInt32 && gauss_ids.scalar_type() == torch::kInt32,
                "tile_ranges and gauss_ids must be int32");
}

template <typename S>
void forward_typed(const Tensor& means2d, const Tensor& conics, const Tensor& colors, const Tensor& opacities,
                   const Tensor& backgrounds, const Tensor& tile_ranges, const Tensor& gauss_ids, const Grid& g,
                   int64_t width, int64_t height, int64_t tile_size, Tensor& render, Tensor& alphas, Tensor& final_T,
                   Tensor& last_idx, cudaStream_t stream) {
    studio_cuda::RasterFwdArgs<S> a;
    a.means2d = means2d.data_ptr<S>();
    a.conics = conics.data_ptr<S>();
    a.colors = colors.data_ptr<S>();
    a.opacities = opacities.data_ptr<S>();
    a.backgrounds = ptr_or_null<S>(backgrounds);
    a.tile_ranges = tile_ranges.data_ptr<int32_t>();
    a.gauss_ids = gauss_ids.numel() > 0 ? gauss_ids.data_ptr<int32_t>() : nullptr;
    a.C = g.C;
    a.N = g.N;
    a.D = int(colors.size(2));
    a.width = int(width);
    a.height = int(height);
    a.tile_size = int(tile_size);
    a.tiles_x = g.tiles_x;
    a.tiles_y = g.tiles_y;
    a.render = render.data_ptr<S>();
    a.alphas = alphas.data_ptr<S>();
    a.final_T = final_T.data_ptr<S>();
    a.last_idx = last_idx.data_ptr<int32_t>();
    STUDIO_CUDA_OK(studio_cuda::rasterize_forward(a, stream));
}

// -> (render [C,H,W,D], alphas [C,H,W,1], final_T [C,H,W], last_idx [C,H,W] int32)
std::tuple<Tensor, Tensor, Tensor, Tensor> rasterize_forward(const Tensor& means2d, const Tensor& conics,
                                                             const Tensor& colors, const Tensor& opacities,
                                                             const Tensor& backgrounds, const Tensor& tile_ranges,
                                                             const Tensor& gauss_ids, int64_t width, int64_t height,
                                                             int64_t tile_size) {
    check_blend_inputs(means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids);
    const c10::cuda::CUDAGuard guard(means2d.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const Grid g = make_grid(means2d, width, height, tile_size);
    TORCH_CHECK(tile_ranges.size(0) == g.n_tiles && tile_ranges.size(1) == 2, "tile_ranges must be [C*tiles,2]");
    const int64_t D = colors.size(2);
    auto opts = means2d.options();
    Tensor render = torch::empty({g.C, height, width, D}, opts);
    Tensor alphas = torch::empty({g.C, height, width, 1}, opts);
    Tensor final_T = torch::empty({g.C, height, width}, opts);
    Tensor last_idx = torch::empty({g.C, height, width}, opts.dtype(torch::kInt32));
    if (means2d.scalar_type() == torch::kFloat64) {
        forward_typed<double>(means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids, g, width,
                              height, tile_size, render, alphas, final_T, last_idx, stream);
    } else {
        forward_typed<float>(means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids, g, width, height,
                             tile_size, render, alphas, final_T, last_idx, stream);
    }
    return {render, alphas, final_T, last_idx};
}

template <typename S>
void backward_typed(const Tensor& means2d, const Tensor& conics, const Tensor& colors, const Tensor& opacities,
                    const Tensor& backgrounds, const Tensor& tile_ranges, const Tensor& gauss_ids,
                    const Tensor& final_T, const Tensor& last_idx, const Tensor& v_render, const Tensor& v_alphas,
                    const Grid& g, int64_t width, int64_t height, int64_t tile_size, Tensor& scratch,
                    Tensor& v_means2d, Tensor& v_conics, Tensor& v_colors, Tensor& v_opacities, cudaStream_t stream) {
    studio_cuda::RasterBwdArgs<S> a;
    a.means2d = means2d.data_ptr<S>();
    a.conics = conics.data_ptr<S>();
    a.colors = colors.data_ptr<S>();
    a.opacities = opacities.data_ptr<S>();
    a.backgrounds = ptr_or_null<S>(backgrounds);
    a.tile_ranges = tile_ranges.data_ptr<int32_t>();
    a.gauss_ids = gauss_ids.numel() > 0 ? gauss_ids.data_ptr<int32_t>() : nullptr;
    a.final_T = final_T.data_ptr<S>();
    a.last_idx = last_idx.data_ptr<int32_t>();
    a.v_render = v_render.data_ptr<S>();
    a.v_alphas = ptr_or_null<S>(v_alphas);
    a.C = g.C;
    a.N = g.N;
    a.D = int(colors.size(2));
    a.width = int(width);
    a.height = int(height);
    a.tile_size = int(tile_size);
    a.tiles_x = g.tiles_x;
    a.tiles_y = g.tiles_y;
    a.scratch = scratch.numel() > 0 ? scratch.data_ptr<S>() : nullptr;
    a.v_means2d = v_means2d.data_ptr<S>();
    a.v_conics = v_conics.data_ptr<S>();
    a.v_colors = v_colors.data_ptr<S>();
    a.v_opacities = v_opacities.data_ptr<S>();
    STUDIO_CUDA_OK(studio_cuda::rasterize_backward(a, stream));
}

// -> (v_means2d [C,N,2], v_conics [C,N,3], v_colors [C,N,D], v_opacities [C,N]); v_alphas may be empty.
std::tuple<Tensor, Tensor, Tensor, Tensor> rasterize_backward(
    const Tensor& means2d, const Tensor& conics, const Tensor& colors, const Tensor& opacities,
    const Tensor& backgrounds, const Tensor& tile_ranges, const Tensor& gauss_ids, const Tensor& final_T,
    const Tensor& last_idx, const Tensor& v_render, const Tensor& v_alphas, int64_t width, int64_t height,
    int64_t tile_size) {
    check_blend_inputs(means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids);
    const c10::cuda::CUDAGuard guard(means2d.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const Grid g = make_grid(means2d, width, height, tile_size);
    const int64_t D = colors.size(2);
    check_input(final_T, "final_T", 3);
    check_input(last_idx, "last_idx", 3);
    check_input(v_render, "v_render", 4);
    check_float(final_T, "final_T", means2d);
    check_float(v_render, "v_render", means2d);
    TORCH_CHECK(last_idx.scalar_type() == torch::kInt32, "last_idx must be int32");
    TORCH_CHECK(v_render.size(0) == g.C && v_render.size(1) == height && v_render.size(2) == width &&
                    v_render.size(3) == D,
                "v_render must be [C,H,W,D]");
    TORCH_CHECK(final_T.numel() == int64_t(g.C) * height * width && last_idx.numel() == final_T.numel(),
                "final_T / last_idx must be [C,H,W]");
    if (v_alphas.numel() > 0) {
        TORCH_CHECK(v_alphas.is_cuda() && v_alphas.is_contiguous(), "v_alphas must be a contiguous CUDA tensor");
        check_float(v_alphas, "v_alphas", means2d);
        TORCH_CHECK(v_alphas.numel() == final_T.numel(), "v_alphas must be [C,H,W,1]");
    }
    auto opts = means2d.options();
    Tensor v_means2d = torch::zeros_like(means2d);
    Tensor v_conics = torch::zeros_like(conics);
    Tensor v_colors = torch::zeros_like(colors);
    Tensor v_opacities = torch::zeros_like(opacities);
    Tensor scratch = studio_cuda::channels_specialised(int(D)) ? torch::empty({0}, opts)
                                                               : torch::empty({g.C, height, width, D}, opts);
    if (means2d.scalar_type() == torch::kFloat64) {
        backward_typed<double>(means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids, final_T,
                               last_idx, v_render, v_alphas, g, width, height, tile_size, scratch, v_means2d, v_conics,
                               v_colors, v_opacities, stream);
    } else {
        backward_typed<float>(means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids, final_T,
                              last_idx, v_render, v_alphas, g, width, height, tile_size, scratch, v_means2d, v_conics,
                              v_colors, v_opacities, stream);
    }
    return {v_means2d, v_conics, v_colors, v_opacities};
}

// ------------------------------------------------------------------------ projection + SH (project.cu)

// Shapes of the projection's inputs (see project_kernels.cuh), checked; fills the sizes of a.
template <typename S>
studio_cuda::ProjectArgs<S> project_args(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                         const Tensor& opacities, const Tensor& colors, const Tensor& viewmats,
                                         const Tensor& Ks, int64_t width, int64_t height, int64_t sh_degree,
                                         int64_t depth_mode, double near_plane, double far_plane, double eps2d) {
    check_input(means, "means", 2);
    check_input(quats, "quats", 2);
    check_input(scales, "scales", 2);
    check_input(opacities, "opacities", 1);
    check_input(viewmats, "viewmats", 3);
    check_input(Ks, "Ks", 3);
    TORCH_CHECK(colors.is_cuda() && colors.is_contiguous(), "colors must be a contiguous CUDA tensor");
    const int64_t N = means.size(0), C = viewmats.size(0);
    TORCH_CHECK(means.size(1) == 3 && scales.size(1) == 3 && scales.size(0) == N, "means and scales must be [N,3]");
    TORCH_CHECK(quats.size(0) == N && quats.size(1) == 4, "quats must be [N,4]");
    TORCH_CHECK(opacities.size(0) == N, "opacities must be [N]");
    TORCH_CHECK(viewmats.size(1) == 4 && viewmats.size(2) == 4, "viewmats must be [C,4,4]");
    TORCH_CHECK(Ks.size(0) == C && Ks.size(1) == 3 && Ks.size(2) == 3, "Ks must be [C,3,3]");
    TORCH_CHECK(sh_degree >= -1 && sh_degree <= 3, "sh_degree must be -1 (features) or 0..3, got ", sh_degree);
    TORCH_CHECK(depth_mode >= 0 && depth_mode <= 2, "depth_mode must be 0, 1 or 2, got ", depth_mode);
    TORCH_CHECK(width > 0 && height > 0, "width and height must be positive");
    TORCH_CHECK(C * N < INT_MAX, "too many Gaussians x cameras for int32 ids");
    for (const Tensor* t : {&quats, &scales, &opacities, &colors, &viewmats, &Ks}) check_float(*t, "input", means);
    const int64_t base = sh_degree < 0 ? 2 : 3;
    TORCH_CHECK(colors.dim() == base || colors.dim() == base + 1, "colors must be ",
                sh_degree < 0 ? "[N,D] or [C,N,D]" : "[N,K,D] or [C,N,K,D]", ", got ", colors.dim(), " dims");
    const bool per_cam = colors.dim() == base + 1;
    TORCH_CHECK(!per_cam || colors.size(0) == C, "per-camera colors must have C rows");
    TORCH_CHECK(colors.size(per_cam ? 1 : 0) == N, "colors must have N Gaussians");
    const int64_t Kp = sh_degree < 0 ? 1 : colors.size(-2);
    TORCH_CHECK(sh_degree < 0 || Kp >= (sh_degree + 1) * (sh_degree + 1),
                "colors has fewer SH coefficients than sh_degree needs");
    studio_cuda::ProjectArgs<S> a;
    a.means = means.data_ptr<S>();
    a.quats = quats.data_ptr<S>();
    a.scales = scales.data_ptr<S>();
    a.opacities = opacities.data_ptr<S>();
    a.colors = colors.data_ptr<S>();
    a.viewmats = viewmats.data_ptr<S>();
    a.Ks = Ks.data_ptr<S>();
    a.C = int(C);
    a.N = int(N);
    a.D = int(colors.size(-1));
    a.Kp = int(Kp);
    a.sh = int(sh_degree);
    a.depth_mode = int(depth_mode);
    a.per_cam = per_cam ? 1 : 0;
    a.width = int(width);
    a.height = int(height);
    a.eps2d = S(eps2d);
    a.near_plane = S(near_plane);
    a.far_plane = S(far_plane);
    return a;
}

// -> (means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N,2] int32, feats [C,N,Dt], opac [C,N])
template <typename S>
std::vector<Tensor> project_forward_typed(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                          const Tensor& opacities, const Tensor& colors, const Tensor& viewmats,
                                          const Tensor& Ks, int64_t width, int64_t height, int64_t sh_degree,
                                          int64_t depth_mode, double near_plane, double far_plane, double eps2d) {
    auto a = project_args<S>(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                             depth_mode, near_plane, far_plane, eps2d);
    const int64_t C = a.C, N = a.N, Dt = studio_cuda::project_out_dim(a.D, a.depth_mode);
    auto fo = means.options();
    Tensor means2d = torch::empty({C, N, 2}, fo), conics = torch::empty({C, N, 3}, fo);
    Tensor depths = torch::empty({C, N}, fo), feats = torch::empty({C, N, Dt}, fo), opac = torch::empty({C, N}, fo);
    Tensor radii = torch::empty({C, N, 2}, fo.dtype(torch::kInt32));
    a.means2d = means2d.data_ptr<S>();
    a.conics = conics.data_ptr<S>();
    a.depths = depths.data_ptr<S>();
    a.radii = radii.data_ptr<int32_t>();
    a.feats = feats.data_ptr<S>();
    a.opac = opac.data_ptr<S>();
    STUDIO_CUDA_OK(studio_cuda::project_forward(a, c10::cuda::getCurrentCUDAStream().stream()));
    return {means2d, conics, depths, radii, feats, opac};
}

std::vector<Tensor> project_forward(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                    const Tensor& opacities, const Tensor& colors, const Tensor& viewmats,
                                    const Tensor& Ks, int64_t width, int64_t height, int64_t sh_degree,
                                    int64_t depth_mode, double near_plane, double far_plane, double eps2d) {
    const c10::cuda::CUDAGuard guard(means.device());
    TORCH_CHECK(means.scalar_type() == torch::kFloat32 || means.scalar_type() == torch::kFloat64,
                "means must be float32 or float64");
    if (means.scalar_type() == torch::kFloat64)
        return project_forward_typed<double>(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                             sh_degree, depth_mode, near_plane, far_plane, eps2d);
    return project_forward_typed<float>(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                        sh_degree, depth_mode, near_plane, far_plane, eps2d);
}

// v_depths: [C,N] or empty (no gradient on the depths output).
// -> (v_means [N,3], v_quats [N,4], v_scales [N,3], v_opacities [N], v_colors (colors' shape), v_viewmats [C,4,4])
template <typename S>
std::vector<Tensor> project_backward_typed(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                           const Tensor& opacities, const Tensor& colors, const Tensor& viewmats,
                                           const Tensor& Ks, const Tensor& radii, const Tensor& v_means2d,
                                           const Tensor& v_conics, const Tensor& v_feats, const Tensor& v_opac,
                                           const Tensor& v_depths, int64_t width, int64_t height, int64_t sh_degree,
                                           int64_t depth_mode,
                                           double near_plane, double far_plane, double eps2d) {
    auto a = project_args<S>(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                             depth_mode, near_plane, far_plane, eps2d);
    const int64_t C = a.C, N = a.N, Dt = studio_cuda::project_out_dim(a.D, a.depth_mode);
    check_input(radii, "radii", 3);
    check_input(v_means2d, "v_means2d", 3);
    check_input(v_conics, "v_conics", 3);
    check_input(v_feats, "v_feats", 3);
    check_input(v_opac, "v_opac", 2);
    TORCH_CHECK(radii.scalar_type() == torch::kInt32 && radii.numel() == C * N * 2, "radii must be int32 [C,N,2]");
    TORCH_CHECK(v_means2d.numel() == C * N * 2 && v_conics.numel() == C * N * 3 && v_feats.numel() == C * N * Dt &&
                    v_opac.numel() == C * N,
                "projection gradients must be [C,N,2], [C,N,3], [C,N,Dt], [C,N]");
    for (const Tensor* t : {&v_means2d, &v_conics, &v_feats, &v_opac}) check_float(*t, "gradient", means);
    TORCH_CHECK(v_depths.numel() == 0 || (v_depths.is_cuda() && v_depths.is_contiguous() && v_depths.numel() == C * N),
                "v_depths must be empty or a contiguous CUDA [C,N]");
    if (v_depths.numel() > 0) check_float(v_depths, "v_depths", means);
    auto fo = means.options();
    Tensor v_means = torch::zeros({N, 3}, fo), v_quats = torch::zeros({N, 4}, fo), v_scales = torch::zeros({N, 3}, fo);
    Tensor v_opacities = torch::zeros({N}, fo), v_colors = torch::zeros(colors.sizes(), fo);
    Tensor v_viewmats = torch::zeros({C, 4, 4}, fo), cam_partial = torch::empty({C, N, 12}, fo);
    a.radii = radii.data_ptr<int32_t>();
    a.v_means2d = v_means2d.data_ptr<S>();
    a.v_conics = v_conics.data_ptr<S>();
    a.v_feats = v_feats.data_ptr<S>();
    a.v_opac = v_opac.data_ptr<S>();
    a.v_depths = v_depths.numel() > 0 ? v_depths.data_ptr<S>() : nullptr;
    a.v_means = v_means.data_ptr<S>();
    a.v_quats = v_quats.data_ptr<S>();
    a.v_scales = v_scales.data_ptr<S>();
    a.v_opacities = v_opacities.data_ptr<S>();
    a.v_colors = v_colors.data_ptr<S>();
    a.cam_partial = cam_partial.data_ptr<S>();
    STUDIO_CUDA_OK(studio_cuda::project_backward(a, v_viewmats.data_ptr<S>(),
                                                 c10::cuda::getCurrentCUDAStream().stream()));
    return {v_means, v_quats, v_scales, v_opacities, v_colors, v_viewmats};
}

std::vector<Tensor> project_backward(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                     const Tensor& opacities, const Tensor& colors, const Tensor& viewmats,
                                     const Tensor& Ks, const Tensor& radii, const Tensor& v_means2d,
                                     const Tensor& v_conics, const Tensor& v_feats, const Tensor& v_opac,
                                     const Tensor& v_depths, int64_t width, int64_t height, int64_t sh_degree,
                                     int64_t depth_mode,
                                     double near_plane, double far_plane, double eps2d) {
    const c10::cuda::CUDAGuard guard(means.device());
    TORCH_CHECK(means.scalar_type() == torch::kFloat32 || means.scalar_type() == torch::kFloat64,
                "means must be float32 or float64");
    if (means.scalar_type() == torch::kFloat64)
        return project_backward_typed<double>(means, quats, scales, opacities, colors, viewmats, Ks, radii, v_means2d,
                                              v_conics, v_feats, v_opac, v_depths, width, height, sh_degree, depth_mode,
                                              near_plane, far_plane, eps2d);
    return project_backward_typed<float>(means, quats, scales, opacities, colors, viewmats, Ks, radii, v_means2d,
                                         v_conics, v_feats, v_opac, v_depths, width, height, sh_degree, depth_mode,
                                         near_plane,
                                         far_plane, eps2d);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "studio CUDA tile rasterizer (cuda_ext/cuda)";
    m.def("bin_gaussians", &bin_gaussians, "tile binning: (tile_ranges, sorted gauss_ids, n_isects)",
          py::arg("means2d"), py::arg("radii"), py::arg("depths"), py::arg("width"), py::arg("height"),
          py::arg("tile_size"));
    m.def("rasterize_forward", &rasterize_forward, "forward blend: (render, alphas, final_T, last_idx)",
          py::arg("means2d"), py::arg("conics"), py::arg("colors"), py::arg("opacities"), py::arg("backgrounds"),
          py::arg("tile_ranges"), py::arg("gauss_ids"), py::arg("width"), py::arg("height"), py::arg("tile_size"));
    m.def("rasterize_backward", &rasterize_backward,
          "backward blend: (v_means2d, v_conics, v_colors, v_opacities)", py::arg("means2d"), py::arg("conics"),
          py::arg("colors"), py::arg("opacities"), py::arg("backgrounds"), py::arg("tile_ranges"),
          py::arg("gauss_ids"), py::arg("final_T"), py::arg("last_idx"), py::arg("v_render"), py::arg("v_alphas"),
          py::arg("width"), py::arg("height"), py::arg("tile_size"));
    m.def("project_forward", &project_forward,
          "projection + SH: (means2d, conics, depths, radii, feats, opac)", py::arg("means"), py::arg("quats"),
          py::arg("scales"), py::arg("opacities"), py::arg("colors"), py::arg("viewmats"), py::arg("Ks"),
          py::arg("width"), py::arg("height"), py::arg("sh_degree"), py::arg("depth_mode"), py::arg("near_plane"),
          py::arg("far_plane"), py::arg("eps2d"));
    m.def("project_backward", &project_backward,
          "projection + SH backward: (v_means, v_quats, v_scales, v_opacities, v_colors, v_viewmats)",
          py::arg("means"), py::arg("quats"), py::arg("scales"), py::arg("opacities"), py::arg("colors"),
          py::arg("viewmats"), py::arg("Ks"), py::arg("radii"), py::arg("v_means2d"), py::arg("v_conics"),
          py::arg("v_feats"), py::arg("v_opac"), py::arg("v_depths"), py::arg("width"), py::arg("height"),
          py::arg("sh_degree"),
          py::arg("depth_mode"), py::arg("near_plane"), py::arg("far_plane"), py::arg("eps2d"));
}
