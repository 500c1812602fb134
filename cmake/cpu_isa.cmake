# CPU instruction set for the C++ sources (not the CUDA ones).
#
#   -DLONGATTN_CPU_ISA=auto|avx512|avx2|none      (setup.py: env LONGATTN_CPU_ISA)
#
# auto asks the compiler what the build host supports (-march=native, then checks
# __AVX512{F,BW,VL,DQ}__ / __AVX2__ + __FMA__), re-checked on every configure.
# torch's at::vec picks its vector width from CPU_CAPABILITY_<X> / CPU_CAPABILITY,
# so these must be set for Vectorized<float> to be 16/8 lanes instead of the
# scalar DEFAULT fallback.
#
# Results: LONGATTN_CPU_ISA_RESOLVED (avx512|avx2|none), LONGATTN_CPU_ISA_FLAGS
# (compile options) and LONGATTN_CPU_ISA_DEFS (compile definitions).

include(CheckCXXSourceCompiles)

set(LONGATTN_CPU_ISA "auto" CACHE STRING "CPU ISA for C++ sources: auto|avx512|avx2|none")
set_property(CACHE LONGATTN_CPU_ISA PROPERTY STRINGS auto avx512 avx2 none)

function(_longattn_detect_cpu_isa out)
  set(${out} none PARENT_SCOPE)
  if(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    return()
  endif()
  set(CMAKE_REQUIRED_QUIET ON)
  set(CMAKE_REQUIRED_FLAGS "-march=native")
  # Fresh answers each configure: the build dir may outlive a change of machine.
  unset(_LONGATTN_HOST_AVX512 CACHE)
  unset(_LONGATTN_HOST_AVX2 CACHE)
  check_cxx_source_compiles("
    #if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__))
    #error no avx512
    #endif
    int main() { return 0; }" _LONGATTN_HOST_AVX512)
  if(_LONGATTN_HOST_AVX512)
    set(${out} avx512 PARENT_SCOPE)
    return()
  endif()
  check_cxx_source_compiles("
    #if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
    #error no avx2
    #endif
    int main() { return 0; }" _LONGATTN_HOST_AVX2)
  if(_LONGATTN_HOST_AVX2)
    set(${out} avx2 PARENT_SCOPE)
  endif()
endfunction()

string(TOLOWER "${LONGATTN_CPU_ISA}" _isa)
if(_isa STREQUAL "" OR _isa STREQUAL "auto")
  _longattn_detect_cpu_isa(_isa)
  set(_how "detected")
else()
  set(_how "requested")
endif()

if(_isa STREQUAL "avx512")
  set(LONGATTN_CPU_ISA_FLAGS -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c)
  set(LONGATTN_CPU_ISA_DEFS CPU_CAPABILITY_AVX512 CPU_CAPABILITY=AVX512)
elseif(_isa STREQUAL "avx2")
  set(LONGATTN_CPU_ISA_FLAGS -mavx2 -mfma -mf16c)
  set(LONGATTN_CPU_ISA_DEFS CPU_CAPABILITY_AVX2 CPU_CAPABILITY=AVX2)
elseif(_isa STREQUAL "none" OR _isa STREQUAL "default")
  set(_isa none)
  set(LONGATTN_CPU_ISA_FLAGS)
  set(LONGATTN_CPU_ISA_DEFS CPU_CAPABILITY=DEFAULT)
else()
  message(FATAL_ERROR "LONGATTN_CPU_ISA must be auto, avx512, avx2 or none (got '${LONGATTN_CPU_ISA}')")
endif()
set(LONGATTN_CPU_ISA_RESOLVED "${_isa}")
message(STATUS "longattn: CPU ISA ${_isa} (${_how}): ${LONGATTN_CPU_ISA_FLAGS}")
