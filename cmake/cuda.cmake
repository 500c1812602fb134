# CUDA: decide whether to build the CUDA sources, find the real toolkit, enable the
# language, and give per-file architecture helpers.
#
# Knobs (cache; setup.py fills them from the environment of the same name):
#   LONGATTN_CUDA        auto|0|1   auto = on when torch was built with CUDA
#                                    (LONGATTN_TORCH_CUDA_VERSION non-empty), nvcc
#                                    is found and CUTLASS headers are found
#   LONGATTN_CUDA_ARCHS  "80;90"    default architectures of every .cu file; entries
#                                    like 80, 8.0, sm_80, 90a, 9.0a, 90+PTX
#   LONGATTN_NVCC_THREADS  1        nvcc --threads
#   LONGATTN_CUDA_LINEINFO OFF      -lineinfo (profiling)
#
# The nvcc on PATH may be a wrapper script (it is on the build machine), so the real
# toolkit root is read from the TOP= line of `nvcc --dryrun` and the real nvcc is
# used as CMAKE_CUDA_COMPILER; CUDAToolkit_ROOT / CUDA_TOOLKIT_ROOT_DIR point at it
# for CMake's FindCUDAToolkit and torch's (legacy) FindCUDA.
#
# Sets LONGATTN_WITH_CUDA (ON/OFF), LONGATTN_CUDA_ARCHS_NORM (normalized list) and
# LONGATTN_WITH_SM90 (ON when CUDA is on and the list names a 9.x architecture: the wgmma/TMA
# kernels of csrc/cuda/attention/sm90/ are then built, for sm_90a only, since those
# instructions exist only on the arch-specific target).

set(LONGATTN_CUDA "auto" CACHE STRING "Build CUDA sources: auto|0|1")
set(LONGATTN_CUDA_ARCHS "80;90" CACHE STRING "CUDA architectures, e.g. 80;90 or 80;90a")
set(LONGATTN_NVCC_THREADS "1" CACHE STRING "nvcc --threads value")
option(LONGATTN_CUDA_LINEINFO "Compile CUDA with -lineinfo" OFF)

# ---- architecture helpers -------------------------------------------------------

# "8.0" -> "80", "sm_90a" -> "90a", "9.0a+PTX" -> "90a+PTX"
function(longattn_normalize_cuda_archs out)
  set(res)
  foreach(a IN LISTS ARGN)
    string(STRIP "${a}" a)
    if(a STREQUAL "")
      continue()
    endif()
    set(ptx "")
    if(a MATCHES "^(.*)\\+[Pp][Tt][Xx]$")
      set(a "${CMAKE_MATCH_1}")
      set(ptx "+PTX")
    endif()
    string(REGEX REPLACE "^(sm_|compute_)" "" a "${a}")
    string(REPLACE "." "" a "${a}")
    if(NOT a MATCHES "^[0-9]+[af]?$")
      message(FATAL_ERROR "longattn: bad CUDA architecture '${a}' (expected e.g. 80, 9.0, 90a, 90+PTX)")
    endif()
    list(APPEND res "${a}${ptx}")
  endforeach()
  list(REMOVE_DUPLICATES res)
  set(${out} "${res}" PARENT_SCOPE)
endfunction()

# "80;90a+PTX" -> "8.0;9.0a+PTX" (torch's TORCH_CUDA_ARCH_LIST spelling)
function(longattn_torch_arch_list out)
  longattn_normalize_cuda_archs(archs ${ARGN})
  set(res)
  foreach(a IN LISTS archs)
    string(REGEX MATCH "^([0-9]+)([0-9])([af]?)(\\+PTX)?$" _ "${a}")
    list(APPEND res "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}${CMAKE_MATCH_4}")
  endforeach()
  set(${out} "${res}" PARENT_SCOPE)
endfunction()

# -gencode options for a list of architectures: 90a -> -gencode=arch=compute_90a,code=sm_90a;
# 90+PTX additionally embeds PTX (code=compute_90). The `=` spelling keeps each option a
# single token, so CMake's option de-duplication cannot eat a repeated "-gencode".
function(longattn_cuda_gencode_flags out)
  longattn_normalize_cuda_archs(archs ${ARGN})
  set(flags)
  foreach(a IN LISTS archs)
    set(ptx OFF)
    if(a MATCHES "^(.*)\\+PTX$")
      set(a "${CMAKE_MATCH_1}")
      set(ptx ON)
    endif()
    list(APPEND flags "-gencode=arch=compute_${a},code=sm_${a}")
    if(ptx)
      list(APPEND flags "-gencode=arch=compute_${a},code=compute_${a}")
    endif()
  endforeach()
  set(${out} "${flags}" PARENT_SCOPE)
