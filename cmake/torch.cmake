# PyTorch discovery, in two steps:
#
#   include(torch)          probe: ask the Python interpreter for torch's CMake prefix,
#                           version and CUDA version (skipped for values the caller
#                           passed: setup.py passes all three). Sets
#                           LONGATTN_TORCH_VERSION, LONGATTN_TORCH_CUDA_VERSION ("" = CPU).
#   longattn_find_torch()   after cuda.cmake: find_package(Torch), then the link list
#                           and OpenMP. Sets LONGATTN_TORCH_LIBS, LONGATTN_TORCH_OPENMP.
#
# We link `torch` and `c10` (+ `c10_cuda`), not ${TORCH_LIBRARIES}: in the CUDA wheels
# that list carries CUDA_nvrtc_LIBRARY-NOTFOUND (the toolkit here ships no libnvrtc).
# libtorch_python is linked only with -DLONGATTN_LINK_TORCH_PYTHON=ON (needed only for
# pybind11 tensor casters / torch/python.h; the ops go through TORCH_LIBRARY instead).

option(LONGATTN_LINK_TORCH_PYTHON "Link libtorch_python (only for torch/python.h users)" OFF)

set(LONGATTN_TORCH_CMAKE_PREFIX "" CACHE PATH "torch.utils.cmake_prefix_path")
set(LONGATTN_TORCH_VERSION "" CACHE STRING "torch.__version__")
set(LONGATTN_TORCH_CUDA_VERSION "" CACHE STRING "torch.version.cuda, empty for CPU torch")

if(NOT LONGATTN_TORCH_CMAKE_PREFIX OR NOT LONGATTN_TORCH_VERSION)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import torch, torch.utils; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(torch.version.cuda or '')"
    OUTPUT_VARIABLE _torch_probe RESULT_VARIABLE _rc ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "longattn: cannot import torch with ${Python_EXECUTABLE}:\n${_err}")
  endif()
  string(REPLACE "\n" ";" _torch_probe "${_torch_probe}")
  list(LENGTH _torch_probe _n)
  list(GET _torch_probe 0 _prefix)
  list(GET _torch_probe 1 _ver)
  set(_cuda "")
  if(_n GREATER 2)
    list(GET _torch_probe 2 _cuda)
  endif()
  set(LONGATTN_TORCH_CMAKE_PREFIX "${_prefix}" CACHE PATH "torch.utils.cmake_prefix_path" FORCE)
  set(LONGATTN_TORCH_VERSION "${_ver}" CACHE STRING "torch.__version__" FORCE)
  set(LONGATTN_TORCH_CUDA_VERSION "${_cuda}" CACHE STRING "torch.version.cuda" FORCE)
endif()
list(PREPEND CMAKE_PREFIX_PATH "${LONGATTN_TORCH_CMAKE_PREFIX}")
message(STATUS "longattn: torch ${LONGATTN_TORCH_VERSION} (CUDA: '${LONGATTN_TORCH_CUDA_VERSION}')")

macro(longattn_find_torch)
  # TorchConfig looks for libkineto only to append it to TORCH_LIBRARIES, which we do
  # not use; the pip wheels link it statically, so the lookup just warns. Silence it.
  if(NOT kineto_LIBRARY)
    set(kineto_LIBRARY "kineto-not-used-by-longattn")
  endif()
  # enable_language(CUDA) defined CMAKE_CUDA_ARCHITECTURES; torch's CMake warns about
  # any value and then sets it OFF. We pass -gencode per file instead (cuda.cmake).
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  find_package(Torch REQUIRED CONFIG)
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  # torch's Caffe2 CMake appends -gencode flags for TORCH_CUDA_ARCH_LIST globally;
  # our per-file flags (cuda.cmake) replace them.
  longattn_strip_global_cuda_arch_flags()

  set(LONGATTN_TORCH_LIBS torch c10)
  if(LONGATTN_WITH_CUDA)
    list(APPEND LONGATTN_TORCH_LIBS c10_cuda)
  endif()
  if(LONGATTN_LINK_TORCH_PYTHON)
    find_library(LONGATTN_TORCH_PYTHON_LIBRARY torch_python
                 PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH REQUIRED)
    list(APPEND LONGATTN_TORCH_LIBS "${LONGATTN_TORCH_PYTHON_LIBRARY}")
  endif()

  # at::parallel_for is inline in the headers: with AT_PARALLEL_OPENMP it is an
  # `#pragma omp parallel`, which runs serially unless *our* sources get -fopenmp.
  # We link the libgomp.so.1 that torch ships (torch/lib) when there is one, so the
  # module shares torch's OpenMP runtime (one thread pool, torch.set_num_threads
  # applies) and no second libgomp directory lands in the RPATH.
  # LONGATTN_OPENMP_TARGET: the target to link (empty without OpenMP).
  set(LONGATTN_TORCH_OPENMP OFF)
  set(LONGATTN_OPENMP_TARGET "")
  file(STRINGS "${TORCH_INSTALL_PREFIX}/include/ATen/Config.h" _omp_line
       REGEX "^#define AT_PARALLEL_OPENMP 1")
  if(_omp_line)
    find_package(OpenMP COMPONENTS CXX)
    if(OpenMP_CXX_FOUND)
      set(LONGATTN_TORCH_OPENMP ON)
      set(_torch_gomp "${TORCH_INSTALL_PREFIX}/lib/libgomp.so.1")
      if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND EXISTS "${_torch_gomp}")
        if(NOT TARGET longattn_openmp)
          add_library(longattn_openmp INTERFACE)
          separate_arguments(_omp_flags UNIX_COMMAND "${OpenMP_CXX_FLAGS}")
          target_compile_options(longattn_openmp INTERFACE "$<$<COMPILE_LANGUAGE:CXX>:${_omp_flags}>")
          target_link_libraries(longattn_openmp INTERFACE "${_torch_gomp}")
        endif()
        set(LONGATTN_OPENMP_TARGET longattn_openmp)
      else()
        set(LONGATTN_OPENMP_TARGET OpenMP::OpenMP_CXX)
      endif()
    else()
      message(WARNING "longattn: torch uses OpenMP but the compiler has none: "
                      "at::parallel_for in this module will run on one thread")
    endif()
  endif()
  message(STATUS "longattn: at::parallel_for backend OpenMP: ${LONGATTN_TORCH_OPENMP} ${LONGATTN_OPENMP_TARGET}")
endmacro()
