// The key-tile schedule of the tensor-core forwards (cuda/attention/key_tiles.h) against brute
// force on random masks: every visible key of a query tile is visited exactly once, no visited
// tile is empty, TileMask equals MaskParams::visible on the whole tile width, and skipped tiles
// have no visible key.
#pragma once
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "common/mask.h"
#include "cuda/attention/flash/score_tile.h"
#include "cuda/attention/key_tiles.h"
#include "host_check.h"

namespace longattn::host_check {

using namespace longattn;
using namespace longattn::cuda;
using longattn::cuda::flash::TileMask;

inline MaskParams random_mask(std::mt19937_64& rng) {
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  MaskParams m;
  m.causal = pick(0, 1);
  m.sinks = pick(0, 3) == 0 ? pick(0, 300) : 0;
  m.left = pick(0, 2) == 0 ? kUnbounded : pick(0, 400);
  m.right = pick(0, 2) == 0 ? kUnbounded : pick(-100, 300);
  if (m.left != kUnbounded && m.right != kUnbounded && m.left + m.right < 0) m.right = -m.left;
  m.k_start = pick(0, 3) == 0 ? pick(-50, 500) : 0;
  m.q_start = pick(-100, 900);
  return m;
}

template <int kBlockM, int kBlockN>
void check_schedule(int trials) {
  std::mt19937_64 rng(1234 + kBlockM + kBlockN);
  long tiles_full = 0, tiles_partial = 0, tiles_empty = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const MaskParams m = random_mask(rng);
    const int64_t Lq = std::uniform_int_distribution<int64_t>(1, 600)(rng);
    const int64_t Lk = std::uniform_int_distribution<int64_t>(0, 700)(rng);
    for (int64_t i0 = 0; i0 < Lq; i0 += kBlockM) {
      const int64_t nq = std::min<int64_t>(kBlockM, Lq - i0);
      const KeyTiles<kBlockN> tiles(m, i0, nq, Lk);
      CHECK(tiles.p0 == m.q_start + i0, "p0");
      std::vector<int> owner(Lk, -1);
      for (int t = tiles.next_visible(m, 0); t < tiles.count; t = tiles.next_visible(m, t + 1)) {
        int j0, nk;
        tiles.at(t, &j0, &nk);
        CHECK(nk >= 1 && nk <= kBlockN && j0 >= 0 && j0 + nk <= Lk, "tile bounds j0=%d nk=%d Lk=%lld", j0, nk, (long long)Lk);
        const TileKind kind = tiles.kind(m, j0, nk);
        CHECK(kind != TileKind::kEmpty, "next_visible returned an empty tile");
        kind == TileKind::kFull ? ++tiles_full : ++tiles_partial;
        const TileMask tm(m, tiles.p0, m.k_start + j0, nk);
        for (int j = j0; j < j0 + nk; ++j) {
          CHECK(owner[j] < 0, "key %d in two tiles", j);
          owner[j] = t;
        }
        // Every column of the full key tile width, including the columns past nk.
        for (int r = 0; r < nq; ++r) {
          const TileMask::Row row = tm.row(r);
          for (int c = 0; c < kBlockN; ++c) {
            const bool expect = c < nk && m.visible(tiles.p0 + r, m.k_start + j0 + c);
            CHECK(row.visible(c) == expect, "TileMask r=%d c=%d kind=%d: %d vs %d", r, c, int(kind), row.visible(c), expect);
          }
        }
      }
      for (int t = 0; t < tiles.count; ++t) {
        int j0, nk;
        tiles.at(t, &j0, &nk);
        if (tiles.kind(m, j0, nk) == TileKind::kEmpty) {
          ++tiles_empty;
          for (int r = 0; r < nq; ++r)
            for (int j = j0; j < j0 + nk; ++j) CHECK(!m.visible(tiles.p0 + r, m.k_start + j), "empty tile has a visible key");
        }
      }
      for (int r = 0; r < nq; ++r)
        for (int64_t j = 0; j < Lk; ++j)
          if (m.visible(tiles.p0 + r, m.k_start + j)) CHECK(owner[j] >= 0, "visible key %lld of row %d not visited", (long long)j, r);
    }
  }
  std::printf("schedule %dx%d: %d masks ok (%ld full, %ld partial, %ld empty tiles)\n", kBlockM, kBlockN,
              trials, tiles_full, tiles_partial, tiles_empty);
}

}  // namespace longattn::host_check