endfunction()

# longattn_set_cuda_archs(SOURCES a.cu b.cu ARCHS 90a)
# Per-file architectures (the target has CUDA_ARCHITECTURES OFF, so these -gencode
# options are the only ones). A file must get exactly one call. Call it from the
# directory that creates the target (source properties are directory-scoped).
function(longattn_set_cuda_archs)
  cmake_parse_arguments(ARG "" "" "SOURCES;ARCHS" ${ARGN})
  if(NOT ARG_SOURCES)
    return()
  endif()
  longattn_cuda_gencode_flags(flags ${ARG_ARCHS})
  if(NOT flags)
    message(FATAL_ERROR "longattn_set_cuda_archs: no architectures for ${ARG_SOURCES}")
  endif()
  set_property(SOURCE ${ARG_SOURCES} APPEND PROPERTY COMPILE_OPTIONS ${flags})
endfunction()

# torch's Caffe2 CMake appends -gencode options from TORCH_CUDA_ARCH_LIST to the global
# CMAKE_CUDA_FLAGS; remove them so the per-file options above are the only ones.
macro(longattn_strip_global_cuda_arch_flags)
  foreach(_var CMAKE_CUDA_FLAGS CMAKE_CUDA_FLAGS_RELEASE CMAKE_CUDA_FLAGS_DEBUG CMAKE_CUDA_FLAGS_RELWITHDEBINFO)
    if(DEFINED ${_var})
      string(REGEX REPLACE "(-gencode|--generate-code)[ =]+[^ ]+" "" ${_var} "${${_var}}")
      string(REGEX REPLACE "(^| )(-arch|--gpu-architecture|-code|--gpu-code)[ =]+[^ ]+" " " ${_var} "${${_var}}")
      string(REGEX REPLACE "  +" " " ${_var} "${${_var}}")
    endif()
  endforeach()
endmacro()

# ---- decision --------------------------------------------------------------------

longattn_normalize_cuda_archs(LONGATTN_CUDA_ARCHS_NORM ${LONGATTN_CUDA_ARCHS})

string(TOLOWER "${LONGATTN_CUDA}" _mode)
if(_mode MATCHES "^(1|on|true|yes|y|force)$")
  set(_cuda_required ON)
  set(_cuda_wanted ON)
elseif(_mode MATCHES "^(0|off|false|no|n|)$")
  set(_cuda_required OFF)
  set(_cuda_wanted OFF)
elseif(_mode STREQUAL "auto")
  set(_cuda_required OFF)
  if(LONGATTN_TORCH_CUDA_VERSION)
    set(_cuda_wanted ON)
  else()
    set(_cuda_wanted OFF)
    message(STATUS "longattn: CUDA off (torch ${LONGATTN_TORCH_VERSION} has no CUDA)")
  endif()
else()
  message(FATAL_ERROR "LONGATTN_CUDA must be auto, 0 or 1 (got '${LONGATTN_CUDA}')")
endif()

if(_cuda_required AND NOT LONGATTN_TORCH_CUDA_VERSION)
  message(FATAL_ERROR "longattn: LONGATTN_CUDA=1 but torch ${LONGATTN_TORCH_VERSION} was built without CUDA")
endif()

function(_longattn_cuda_off why)
  if(_cuda_required)
    message(FATAL_ERROR "longattn: LONGATTN_CUDA=1 but ${why}")
  endif()
  message(WARNING "longattn: CUDA off: ${why}")
endfunction()

set(LONGATTN_WITH_CUDA OFF)
if(_cuda_wanted AND NOT LONGATTN_HAS_CUTLASS)
  _longattn_cuda_off("no CUTLASS/CuTe headers (pip install nvidia-cutlass, or set LONGATTN_CUTLASS_DIR)")
  set(_cuda_wanted OFF)
endif()

