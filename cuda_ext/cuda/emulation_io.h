// Raw binary file IO shared by the CPU emulators of the CUDA kernels (host_emulation.h, mesh_emulation.h):
// the tests write kernel inputs as .bin files, the emulator reads them and writes its outputs back.
// Test harness only; never part of a CUDA build.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace studio_emu_io {

// Read `count` values of T from `path`; exits with code 2 and a message if the file is missing or short.
template <typename T>
std::vector<T> read_file(const std::string& path, size_t count) {
    std::vector<T> v(count);
    if (count == 0) return v;
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) {
        std::fprintf(stderr, "cannot open %s\n", path.c_str());
        std::exit(2);
    }
    if (std::fread(v.data(), sizeof(T), count, f) != count) {
        std::fprintf(stderr, "short read %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

template <typename T>
void write_file(const std::string& path, const std::vector<T>& v) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(2);
    }
    if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), f);
    std::fclose(f);
}

}  // namespace studio_emu_io
