// ---- attention for one KV head and one split of the positions 0..pos (split-KV decode).
// The split's cached positions were written by earlier steps, so attention_prefetch copies the first KV_CAP of
// them into shared memory (cp.async) before the task waits for this step's q, k and v, and before them (a group
// of its own) this position's RoPE row and the layer's q/k norm weights; attention then runs the head steps on
// q's heads and this position's k (attn_head: qk_rope's steps, from kernels/megakernel/attention.py), split 0
// appends k and v to the cache, and each chunk of at most KV_CAP positions takes three passes: scores
// (attn_score: the attention program's steps from q . k to the softmax), a warp per q head for the online
// softmax, outputs. It writes (max, sum, unnormalized output) per q head. The passes are bound by shared-memory
// traffic, so their layouts keep
// it down: with a thread per (position, quarter of the head) the scores re-read q from shared memory for every
// position (0.5-0.9 us on the H200, 0.3 us as below).
constexpr int KS = HD + 8;  // a cached row in shared memory, padded so a warp's 16-byte reads of 8 rows differ in bank
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_older() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
// Split j's positions p0..p1 of those the query at pos attends: 0..pos, or the last WINDOW of them (Mistral).
__device__ __forceinline__ void kv_range(int j, int pos, int& p0, int& p1) {
  const int first = WINDOW > 0 ? max(0, pos + 1 - WINDOW) : 0, n = pos + 1 - first, per = (n + SPLITS - 1) / SPLITS;
  p0 = first + min(n, j * per);
  p1 = min(pos + 1, p0 + per);
}
// Positions c0..c0+cn of the cache into kb/vb, all but `pos` (this step's, which comes from q, k, v).
__device__ void load_kv(const u16* kc, const u16* vc, int c0, int cn, int pos, u16* kb, u16* vb) {
  for (int idx = threadIdx.x; idx < cn * (HD / 8); idx += NCONSUMERS) {
    const int q = idx / (HD / 8), e = (idx % (HD / 8)) * 8;
    if (c0 + q != pos) {
      cp_async16(kb + q * KS + e, kc + (u64)(c0 + q) * HD + e);
      cp_async16(vb + q * KS + e, vc + (u64)(c0 + q) * HD + e);
    }
  }
}
// Attention's scratch: cached k rows, v rows, then cos, sin (HD / 2 each), q norm and k norm weights (HD each).
__device__ __forceinline__ u16* attn_kbuf(float* sm) { return (u16*)sm; }
__device__ __forceinline__ u16* attn_vbuf(float* sm) { return (u16*)sm + KV_CAP * KS; }
__device__ __forceinline__ u16* attn_consts(float* sm) { return (u16*)sm + 2 * KV_CAP * KS; }
__device__ void attention_prefetch(unsigned char* ws, int layer, int kv, int j, int pos, float* sm) {
  u16* cst = attn_consts(sm);
  for (int i = threadIdx.x; i < (QK_NORM ? 3 : 1) * HD / 8; i += NCONSUMERS) {  // 16-byte pieces
    const int half = i / (HD / 16), at = (i % (HD / 16)) * 8;  // rows of HD / 2: cos, sin, gq (2), gk (2)
    const u16* src;
    if (half == 0) src = ws_cos(ws) + pos * (HD / 2);
    else if (half == 1) src = ws_sin(ws) + pos * (HD / 2);
    else if (half < 4) src = ws_gq(ws, layer) + (half - 2) * (HD / 2);
    else src = ws_gk(ws, layer) + (half - 4) * (HD / 2);
    cp_async16(cst + i * 8, src + at);
  }
  cp_async_commit();
  int p0, p1;
  kv_range(j, pos, p0, p1);
  load_kv(ws_kcache(ws, layer, kv), ws_vcache(ws, layer, kv), p0, min(p1 - p0, KV_CAP), pos, attn_kbuf(sm),
          attn_vbuf(sm));
  cp_async_commit();
}
__device__ void attention(unsigned char* ws, int layer, int kv, int j, int pos, float* sm, u64* tr) {
  u16* kb = attn_kbuf(sm);
  u16* vb = attn_vbuf(sm);
  const u16* cst = attn_consts(sm);
  float* x = (float*)(cst + 3 * HD);  // GRP q heads, then k, then v: normed and rotated (bf16 values)
  constexpr int NQ = 4;               // the scores' quarters of the head dimension (smem_plan reserves them)
  float* sc = x + (GRP + 2) * HD;     // scores per quarter, q head and position
  float* run = sc + NQ * GRP * KV_CAP;  // per q head: running max, running sum, this chunk's correction
  const u16* qkv = ws_qkv(ws, layer);
  u16* kc = ws_kcache(ws, layer, kv);
  u16* vc = ws_vcache(ws, layer, kv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int p0, p1;
  kv_range(j, pos, p0, p1);
  // A warp a head (q heads, then k, then v), a lane its elements d = lane + 32 i: a RoPE pair (d, d + HD / 2)
  // sits in one lane where HD / 32 is even, and the q/k norm is a warp sum, so the head stays in registers.
  constexpr int NW = NCONSUMERS / 32, E = HD / 32, HR = (GRP + 2 + NW - 1) / NW;
  static_assert(HD % 32 == 0, "a lane holds HD / 32 elements of its head");
  float r[HR][E];
#pragma unroll
  for (int k = 0; k < HR; ++k) {  // every load issued before any is used: one L2 round trip
    const int hh = min(warp + k * NW, GRP + 1);
    const u16* src = qkv + (hh < GRP ? (kv * GRP + hh) * HD : ((hh == GRP ? NH : NH + NKV) + kv) * HD);
#pragma unroll
    for (int i = 0; i < E; ++i) r[k][i] = ldcgbf(src + lane + 32 * i);
  }
  if (threadIdx.x < GRP) { run[3 * threadIdx.x] = -1.0e30f; run[3 * threadIdx.x + 1] = 0.f; }
  cp_async_wait_older();  // the RoPE row and norm weights (the KV cache may still be in flight)
  consumers_sync();
#pragma unroll
  for (int k = 0; k < HR; ++k) {
    const int hh = warp + k * NW;
    if (hh > GRP + 1) break;
    if (hh <= GRP) attn_head(r[k], cst + (hh < GRP ? HD : 2 * HD), cst, x + hh * HD);  // q's heads, then k
#pragma unroll
    for (int i = 0; i < E; ++i) x[hh * HD + lane + 32 * i] = r[k][i];
    if (hh >= GRP) {  // this position's k or v: split 0 appends it to the cache, and the split that reads it
      u16* cache = hh == GRP ? kc : vc;  // takes it into its first chunk here (a later chunk: from x, below)
      u16* buf = hh == GRP ? kb : vb;
      const bool first = pos >= p0 && pos < min(p1, p0 + KV_CAP);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const u16 b = f2bf(r[k][i]);
        if (j == 0) cache[pos * HD + lane + 32 * i] = b;
        if (first) buf[(pos - p0) * KS + lane + 32 * i] = b;
      }
    }
  }
  stamp(tr, 2);
  // Scores: warp w takes a quarter of the head dimension (its slice of the q heads is one address for all
  // lanes: shared-memory broadcasts) for 32 positions, a lane a position: GRP FMA chains over the slice. The
  // softmax warps add the quarters. Outputs: a thread takes two dims for every q head (the v pair is read once)
  // over every G-th position; the G groups' sums are added through shared memory at the end.
  constexpr int DP = HD / NQ, NDP = HD / 2;
  constexpr int G = NCONSUMERS / NDP < KV_CAP * KS / (GRP * HD) ? NCONSUMERS / NDP : KV_CAP * KS / (GRP * HD);
  static_assert(KV_CAP <= 32 * (NW / NQ) && NW % NQ == 0 && DP % 8 == 0 && G >= 1, "attention's thread layout");
  float* pr = sc;  // probabilities overwrite the first quarter's scores
  const int dp = threadIdx.x % NDP, grp = threadIdx.x / NDP;
  float acc[GRP][2];
#pragma unroll
  for (int h = 0; h < GRP; ++h) acc[h][0] = acc[h][1] = 0.f;
  for (int c0 = p0; c0 < p1; c0 += KV_CAP) {
    const int cn = min(KV_CAP, p1 - c0);
    if (c0 > p0) load_kv(kc, vc, c0, cn, pos, kb, vb);  // the first chunk was prefetched before the wait
    cp_async_wait_all();
    if (c0 > p0 && pos >= c0 && pos < c0 + cn)
      for (int d = threadIdx.x; d < HD; d += NCONSUMERS) {
        kb[(pos - c0) * KS + d] = f2bf(x[GRP * HD + d]);
        vb[(pos - c0) * KS + d] = f2bf(x[(GRP + 1) * HD + d]);
      }
    consumers_sync();
    if (c0 == p0) stamp(tr, 3);
    {
      const int quarter = warp % NQ, q = lane + 32 * (warp / NQ);
      if (q < cn) {
        float s[GRP];
#pragma unroll
        for (int h = 0; h < GRP; ++h) s[h] = 0.f;
        const V4* k4 = (const V4*)(kb + q * KS + quarter * DP);
#pragma unroll
        for (int v = 0; v < DP / 8; ++v) {
          const V4 w = k4[v];
#pragma unroll
          for (int h = 0; h < GRP; ++h) {
            const float4* qh = (const float4*)(x + h * HD + quarter * DP + 8 * v);
            const float4 a = qh[0], b = qh[1];
            s[h] = fmaf(lo(w.x), a.x, fmaf(hi(w.x), a.y, fmaf(lo(w.y), a.z, fmaf(hi(w.y), a.w, s[h]))));
            s[h] = fmaf(lo(w.z), b.x, fmaf(hi(w.z), b.y, fmaf(lo(w.w), b.z, fmaf(hi(w.w), b.w, s[h]))));
          }
        }
#pragma unroll
        for (int h = 0; h < GRP; ++h) sc[(quarter * GRP + h) * KV_CAP + q] = s[h];
      }
    }
    consumers_sync();
    for (int h = warp; h < GRP; h += NW) {
      float sv[(KV_CAP + 31) / 32];
      float top = run[3 * h];
#pragma unroll
      for (int i = 0; i < (KV_CAP + 31) / 32; ++i) {
        const int q = lane + 32 * i;
        sv[i] = -3.0e38f;
        if (q < cn) {
          float t = 0.f;
#pragma unroll
          for (int k = 0; k < NQ; ++k) t += sc[(k * GRP + h) * KV_CAP + q];
          sv[i] = attn_score(t);
        }
        top = fmaxf(top, sv[i]);
      }
      for (int off = 16; off; off >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, off));
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < (KV_CAP + 31) / 32; ++i) {
        const int q = lane + 32 * i;
        if (q < cn) {
          const float e = expf(sv[i] - top);
          pr[h * KV_CAP + q] = e;
          sum += e;
        }
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float corr = expf(run[3 * h] - top);
        run[3 * h] = top;
        run[3 * h + 1] = run[3 * h + 1] * corr + sum;
        run[3 * h + 2] = corr;
      }
    }
    consumers_sync();
    if (grp < G) {
#pragma unroll
      for (int h = 0; h < GRP; ++h) {
        const float corr = run[3 * h + 2];
        acc[h][0] *= corr;
        acc[h][1] *= corr;
      }
      for (int q = grp; q < cn; q += G) {
        const u32 v2 = *(const u32*)(vb + q * KS + 2 * dp);
        const float v0 = lo(v2), v1 = hi(v2);
#pragma unroll
        for (int h = 0; h < GRP; ++h) {
          const float p = pr[h * KV_CAP + q];
          acc[h][0] = fmaf(p, v0, acc[h][0]);
          acc[h][1] = fmaf(p, v1, acc[h][1]);
        }
      }
    }
    consumers_sync();  // the next chunk overwrites the buffers and scores
  }
  float* sums = (float*)kb;  // the groups' sums, [group][q head][dim], over the K and V buffers
  if (grp < G)
#pragma unroll
    for (int h = 0; h < GRP; ++h) ((float2*)sums)[((grp * GRP + h) * HD) / 2 + dp] = make_float2(acc[h][0], acc[h][1]);
  consumers_sync();
  float* out = ws_part(ws, layer);
  for (int e = threadIdx.x; e < GRP * HD; e += NCONSUMERS) {
    const int h = e / HD, d = e % HD;
    float o = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) o += sums[(g * GRP + h) * HD + d];
    float* dst = out + ((j * NKV + kv) * GRP + h) * (PART_HEAD + HD);
    dst[PART_HEAD + d] = o;
    if (d == 0) { dst[0] = run[3 * h]; dst[1] = run[3 * h + 1]; }
  }
}
