# The two commands of the README: `make test` and `make bench`. Each creates .venv if missing,
# installs torch and this package into it (compiling csrc/, CUDA kernels included when nvcc is
# found), then runs. Incremental: the CMake build tree lives in build/ and is reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.14.1
NPROC := $(shell nproc 2>/dev/null || echo 2)
# What `make bench` passes to `python -m benchmarks`, e.g. make bench BENCH_ARGS="--help".
BENCH_ARGS ?=

# Runs module $(1) with the repo root at the END of sys.path: `python -m` from here would put the
# source tree first and import its hyperlr_ext, which has no compiled _C (the fallback path).
RUN_MODULE = $(PY) -c "import os, runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())] + [os.getcwd()]; runpy.run_module('$(1)', run_name='__main__', alter_sys=True)"

.PHONY: venv install test bench lint wheel wheel-test emu-sanitizers gpu-check clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and the build tools, only when missing (a repeat run costs one interpreter start).
venv: $(PY)
	@$(PY) -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'scikit_build_core', 'pybind11', 'ninja', 'cmake')))" \
	  || $(PIP) install "$(TORCH_SPEC)" scikit-build-core pybind11 ninja "cmake>=3.26"

# HYPERLR_CUDA_EMU: also hyperlr_ext._C_emu, the CUDA kernels run on the CPU for the tests
# (docs/cuda_testing.md); `make wheel` leaves it out.
install: venv
	CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) $(PIP) install --no-build-isolation \
	  -C cmake.define.HYPERLR_CUDA_EMU=ON ".[test,bench]"

# .venv/bin/pytest does not put the working directory on sys.path: the tests import the installed
# package (with its compiled _C), not the source tree.
test: install
	HYPERLR_REQUIRE_EXTENSION=1 $(VENV)/bin/pytest -q

bench: install
	$(call RUN_MODULE,benchmarks) $(BENCH_ARGS)

# A compiled wheel in dist/: the CPU kernels and, where nvcc is found, the CUDA kernels (SASS for
# sm_80 and sm_90 plus PTX, TORCH_CUDA_ARCH_LIST in CMakeLists.txt); it records the torch it was
# built against and runs only under that torch release (else the pure-PyTorch paths).
wheel: venv
	rm -rf dist
	CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) $(PIP) wheel --no-build-isolation --no-deps -w dist .

# Installs the wheel into a fresh virtual environment (with torch, nothing from the source tree)
# and runs tests/wheel/smoke.py from outside the source tree.
WHEEL_VENV ?= /tmp/hyperlr-wheel-venv
wheel-test: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q "$(TORCH_SPEC)" dist/*.whl
	cd /tmp && $(WHEEL_VENV)/bin/python $(CURDIR)/tests/wheel/smoke.py $(WHEEL_SMOKE_ARGS)

# The CUDA kernels on the CPU under ThreadSanitizer (threads as OS threads) and AddressSanitizer +
# UBSan (OS threads and fibers), on small inputs: tests/cuda_emu/driver.cpp runs every kernel;
# any report fails. The TSan build must also report the known race of the selftest kernel
# racy_block_sum. Not part of `make test` (about 6 minutes on 2 cores); CI runs it.
EMU_BUILD := build/emu
TSAN_ENV := TSAN_OPTIONS=halt_on_error=1:exitcode=66:report_signal_unsafe=0
ASAN_ENV := ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
emu-sanitizers: venv
	@for sanitizer in thread address,undefined; do \
	  dir=$(EMU_BUILD)-$$(echo $$sanitizer | tr , -); \
	  HYPERLR_CUDA=0 $(VENV)/bin/cmake -S . -B $$dir -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja \
	    -DPython_EXECUTABLE=$(CURDIR)/$(PY) -DCMAKE_BUILD_TYPE=None \
	    "-DCMAKE_CXX_FLAGS=-O1 -g1" \
	    -DHYPERLR_EMU_SANITIZE=$$sanitizer >/dev/null || exit 1; \
	  $(VENV)/bin/cmake --build $$dir --target cuda_emu_driver -j $(NPROC) || exit 1; \
	done
	$(TSAN_ENV) CUDA_EMU_MODE=thread $(EMU_BUILD)-thread/cuda_emu_driver --small
	@if $(TSAN_ENV) CUDA_EMU_MODE=thread $(EMU_BUILD)-thread/cuda_emu_driver --racy > $(EMU_BUILD)-thread/racy.log 2>&1; then \
	  echo "emu-sanitizers: ThreadSanitizer missed the race of racy_block_sum"; exit 1; \
	elif ! grep -q "ThreadSanitizer: data race" $(EMU_BUILD)-thread/racy.log; then \
	  cat $(EMU_BUILD)-thread/racy.log; echo "emu-sanitizers: racy_block_sum failed without a race report"; exit 1; \
	else echo "emu-sanitizers: ThreadSanitizer reports the race of racy_block_sum, as it must"; fi
	$(ASAN_ENV) CUDA_EMU_MODE=thread $(EMU_BUILD)-address-undefined/cuda_emu_driver --small
	$(ASAN_ENV) CUDA_EMU_MODE=fiber CUDA_EMU_SEED=1 $(EMU_BUILD)-address-undefined/cuda_emu_driver --small

# On a machine with a CUDA GPU whose python3 already has torch, nvcc, cmake, ninja, pybind11 and
# scikit-build-core (no .venv, no network): build in place for sm_90, then run the GPU tests,
# compute-sanitizer over every kernel and the step-time table (benchmarks/gpu_check.py, which
# writes benchmarks/results/gpu_check.md).
GPU_PYTHON ?= python3
GPU_ARCH ?= 9.0
gpu-check:
	TORCH_CUDA_ARCH_LIST="$(GPU_ARCH)" CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) \
	  $(GPU_PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(GPU_PYTHON) -m benchmarks.gpu_check

# ruff comes with the test extra (installed here only when missing: CI runs this after the
# tests, whose install it would otherwise repeat).
lint: venv
	@test -x $(VENV)/bin/ruff || $(PIP) install ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build/ *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	find hyperlr_ext -name '*.so' -delete

distclean: clean
	rm -rf $(VENV)
