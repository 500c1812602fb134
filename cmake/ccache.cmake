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
    # base_dir = the source root: paths under it (sources, include dirs, venvs, carried headers)
    # enter the hash relative, so clones at other paths (CI's clean clone, a rehearsal) share
    # the cache instead of recompiling every CUDA file.
    foreach(_lang CXX CUDA)
      if(NOT CMAKE_${_lang}_COMPILER_LAUNCHER)
        set(CMAKE_${_lang}_COMPILER_LAUNCHER
            "${CMAKE_COMMAND};-E;env;CCACHE_BASEDIR=${CMAKE_SOURCE_DIR};${LONGATTN_CCACHE_PROGRAM}")
      endif()
    endforeach()
    message(STATUS "longattn: compiler launcher ${LONGATTN_CCACHE_PROGRAM}")
  else()
    message(STATUS "longattn: ccache not found (optional)")
  endif()
endif()
