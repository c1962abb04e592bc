// CPU emulation of the projection + SH kernels (project_kernels.cuh), for tests without a GPU. Not part of the
// extension: tests/test_cuda_project_emulated.py compiles a main calling project_cli_main with g++ and runs the
// same kernel source as project.cu on the CPU through host_emulation.h (launch_serial for the barrier-free
// per-(camera, Gaussian) kernels, launch_blocks with one fiber per thread for the camera reduction, whose
// __syncthreads are real barriers there). Atomics are plain read-modify-writes (one OS thread).
#pragma once

#include "host_emulation.h"
#include "project_args.h"
#include "project_kernels.cuh"

namespace studio_cuda_emu {

// dir/meta.txt: "C N D Kp sh depth_mode per_cam W H bytes_per_float eps2d near far"; inputs means quats scales
// opacities colors viewmats Ks v_means2d v_conics v_feats v_opac v_depths as raw .bin. Runs the forward, then the
// backward on the forward's radii; writes means2d conics depths radii(int32) feats opac v_means v_quats v_scales
// v_opacities v_colors v_viewmats .bin.
template <typename S>
int run_project(const std::string& dir, int C, int N, int D, int Kp, int sh, int depth_mode, int per_cam, int W,
                int H, double eps2d, double near_plane, double far_plane) {
    using namespace studio_cuda;
    const int64_t CN = int64_t(C) * N;
    const int Dt = project_out_dim(D, depth_mode);
    const int64_t ncol = (per_cam ? CN : int64_t(N)) * Kp * D;
    auto means = read_file<S>(dir + "/means.bin", size_t(N) * 3);
    auto quats = read_file<S>(dir + "/quats.bin", size_t(N) * 4);
    auto scales = read_file<S>(dir + "/scales.bin", size_t(N) * 3);
    auto opacities = read_file<S>(dir + "/opacities.bin", size_t(N));
    auto colors = read_file<S>(dir + "/colors.bin", size_t(ncol));
    auto viewmats = read_file<S>(dir + "/viewmats.bin", size_t(C) * 16);
    auto Ks = read_file<S>(dir + "/Ks.bin", size_t(C) * 9);
    auto v_means2d = read_file<S>(dir + "/v_means2d.bin", size_t(CN) * 2);
    auto v_conics = read_file<S>(dir + "/v_conics.bin", size_t(CN) * 3);
    auto v_feats = read_file<S>(dir + "/v_feats.bin", size_t(CN) * Dt);
    auto v_opac = read_file<S>(dir + "/v_opac.bin", size_t(CN));
    auto v_depths = read_file<S>(dir + "/v_depths.bin", size_t(CN));

    std::vector<S> means2d(CN * 2), conics(CN * 3), depths(CN), feats(CN * Dt), opac(CN);
    std::vector<int32_t> radii(CN * 2);
    std::vector<S> v_means(size_t(N) * 3, S(0)), v_quats(size_t(N) * 4, S(0)), v_scales(size_t(N) * 3, S(0));
    std::vector<S> v_opacities(size_t(N), S(0)), v_colors(size_t(ncol), S(0)), v_viewmats(size_t(C) * 16, S(-1));
    std::vector<S> cam_partial(size_t(CN) * 12, std::numeric_limits<S>::quiet_NaN());  // every entry is written

    ProjectArgs<S> a;
    a.means = means.data();
    a.quats = quats.data();
    a.scales = scales.data();
    a.opacities = opacities.data();
    a.colors = colors.data();
    a.viewmats = viewmats.data();
    a.Ks = Ks.data();
    a.C = C;
    a.N = N;
    a.D = D;
    a.Kp = Kp;
    a.sh = sh;
    a.depth_mode = depth_mode;
    a.per_cam = per_cam;
    a.width = W;
    a.height = H;
    a.eps2d = S(eps2d);
    a.near_plane = S(near_plane);
    a.far_plane = S(far_plane);
    a.means2d = means2d.data();
    a.conics = conics.data();
    a.depths = depths.data();
    a.radii = radii.data();
    a.feats = feats.data();
    a.opac = opac.data();
    a.v_means2d = v_means2d.data();
    a.v_conics = v_conics.data();
    a.v_feats = v_feats.data();
    a.v_opac = v_opac.data();
    a.v_depths = v_depths.data();
    a.v_means = v_means.data();
    a.v_quats = v_quats.data();
    a.v_scales = v_scales.data();
    a.v_opacities = v_opacities.data();
    a.v_colors = v_colors.data();
    a.cam_partial = cam_partial.data();

    // the launch shapes of project.cu
    launch_serial(CN, 256, [&] { kernels::project_fwd_kernel<S>(a); });
    launch_serial(CN, 256, [&] { kernels::project_bwd_kernel<S>(a); });
    launch_blocks(int64_t(C) * 12, kernels::kCamReduceThreads, 1, 0, [&] {
        kernels::cam_reduce_kernel<S>(cam_partial.data(), C, N, v_viewmats.data());
    });

    write_file(dir + "/means2d.bin", means2d);
    write_file(dir + "/conics.bin", conics);
    write_file(dir + "/depths.bin", depths);
    write_file(dir + "/radii.bin", radii);
    write_file(dir + "/feats.bin", feats);
    write_file(dir + "/opac.bin", opac);
    write_file(dir + "/v_means.bin", v_means);
    write_file(dir + "/v_quats.bin", v_quats);
    write_file(dir + "/v_scales.bin", v_scales);
    write_file(dir + "/v_opacities.bin", v_opacities);
    write_file(dir + "/v_colors.bin", v_colors);
    write_file(dir + "/v_viewmats.bin", v_viewmats);
    return 0;
}

inline int project_cli_main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s DIR (with DIR/meta.txt and the input .bin files)\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    FILE* f = std::fopen((dir + "/meta.txt").c_str(), "r");
    if (!f) return 2;
    int C, N, D, Kp, sh, depth_mode, per_cam, W, H, bytes;
    double eps2d, near_plane, far_plane;
    const int got = std::fscanf(f, "%d %d %d %d %d %d %d %d %d %d %lf %lf %lf", &C, &N, &D, &Kp, &sh, &depth_mode,
                                &per_cam, &W, &H, &bytes, &eps2d, &near_plane, &far_plane);
    std::fclose(f);
    if (got != 13) {
        std::fprintf(stderr, "%s/meta.txt: expected 13 fields, read %d\n", dir.c_str(), got);
        return 2;
    }
    if (bytes == 8)
        return run_project<double>(dir, C, N, D, Kp, sh, depth_mode, per_cam, W, H, eps2d, near_plane, far_plane);
    return run_project<float>(dir, C, N, D, Kp, sh, depth_mode, per_cam, W, H, eps2d, near_plane, far_plane);
}

}  // namespace studio_cuda_emu
