# Compiler launcher: use ccache when it is installed. Never required.
#   -DLONGATTN_CCACHE=OFF disables it; -DLONGATTN_CCACHE_PROGRAM=/path picks one.
# Looked up on PATH and next to the Python interpreter (a `ccache` pip package
# installs its binary into the venv's bin/).

option(LONGATTN_CCACHE "Use ccache as compiler launcher when found" ON)

if(LONGATTN_CCACHE)
  set(_longattn_ccache_hints)
  if(Python_EXECUTABLE)
    get_filename_component(_py_bin "${Python_EXECUTABLE}" DIRECTORY)
    list(APPEND _longattn_ccache_hints "${_py_bin}")
  endif()
  find_program(LONGATTN_CCACHE_PROGRAM NAMES ccache HINTS ${_longattn_ccache_hints})
  if(LONGATTN_CCACHE_PROGRAM)
    foreach(_lang CXX CUDA)
      if(NOT CMAKE_${_lang}_COMPILER_LAUNCHER)
        set(CMAKE_${_lang}_COMPILER_LAUNCHER "${LONGATTN_CCACHE_PROGRAM}")
      endif()
    endforeach()
    message(STATUS "longattn: compiler launcher ${LONGATTN_CCACHE_PROGRAM}")
  else()
    message(STATUS "longattn: ccache not found (optional)")
  endif()
endif()
