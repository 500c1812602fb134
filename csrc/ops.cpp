// Every longattn op schema, in one place. Backends register implementations with
// TORCH_LIBRARY_IMPL in their own translation units (cpu/register.cpp, cpu/rope.cpp,
// cpu/kvcache.cpp, cuda/*_register.cpp); Python adds fake kernels and autograd
// (python/longattn/_ops.py, _rope_ops.py, _kvcache_ops.py). The ring attention ops are
// Python custom ops (python/longattn/ring/ops.py) over these.
#include <torch/library.h>

TORCH_LIBRARY(longattn, m) {
  // Tiled attention with the long-context mask family. Returns out (q's dtype) and lse (fp32;
  // fp64 for fp64 inputs).
  // window_left/right use longattn.UNBOUNDED (2**62) for "no limit"; softcap 0 and
  // logn_base 0 mean off; q_start None means bottom-right aligned (k_start + Lk - Lq per sequence).
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? alibi_slopes, Tensor? sink_logits, float scale, float softcap, float logn_base, "
      "bool causal, int window_left, int window_right, int sinks, int? q_start, int k_start, "
      "SymInt? max_seqlen_q, SymInt? max_seqlen_k) -> (Tensor out, Tensor lse)");
  // Gradients of attention given dout and (optionally) dlse; dsink is empty without sink_logits.
  m.def(
      "attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? alibi_slopes, "
      "Tensor? sink_logits, float scale, float softcap, float logn_base, bool causal, "
      "int window_left, int window_right, int sinks, int? q_start, int k_start, "
      "SymInt? max_seqlen_q, SymInt? max_seqlen_k) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink)");
  // Attention over q and k rotated by RoPE inside the kernel (rotary part as rope's:
  // inv_freq, attention_scaling on cos and sin, rotary_dim, NeoX or interleaved pairs), with a
  // position remap (common/remap.h): 'none' (plain RoPE, causal or not), 'self_extend'
  // (window, group_size), 'rerope' (window, leak; 0: not leaky), 'lm_infinite' (window = the
  // local window, global_tokens, max_distance); the remaps are causal. Query row i at
  // q_start + i (None: bottom-right, Lk - Lq per sequence), key j at j. Scores: scale, softcap,
  // sink_logits as attention's. Returns out (q's dtype) and lse (fp32; fp64 for fp64 inputs).
  m.def(
      "rope_attention(Tensor q, Tensor k, Tensor v, Tensor inv_freq, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? sink_logits, str remap, int window, int group_size, "
      "float leak, int global_tokens, int max_distance, float attention_scaling, int rotary_dim, "
      "bool interleaved, float scale, float softcap, bool causal, int? q_start, "
      "SymInt? max_seqlen_q, SymInt? max_seqlen_k) -> (Tensor out, Tensor lse)");
  // Its gradients given dout and (optionally) dlse, through the rotations back to the inputs
  // before RoPE; dsink is empty without sink_logits. No gradient for inv_freq.
  m.def(
      "rope_attention_backward(Tensor dout, Tensor? dlse, Tensor out, Tensor lse, Tensor q, "
      "Tensor k, Tensor v, Tensor inv_freq, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? sink_logits, str remap, int window, int group_size, float leak, "
      "int global_tokens, int max_distance, float attention_scaling, int rotary_dim, "
      "bool interleaved, float scale, float softcap, bool causal, int? q_start, "
      "SymInt? max_seqlen_q, SymInt? max_seqlen_k) -> (Tensor dq, Tensor dk, Tensor dv, "
      "Tensor dsink)");
  // Log-sum-exp merge of partial attentions over disjoint key sets (fp32 accumulation).
  m.def("merge_attention(Tensor[] outs, Tensor[] lses) -> (Tensor out, Tensor lse)");
  m.def(
      "merge_attention_backward(Tensor dout, Tensor? dlse, Tensor[] outs, Tensor[] lses, "
      "Tensor out, Tensor lse) -> (Tensor[] douts, Tensor[] dlses)");
  // The running form, in place (ring attention's hop accumulation; no autograd): the partial
  // (part_out [*, n, H, D], part_lse [*, H, n]) joins rows [row_start, row_start + n) of the
  // running out [*, L, H, D] and lse [*, H, L], contiguous, fp32 (fp64 for fp64 part_out).
  m.def(
      "merge_attention_(Tensor(a!) out, Tensor(b!) lse, Tensor part_out, Tensor part_lse, "
      "int row_start) -> ()");
  // RoPE: rotate the first rotary_dim features of every head of q (and k, may be None) by
  // positions[token] * inv_freq (the angle reduced exactly, common/rope_math.h), cos/sin times
  // attention_scaling; inverse rotates by the opposite angle (the backward). q/k: (B, L, H, D)
  // with positions (B, L), (1, L) or (L,), or (T, H, D) with positions (T,). Outputs are
  // contiguous; k_out is an empty 1-D tensor when k is None.
  m.def(
      "rope(Tensor q, Tensor? k, Tensor positions, Tensor inv_freq, float attention_scaling, "
      "int rotary_dim, bool interleaved, bool inverse) -> (Tensor q_out, Tensor k_out)");
  // The same, in place on q and k (inference; no autograd).
  m.def(
      "rope_(Tensor(a!) q, Tensor(b!)? k, Tensor positions, Tensor inv_freq, "
      "float attention_scaling, int rotary_dim, bool interleaved, bool inverse) -> ()");
  // Backward of rope(q, k, ..., inverse) when inv_freq needs a gradient: dq/dk (the incoming
  // gradients rotated back; empty 1-D tensors unless input_grads; dk empty without k) and
  // dinv_freq[i] = sum over tokens t and heads of sign * positions[t] * (x_a dx_b - x_b dx_a)
  // of pair i (x the forward input, dx its gradient, sign -1 when inverse), reduced in a
  // fixed order (deterministic). q and k are the forward's inputs, k given iff dk_out is.
  m.def(
      "rope_backward(Tensor dq_out, Tensor? dk_out, Tensor q, Tensor? k, Tensor positions, "
      "Tensor inv_freq, float attention_scaling, int rotary_dim, bool interleaved, bool inverse, "
      "bool input_grads) -> (Tensor dq, Tensor dk, Tensor dinv_freq)");
  // KV cache (python/longattn/kvcache.py). decode_attention: q (B, Hq, n, D) over a cache
  // (B, Hkv, C, D) with per-(b, h) lengths; key j of (b, h) is visible to new query i when
  // j < lengths[b, h] and, with q_positions (B, n): positions[b, h, j] (default j) <=
  // q_positions[b, i] and (window < 0 or the distance <= window or j < sinks). Returns out
  // (B, Hq, n, Dv) and lse (B, Hq, n). With scores (B, Hkv, C) fp32, adds the probabilities
  // summed over the q heads of each kv head and over the n queries (in place).
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, "
      "Tensor? positions, Tensor? q_positions, float scale, int window, int sinks, "
      "Tensor(a!)? scores) -> (Tensor out, Tensor lse)");
  // Keep keep[b, h, :keep_lengths[b, h]] (strictly ascending, < lengths[b, h]) of every
  // (b, h), moving rows down in place with their positions and scores; lengths <- keep_lengths.
  m.def(
      "compact_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? positions, "
      "Tensor(d!)? scores, Tensor(e!) lengths, Tensor keep, Tensor keep_lengths) -> ()");
  // compact_ that also moves the kept keys to new positions: key keep[b, h, j] is rotated by
  // (new_positions[b, h, j] - positions[b, h, keep[b, h, j]]) * inv_freq on its first
  // rotary_dim features (NeoX halves, or interleaved pairs; the angle exact as in rope) as it
  // moves to row j, and positions[b, h, j] <- new_positions[b, h, j] (B, H, K like keep).
  // Equals compact_ then rerotate_keys, in one pass over the cache.
  m.def(
      "compact_rerotate_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) positions, "
      "Tensor(d!)? scores, Tensor(e!) lengths, Tensor keep, Tensor keep_lengths, "
      "Tensor new_positions, Tensor inv_freq, int rotary_dim, bool interleaved) -> ()");
  // Paged caches (common/kv_slots.h): pools (num_blocks, block_size, Hp, D) with Hp 1 (blocks
  // per (b, h)) or Hkv (a block per sequence holds every head), block_table (B, Hkv, max_blocks)
  // int32, positions / scores (num_blocks, block_size, Hp); slot j of (b, h) lives in block
  // block_table[b, h, j // block_size] at row j % block_size. decode_attention on it, read in
  // place (no gathering): the same results as on the equivalent contiguous cache.
  m.def(
      "decode_attention_paged(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table, "
      "Tensor lengths, Tensor? positions, Tensor? q_positions, float scale, int window, "
      "int sinks, Tensor(a!)? scores) -> (Tensor out, Tensor lse)");
  // compact_ (with new_positions and inv_freq: compact_rerotate_) on a paged cache of blocks per
  // (b, h): new blocks whose kept rows already fill one old block at their offsets keep it (the
  // table is remapped, nothing moves), the others receive their rows in place; block_table
  // then names the kept blocks, -1 past them (the evicted blocks are free).
  m.def(
      "compact_paged_(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor(c!)? positions, "
      "Tensor(d!)? scores, Tensor(e!) block_table, Tensor(f!) lengths, Tensor keep, "
      "Tensor keep_lengths, Tensor? new_positions, Tensor? inv_freq, int rotary_dim, "
      "bool interleaved) -> ()");
}
