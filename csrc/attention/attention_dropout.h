// Which Philox call each lane of a warp makes in the attention kernels' dropout, and where each
// accumulator element finds its keep bit: host/device functions shared by attention_kernel.cu and
// the warp simulation in csrc/tests/test_attention_dropout_lanes.cpp.
//
// An mma.m16n8k16 accumulator tile is 16 rows x 8 columns; lane l (g = l / 4, t = l % 4) holds
// element e (0..3) at row g + 8 (e / 2), column 2t + (e & 1) (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"). One Philox call covers one (query, 4-key group): 16 x 8 elements need 32 calls,
// one per lane.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace lub_fast {
namespace attention_cuda {

// A lane's Philox call: tile-relative query row and 4-key group.
struct Draw {
  int query;
  int group;
};

// Forward tile: rows are 16 queries, columns 8 keys (groups 0, 1). Lane (g, t) draws query
// g + 8 (t & 1), group t / 2, and swaps its 4 keep bits with lane l ^ 1.
LUB_FAST_HD Draw fwd_draw(int lane) { return Draw{lane / 4 + 8 * (lane & 1), (lane % 4) / 2}; }

// Keep bit of element e given this lane's bits and those received from lane ^ 1.
LUB_FAST_HD uint32_t fwd_keep(int lane, int e, uint32_t mine, uint32_t partner) {
  const int odd = lane & 1;
  const uint32_t bits = ((e < 2) == (odd == 0)) ? mine : partner;
  return (bits >> (2 * odd + (e & 1))) & 1u;
}

// Backward tile (S^T): rows are the warp's 16 keys (groups 0..3), columns 8 queries. Lane l draws
// query l % 8, group l / 8; element e reads the bits of lane bwd_source(lane, e).
LUB_FAST_HD Draw bwd_draw(int lane) { return Draw{lane % 8, lane / 8}; }

LUB_FAST_HD int bwd_source(int lane, int e) {
  return (lane / 16) * 8 + 2 * (lane % 4) + (e & 1) + 16 * (e / 2);
}

LUB_FAST_HD uint32_t bwd_keep(int lane, uint32_t bits) { return (bits >> ((lane / 4) & 3)) & 1u; }

}  // namespace attention_cuda
}  // namespace lub_fast
