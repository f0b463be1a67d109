// hyperlr_ext._C_emu, a test-only module: the CUDA kernels of csrc/cuda compiled as C++ against
// cuda_emu.h, registered as torch.ops.hyperlr_ext_emu.* (the schemas of hyperlr_ext) for CPU
// tensors, so that tests can compare them with the CPU kernels; and the knobs of the emulation.
// (The library itself is defined in selftest.cu.)
#include "cuda_emu.h"

#include <pybind11/pybind11.h>

#include <string>

PYBIND11_MODULE(_C_emu, m) {
  namespace py = pybind11;
  m.doc() =
      "hyperlr_ext's CUDA kernels run on the CPU (tests only); importing it registers "
      "torch.ops.hyperlr_ext_emu.*";
  m.def(
      "set_schedule",
      [](uint64_t seed, const std::string& mode) {
        if (mode != "fiber" && mode != "thread") {
          throw py::value_error("mode must be 'fiber' or 'thread', got '" + mode + "'");
        }
        cuda_emu::schedule().seed = seed;
        cuda_emu::schedule().mode = mode == "thread" ? cuda_emu::Mode::kThread
                                                     : cuda_emu::Mode::kFiber;
      },
      py::arg("seed"), py::arg("mode") = "fiber",
      "Seed of the block order and thread interleaving; threads as fibers or OS threads.");
  m.def(
      "schedule",
      []() {
        const cuda_emu::Schedule& s = cuda_emu::schedule();
        return py::make_tuple(s.seed, s.mode == cuda_emu::Mode::kThread ? "thread" : "fiber");
      },
      "The current (seed, mode).");
  m.def(
      "stats",
      []() {
        const cuda_emu::Stats& s = cuda_emu::stats();
        py::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["max_grid"] = s.max_grid;
        return d;
      },
      "Kernel launches, blocks run, and the largest grid since reset_stats().");
  m.def(
      "reset_stats", []() { cuda_emu::stats() = cuda_emu::Stats{}; },
      "Zero the counters of stats().");
}
