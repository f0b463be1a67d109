# The CUDA emulation builds (docs/cuda_testing.md), included by the top-level CMakeLists.txt when
# HYPERLR_CUDA_EMU is ON: csrc/cuda/*.cu compiled as C++ against tests/cuda_emu/cuda_emu.h.
#   _C_emu            hyperlr_ext._C_emu, the kernels as torch.ops.hyperlr_ext_emu.* (make test)
#   cuda_emu_driver   an executable that runs every kernel, built with HYPERLR_EMU_SANITIZE
#                     (thread, or address,undefined) by `make emu-sanitizers`; not installed
set(HYPERLR_EMU_DIR "${CMAKE_CURRENT_SOURCE_DIR}/tests/cuda_emu")

# One wrapper per .cu file: the emulation header first, then the kernel source, as C++.
file(GLOB _emu_cuda_sources CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")
list(APPEND _emu_cuda_sources "${HYPERLR_EMU_DIR}/selftest.cu")
set(HYPERLR_EMU_KERNEL_SOURCES "")
foreach(_cu ${_emu_cuda_sources})
  get_filename_component(_name "${_cu}" NAME)
  set(_wrapper "${CMAKE_CURRENT_BINARY_DIR}/cuda_emu/${_name}.cpp")
  file(CONFIGURE OUTPUT "${_wrapper}"
       CONTENT "#include \"cuda_emu.h\"\n#include \"${_cu}\"\n" @ONLY)
  list(APPEND HYPERLR_EMU_KERNEL_SOURCES "${_wrapper}")
endforeach()

# The host code the kernels call (argument checks, contiguity, schemas); not the CPU kernels.
set(HYPERLR_EMU_HOST_SOURCES "")
foreach(_name fused_args multi_tensor_dot schemas sgd_hd adam_hd tangent tlr hyper_lr)
  list(APPEND HYPERLR_EMU_HOST_SOURCES "${CMAKE_CURRENT_SOURCE_DIR}/csrc/${_name}.cpp")
endforeach()

function(hyperlr_emu_settings target)
  target_include_directories(${target} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc"
                                               "${HYPERLR_EMU_DIR}")
  target_compile_definitions(${target} PRIVATE HYPERLR_CUDA_EMU=1)
  # The CPU kernels' rounding (no FMA contraction); -fdata-sections gives every template's
  # shared memory its own section for shared_memory.ld; the fibers switch stacks with longjmp,
  # which _FORTIFY_SOURCE's longjmp check refuses.
  target_compile_options(${target} PRIVATE -ffp-contract=off -fno-trapping-math -fno-math-errno
                                           -fdata-sections -U_FORTIFY_SOURCE)
  target_link_options(${target} PRIVATE "-Wl,-T,${HYPERLR_EMU_DIR}/shared_memory.ld")
  set_target_properties(${target} PROPERTIES CXX_VISIBILITY_PRESET hidden
                                             VISIBILITY_INLINES_HIDDEN ON)
  target_link_libraries(${target} PRIVATE ${HYPERLR_TORCH_TARGETS})
endfunction()

if(NOT HYPERLR_EMU_SANITIZE)
  Python_add_library(_C_emu MODULE WITH_SOABI ${HYPERLR_EMU_KERNEL_SOURCES}
                     ${HYPERLR_EMU_HOST_SOURCES} "${HYPERLR_EMU_DIR}/module.cpp")
  hyperlr_emu_settings(_C_emu)
  target_link_libraries(_C_emu PRIVATE "${TORCH_PYTHON_LIBRARY}")
  target_compile_definitions(_C_emu PRIVATE TORCH_EXTENSION_NAME=_C_emu)
  install(TARGETS _C_emu DESTINATION hyperlr_ext)
else()
  add_executable(cuda_emu_driver ${HYPERLR_EMU_KERNEL_SOURCES} ${HYPERLR_EMU_HOST_SOURCES}
                 "${HYPERLR_EMU_DIR}/driver.cpp")
  hyperlr_emu_settings(cuda_emu_driver)
  target_compile_options(cuda_emu_driver PRIVATE -fsanitize=${HYPERLR_EMU_SANITIZE}
                         -fno-sanitize-recover=all -fno-omit-frame-pointer -g1)
  target_link_options(cuda_emu_driver PRIVATE -fsanitize=${HYPERLR_EMU_SANITIZE})
  if(HYPERLR_EMU_SANITIZE MATCHES "thread")
    # __threadfence is a fence, which TSan does not model; the blocks run one after another, so
    # nothing here relies on it.
    target_compile_options(cuda_emu_driver PRIVATE -Wno-tsan)
  endif()
  set_target_properties(cuda_emu_driver PROPERTIES BUILD_RPATH "${_torch_lib_dir}")
endif()
