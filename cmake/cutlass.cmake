# CUTLASS / CuTe headers (header-only). Only CUDA sources need them, but the include
# directory is added to the target whenever it is found.
#
# Where they come from, first hit wins:
#   1. -DLONGATTN_CUTLASS_INCLUDE_DIR=<dir>   (cache variable)
#   2. environment LONGATTN_CUTLASS_DIR=<dir> (e.g. a copied header folder on a GPU box)
#   3. the `nvidia-cutlass` Python package: <site-packages>/cutlass_library/source/include
# <dir> may be the include folder itself (holding cute/ and cutlass/) or a CUTLASS
# checkout/copy whose include/ holds them. tools/util/include is added when present.
#
# Sets LONGATTN_CUTLASS_INCLUDE_DIRS (list, may be empty) and LONGATTN_HAS_CUTLASS.
# Included before cuda.cmake, which refuses (LONGATTN_CUDA=1) or skips (auto) CUDA without it.

set(LONGATTN_CUTLASS_INCLUDE_DIR "" CACHE PATH "CUTLASS include dir (holds cute/ and cutlass/)")

function(_longattn_cutlass_normalize dir out_inc out_util)
  set(${out_inc} "" PARENT_SCOPE)
  set(${out_util} "" PARENT_SCOPE)
  if(NOT dir OR NOT IS_DIRECTORY "${dir}")
    return()
  endif()
  get_filename_component(dir "${dir}" ABSOLUTE)
  if(EXISTS "${dir}/cute/tensor.hpp")
    set(inc "${dir}")
    get_filename_component(root "${dir}" DIRECTORY)
  elseif(EXISTS "${dir}/include/cute/tensor.hpp")
    set(inc "${dir}/include")
    set(root "${dir}")
  elseif(EXISTS "${dir}/source/include/cute/tensor.hpp")  # cutlass_library package dir
    set(inc "${dir}/source/include")
    set(root "${dir}/source")
  else()
    return()
  endif()
  set(${out_inc} "${inc}" PARENT_SCOPE)
  if(IS_DIRECTORY "${root}/tools/util/include/cutlass")
    set(${out_util} "${root}/tools/util/include" PARENT_SCOPE)
  endif()
endfunction()

set(_cutlass_src "")
set(_cutlass_inc "")
set(_cutlass_util "")
if(LONGATTN_CUTLASS_INCLUDE_DIR)
  _longattn_cutlass_normalize("${LONGATTN_CUTLASS_INCLUDE_DIR}" _cutlass_inc _cutlass_util)
  set(_cutlass_src "LONGATTN_CUTLASS_INCLUDE_DIR")
  if(NOT _cutlass_inc)
    message(FATAL_ERROR "LONGATTN_CUTLASS_INCLUDE_DIR=${LONGATTN_CUTLASS_INCLUDE_DIR} holds no cute/tensor.hpp")
  endif()
elseif(DEFINED ENV{LONGATTN_CUTLASS_DIR} AND NOT "$ENV{LONGATTN_CUTLASS_DIR}" STREQUAL "")
  _longattn_cutlass_normalize("$ENV{LONGATTN_CUTLASS_DIR}" _cutlass_inc _cutlass_util)
  set(_cutlass_src "env LONGATTN_CUTLASS_DIR")
  if(NOT _cutlass_inc)
    message(FATAL_ERROR "LONGATTN_CUTLASS_DIR=$ENV{LONGATTN_CUTLASS_DIR} holds no cute/tensor.hpp")
  endif()
else()
  # find_spec: locate the package without importing it.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u; s = u.find_spec('cutlass_library'); print(list(s.submodule_search_locations)[0] if s else '')"
    OUTPUT_VARIABLE _cutlass_pkg OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _rc ERROR_QUIET)
  if(_rc EQUAL 0 AND _cutlass_pkg)
    _longattn_cutlass_normalize("${_cutlass_pkg}" _cutlass_inc _cutlass_util)
    set(_cutlass_src "nvidia-cutlass package")
  endif()
endif()

set(LONGATTN_CUTLASS_INCLUDE_DIRS ${_cutlass_inc} ${_cutlass_util})
if(_cutlass_inc)
  set(LONGATTN_HAS_CUTLASS ON)
  message(STATUS "longattn: CUTLASS headers ${_cutlass_inc} (from ${_cutlass_src})")
else()
  set(LONGATTN_HAS_CUTLASS OFF)
  message(STATUS "longattn: CUTLASS headers not found (only CUDA sources need them)")
endif()
