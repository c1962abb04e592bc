// Host-side interface of the projection + SH kernels (project_kernels.cuh, launched by project.cu).
// Plain C++ + the CUDA runtime API only (no torch headers): binding.cpp and the host emulation include it.
// The layout and the meaning of every field are described in project_kernels.cuh.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace studio_cuda {

template <typename S>
struct ProjectArgs {
    const S* means = nullptr;
    const S* quats = nullptr;
    const S* scales = nullptr;
    const S* opacities = nullptr;
    const S* colors = nullptr;
    const S* viewmats = nullptr;
    const S* Ks = nullptr;
    int C = 0, N = 0, D = 0;
    int Kp = 1;         // SH coefficients per Gaussian in colors (1 for features)
    int sh = -1;        // -1: colors are features; 0..3: SH degree
    int depth_mode = 0; // 0: none, 1: depth appended, 2: depth only
    int per_cam = 0;    // colors has a leading camera axis
    int width = 0, height = 0;
    S eps2d = S(0.3), near_plane = S(0.01), far_plane = S(1e10);
    // forward outputs
    S* means2d = nullptr;
    S* conics = nullptr;
    S* depths = nullptr;
    int32_t* radii = nullptr;
    S* feats = nullptr;
    S* opac = nullptr;
    // backward inputs (radii above is read) and outputs
    const S* v_means2d = nullptr;
    const S* v_conics = nullptr;
    const S* v_feats = nullptr;
    const S* v_opac = nullptr;
    const S* v_depths = nullptr;  // [C,N] gradient of the depths output, or nullptr (none)
    S* v_means = nullptr;      // [N,3]  atomicAdd: zero first
    S* v_quats = nullptr;      // [N,4]  atomicAdd
    S* v_scales = nullptr;     // [N,3]  atomicAdd
    S* v_opacities = nullptr;  // [N]    atomicAdd
    S* v_colors = nullptr;     // colors' shape: atomicAdd when shared, plain adds per camera
    S* cam_partial = nullptr;  // [C,N,12] written for every (camera, Gaussian)
};

// Output channels per (camera, Gaussian).
__host__ __device__ inline int project_out_dim(int D, int depth_mode) {
    return depth_mode == 2 ? 1 : D + (depth_mode == 1 ? 1 : 0);
}

// Launchers (raw device pointers; enqueue on stream and return the first CUDA error, no synchronisation).
// project_forward writes means2d, conics, depths, radii, feats, opac.
// project_backward reads radii, v_means2d, v_conics, v_feats, v_opac; accumulates (atomicAdd) into v_means,
// v_quats, v_scales, v_opacities, v_colors (zero them first), uses cam_partial [C,N,12] as workspace and writes
// v_viewmats [C,4,4].
cudaError_t project_forward(const ProjectArgs<float>& a, cudaStream_t stream);
cudaError_t project_forward(const ProjectArgs<double>& a, cudaStream_t stream);
cudaError_t project_backward(const ProjectArgs<float>& a, float* v_viewmats, cudaStream_t stream);
cudaError_t project_backward(const ProjectArgs<double>& a, double* v_viewmats, cudaStream_t stream);

}  // namespace studio_cuda