# Resolve the real toolkit whenever torch has CUDA: torch's own CMake needs it too,
# even for a CPU-only build of this project. Skipped when the caller (setup.py)
# already passed CMAKE_CUDA_COMPILER.
if(_cuda_wanted OR LONGATTN_TORCH_CUDA_VERSION)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_hints)
    foreach(_e CUDA_HOME CUDA_PATH CUDA_ROOT)
      if(DEFINED ENV{${_e}})
        list(APPEND _hints "$ENV{${_e}}/bin")
      endif()
    endforeach()
    find_program(LONGATTN_NVCC NAMES nvcc HINTS ${_hints} PATHS /usr/local/cuda/bin)
    if(LONGATTN_NVCC)
      execute_process(COMMAND "${LONGATTN_NVCC}" --dryrun -x cu -c /dev/null -o /dev/null
                      OUTPUT_VARIABLE _o ERROR_VARIABLE _e RESULT_VARIABLE _rc)
      if("${_o}${_e}" MATCHES "#\\$ TOP=([^\r\n]+)")
        get_filename_component(_root "${CMAKE_MATCH_1}" REALPATH)
      else()
        get_filename_component(_nvcc_real "${LONGATTN_NVCC}" REALPATH)
        get_filename_component(_root "${_nvcc_real}/../.." REALPATH)
      endif()
      if(EXISTS "${_root}/bin/nvcc")
        set(CMAKE_CUDA_COMPILER "${_root}/bin/nvcc" CACHE FILEPATH "CUDA compiler" FORCE)
        if(NOT CUDAToolkit_ROOT)
          set(CUDAToolkit_ROOT "${_root}" CACHE PATH "CUDA toolkit root" FORCE)
        endif()
        if(NOT CUDA_TOOLKIT_ROOT_DIR)
          set(CUDA_TOOLKIT_ROOT_DIR "${_root}" CACHE PATH "CUDA toolkit root" FORCE)
        endif()
      endif()
    endif()
  endif()
  if(CMAKE_CUDA_COMPILER AND NOT CUDA_TOOLKIT_ROOT_DIR)
    get_filename_component(_root "${CMAKE_CUDA_COMPILER}/../.." REALPATH)
    set(CUDA_TOOLKIT_ROOT_DIR "${_root}" CACHE PATH "CUDA toolkit root" FORCE)
    if(NOT CUDAToolkit_ROOT)
      set(CUDAToolkit_ROOT "${_root}" CACHE PATH "CUDA toolkit root" FORCE)
    endif()
  endif()
endif()

if(_cuda_wanted)
  if(NOT CMAKE_CUDA_COMPILER)
    _longattn_cuda_off("nvcc not found (set CUDA_HOME or CMAKE_CUDA_COMPILER)")
  elseif(NOT LONGATTN_CUDA_ARCHS_NORM)
    _longattn_cuda_off("LONGATTN_CUDA_ARCHS is empty")
  else()
    if(CMAKE_VERSION VERSION_LESS 3.30)
      message(FATAL_ERROR "longattn: the CUDA build needs CMake >= 3.30 for CUDA C++20 "
                          "(this is ${CMAKE_VERSION}; pip install 'cmake>=3.30')")
    endif()
    if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER)
      set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}")
    endif()
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(CMAKE_CUDA_EXTENSIONS OFF)
    enable_language(CUDA)
    set(LONGATTN_WITH_CUDA ON)
    message(STATUS "longattn: CUDA ${CMAKE_CUDA_COMPILER_VERSION} at ${CUDA_TOOLKIT_ROOT_DIR}, archs ${LONGATTN_CUDA_ARCHS_NORM}")
  endif()
endif()

set(LONGATTN_WITH_SM90 OFF)
if(LONGATTN_WITH_CUDA)
  foreach(_a IN LISTS LONGATTN_CUDA_ARCHS_NORM)
    if(_a MATCHES "^9[0-9]")
      set(LONGATTN_WITH_SM90 ON)
    endif()
  endforeach()
endif()

# torch's CMake reads TORCH_CUDA_ARCH_LIST; without it, it tries to query a GPU.
# Needed whenever torch has CUDA, even for a CPU-only build of this project.
if(LONGATTN_TORCH_CUDA_VERSION AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  longattn_torch_arch_list(_tal ${LONGATTN_CUDA_ARCHS_NORM})
  if(NOT _tal)
    set(_tal "8.0")
  endif()
  set(ENV{TORCH_CUDA_ARCH_LIST} "${_tal}")
endif()
