// The failure counter and CHECK macro of the host checks in this folder: a failed check prints
// (the first 20) and counts, so one run reports every broken property, and main returns 1.
#pragma once
#include <cstdio>

inline int failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      if (failures < 20) {                                 \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
      ++failures;                                          \
    }                                                      \
  } while (0)
