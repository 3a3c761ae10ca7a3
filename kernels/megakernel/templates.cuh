// ---- GEMV over the weight ring: a task's rows stream through shared memory in chunks of RC rows of K.
// A warp takes whole rows when a chunk has at least as many rows as there are warps, else WPR warps share a
// row (WPR: a divisor of the row's 16-byte vectors over 32 lanes); lanes read 16 bytes of weights at a time and
// keep their part of x in registers for the whole task. part[row * WPR + segment] holds partial sums. A row's dot
// product runs in four independent FMA chains, and a warp with two rows in a chunk loads and reduces both at once
// (Qwen3's K = 1024 is four loads a lane: one chain a row is mostly latency; ~1% of a Qwen3 step on the H200,
// nothing measurable for Llama). `keep`: leave the chunks' slots to the caller to free. `tr` (tracing): when the
// first chunk arrived and when the sums are done.
__host__ __device__ constexpr int wpr(int k, int rc) {
  int w = rc >= NCONSUMERS / 32 ? 1 : (NCONSUMERS / 32) / rc;
  while (w > 1 && (k / 8) % (32 * w)) w /= 2;
  return w;
}
__device__ __forceinline__ void stamp(u64* tr, int k) {
  if (TRACE && tr) tr[k] = globaltimer();
}
template <int K, int RC>
__device__ void gemv(const u16* xs, unsigned char* ring, u64* full, u64* empty, u32& chunk, int nchunks, bool keep,
                     float* part, u64* tr) {
  constexpr int VEC = K / 8, WPR = wpr(K, RC), RPP = (NCONSUMERS / 32) / WPR;
  constexpr int PER = (VEC + 32 * WPR - 1) / (32 * WPR);
  constexpr bool EXACT = VEC % (32 * WPR) == 0;  // else a row's last vectors fall to some lanes: the rest read zeros
  constexpr int RB = RC >= 2 * RPP ? 2 : 1;      // rows a warp takes at once
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, seg = warp % WPR, sub = warp / WPR;
  const int v0 = seg * 32 + lane;
  const V4 zero = {0u, 0u, 0u, 0u};
  V4 x[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) x[i] = EXACT || v0 + i * 32 * WPR < VEC ? ((const V4*)xs)[v0 + i * 32 * WPR] : zero;
  for (int c = 0; c < nchunks; ++c, ++chunk) {
    const int slot = chunk % NSLOTS;
    mbar_wait(&full[slot], (chunk / NSLOTS) & 1);
    if (c == 0) stamp(tr, 3);
    const V4* w4 = (const V4*)(ring + slot * SLOT);
    for (int r = sub; r < RC; r += RPP * RB) {
      V4 w[RB][PER];
#pragma unroll
      for (int b = 0; b < RB; ++b)
#pragma unroll
        for (int i = 0; i < PER; ++i)
          w[b][i] = EXACT || v0 + i * 32 * WPR < VEC ? w4[(r + b * RPP) * VEC + v0 + i * 32 * WPR] : zero;
      float acc[RB][4] = {};
#pragma unroll
      for (int b = 0; b < RB; ++b)
#pragma unroll
        for (int i = 0; i < PER; ++i) acc[b][i % 4] = dot8(w[b][i], x[i], acc[b][i % 4]);
#pragma unroll
      for (int b = 0; b < RB; ++b) {
        const float s = warp_sum((acc[b][0] + acc[b][1]) + (acc[b][2] + acc[b][3]));
        if (lane == 0) part[(c * RC + r + b * RPP) * WPR + seg] = s;
      }
    }
    __syncwarp();
    if (!keep && lane == 0) mbar_arrive(&empty[slot]);
  }
  consumers_sync();
  stamp(tr, 4);
}
template <int K, int RC>
__device__ __forceinline__ float gemv_row(const float* part, int r) {
  constexpr int WPR = wpr(K, RC);
  float s = 0.f;
  for (int i = 0; i < WPR; ++i) s += part[r * WPR + i];
  return s;
}

// ---- prologues: the GEMV's input vector x (bf16) into shared memory.
// rms_norm with weight, rounded where HF's bf16 RMSNorm rounds: bf16(gamma * bf16(x * rsqrt(mean(x^2) + eps))),
// or Gemma's, in float32 with one rounding: bf16(x * rsqrt(mean(x^2) + eps) * (1 + gamma)). `embedded`: x is the
// token's embedding row, which Gemma scales first (the generated embed_scale) where HF scales it, before the norm.
// A thread's part of a vector of K bf16: its 16-byte vectors threadIdx.x + i * NCONSUMERS.
template <int K>
struct Slice {
  static constexpr int VEC = K / 8, PER = (VEC + NCONSUMERS - 1) / NCONSUMERS;
  V4 v[PER];
  // Every load issued before any is used (one L2 round trip); an index past the end reloads the last vector.
  __device__ __forceinline__ void load(const u16* src) {
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = ldcg4(src + min(threadIdx.x + i * NCONSUMERS, VEC - 1) * 8);
  }
  __device__ __forceinline__ bool has(int i) const { return threadIdx.x + i * NCONSUMERS < VEC; }
};
template <int K>
__device__ void norm_to_smem(const u16* x, const u16* gamma, u16* xs, float* red, bool embedded = false) {
  Slice<K> v, g;
  v.load(x);
  g.load(gamma);
  if (EMBED_SCALE && embedded)
#pragma unroll
    for (int i = 0; i < v.PER; ++i) {
      u32* e = &v.v[i].x;
      for (int k = 0; k < 4; ++k) e[k] = f2bf(embed_scale(lo(e[k]))) | ((u32)f2bf(embed_scale(hi(e[k]))) << 16);
    }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < v.PER; ++i) {
    const u32* e = &v.v[i].x;
    if (v.has(i))
      for (int k = 0; k < 4; ++k) ss += lo(e[k]) * lo(e[k]) + hi(e[k]) * hi(e[k]);
  }
  const float inv = rsqrtf(block_sum(ss, red) / K + EPS);
#pragma unroll
  for (int i = 0; i < v.PER; ++i) {
    if (v.has(i)) {
      const u32* e = &v.v[i].x;
      const u32* ge = &g.v[i].x;
      V4 o;
      u32* oe = &o.x;
      for (int k = 0; k < 4; ++k) {
        const u32 a = GEMMA_NORM ? f2bf(lo(e[k]) * inv * (1.f + lo(ge[k]))) : f2bf(lo(ge[k]) * rbf(lo(e[k]) * inv));
        const u32 b = GEMMA_NORM ? f2bf(hi(e[k]) * inv * (1.f + hi(ge[k]))) : f2bf(hi(ge[k]) * rbf(hi(e[k]) * inv));
        oe[k] = a | (b << 16);
      }
      ((V4*)xs)[threadIdx.x + i * NCONSUMERS] = o;
    }
  }
  consumers_sync();
}
template <int K>
__device__ void copy_to_smem(const u16* x, u16* xs) {
  Slice<K> v;
  v.load(x);
#pragma unroll
  for (int i = 0; i < v.PER; ++i)
    if (v.has(i)) ((V4*)xs)[threadIdx.x + i * NCONSUMERS] = v.v[i];
  consumers_sync();
}
// The split-KV combine: attention output a[h * HD + d] = sum_j o_j e^(m_j - M) / sum_j l_j e^(m_j - M), in bf16.
// A thread takes 4 outputs at a time, so a warp reads whole 32-byte sectors; every split's partials are loaded
// (__ldcg: L2, after the barrier that follows the acquire) before any is used: one L2 round trip.
__device__ void combine_to_smem(const float* part, u16* xs) {
  constexpr int QUADS = NH * HD / 4, PER = (QUADS + NCONSUMERS - 1) / NCONSUMERS;
  float2 ml[PER][SPLITS];
  float4 o[PER][SPLITS];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = (threadIdx.x + i * NCONSUMERS) * 4, h = min(e, NH * HD - 1) / HD, d0 = e % HD;
#pragma unroll
    for (int j = 0; j < SPLITS; ++j) {
      const float* p = part + ((j * NKV + h / GRP) * GRP + h % GRP) * (PART_HEAD + HD);
      ml[i][j] = __ldcg((const float2*)p);
      o[i][j] = __ldcg((const float4*)(p + PART_HEAD + d0));
    }
  }
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = (threadIdx.x + i * NCONSUMERS) * 4;
    float top = -3.0e38f, total = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int j = 0; j < SPLITS; ++j) top = fmaxf(top, ml[i][j].x);
#pragma unroll
    for (int j = 0; j < SPLITS; ++j) {
      const float w = expf(ml[i][j].x - top);
      total += ml[i][j].y * w;
      acc.x += o[i][j].x * w;
      acc.y += o[i][j].y * w;
      acc.z += o[i][j].z * w;
      acc.w += o[i][j].w * w;
    }
    if (e < NH * HD)
      ((uint2*)xs)[e / 4] = make_uint2((u32)f2bf(acc.x / total) | ((u32)f2bf(acc.y / total) << 16),
                                       (u32)f2bf(acc.z / total) | ((u32)f2bf(acc.w / total) << 16));
  }
  consumers_sync();
}

// ---- the GEMV task kinds. A body gets its task (GemvTask) and the ring's chunk count; `fresh`: the SM's previous
// task was not of this kind and layer, so the vector in t.xs (and the scalars in t.red) must be computed.
struct GemvTask {
  unsigned char* ws;
  const u16* embed;
  int layer, pos, tile, row0, nrows, nchunks;
  bool fresh, keep;
  u16* xs;
  float* part;
  float* red;
  unsigned char* ring;
  u64* full;
  u64* empty;
  u64* tr;
};
// The residual stream entering a layer: the token's embedding row for layer 0.
__device__ __forceinline__ const u16* layer_input(unsigned char* ws, const u16* embed, int layer, int pos) {
  if (layer > 0) return ws_hmlp(ws, layer - 1);
  const int tok = min(max(ldcgi(ws_tokens(ws) + pos), 0), VOCAB - 1);
  return embed + (u64)tok * HID;
}
// Element e of 8 bf16 in 16 bytes, and 8 floats rounded into 16 bytes (the generated bodies' vectors).
__device__ __forceinline__ float elem(const V4& v, int e) {
  const u32 w = (&v.x)[e >> 1];
  return e & 1 ? hi(w) : lo(w);
}
__device__ __forceinline__ V4 pack8(const float (&f)[8]) {
  V4 v;
  u32* w = &v.x;
#pragma unroll
  for (int k = 0; k < 4; ++k) w[k] = f2bf(f[2 * k]) | ((u32)f2bf(f[2 * k + 1]) << 16);
  return v;
}

// The hand-written bodies (the baseline the generated ones are timed against: --templates), rounded as HF's bf16
// modules round.
__device__ __forceinline__ void template_qkv(const GemvTask& t, u32& chunk) {
  if (t.fresh) norm_to_smem<HID>(layer_input(t.ws, t.embed, t.layer, t.pos), ws_gin(t.ws, t.layer), t.xs, t.red,
                                 t.layer == 0);
  stamp(t.tr, 2);
  gemv<HID, RC_QKV>(t.xs, t.ring, t.full, t.empty, chunk, t.nchunks, t.keep, t.part, t.tr);
  for (int r = threadIdx.x; r < t.nrows; r += NCONSUMERS)  // a bias (Qwen2) is added before the one rounding
    ws_qkv(t.ws, t.layer)[t.row0 + r] = f2bf(gemv_row<HID, RC_QKV>(t.part, r) +
                                             (QKV_BIAS ? bf2f(ws_bqkv(t.ws, t.layer)[t.row0 + r]) : 0.f));
}
__device__ __forceinline__ void template_oproj(const GemvTask& t, u32& chunk) {
  const int tid = threadIdx.x;
  float res = tid < t.nrows ? ldcgbf(layer_input(t.ws, t.embed, t.layer, t.pos) + t.row0 + tid) : 0.f;
  if (EMBED_SCALE && t.layer == 0) res = embed_scale(res);
  if (t.fresh) combine_to_smem(ws_part(t.ws, t.layer), t.xs);
  stamp(t.tr, 2);
  gemv<NH * HD, RC_OPROJ>(t.xs, t.ring, t.full, t.empty, chunk, t.nchunks, t.keep, t.part, t.tr);
  if (tid < t.nrows)
    ws_hattn(t.ws, t.layer)[t.row0 + tid] = f2bf(residual(res, rbf(gemv_row<NH * HD, RC_OPROJ>(t.part, tid))));
}
__device__ __forceinline__ void template_gateup(const GemvTask& t, u32& chunk) {
  if (t.fresh) norm_to_smem<HID>(ws_hattn(t.ws, t.layer), ws_gpost(t.ws, t.layer), t.xs, t.red);
  stamp(t.tr, 2);
  gemv<HID, RC_GATEUP>(t.xs, t.ring, t.full, t.empty, chunk, t.nchunks, t.keep, t.part, t.tr);
  for (int r = threadIdx.x; r < t.nrows; r += NCONSUMERS) {
    const float gate = rbf(gemv_row<HID, RC_GATEUP>(t.part, r));
    const float up = rbf(gemv_row<HID, RC_GATEUP>(t.part, t.nrows + r));
    ws_act(t.ws, t.layer)[t.row0 + r] = f2bf(mlp_act(gate, up));
  }
}
__device__ __forceinline__ void template_down(const GemvTask& t, u32& chunk) {
  const int tid = threadIdx.x;
  const float res = tid < t.nrows ? ldcgbf(ws_hattn(t.ws, t.layer) + t.row0 + tid) : 0.f;
  if (t.fresh) copy_to_smem<INTER>(ws_act(t.ws, t.layer), t.xs);
  stamp(t.tr, 2);
  gemv<INTER, RC_DOWN>(t.xs, t.ring, t.full, t.empty, chunk, t.nchunks, t.keep, t.part, t.tr);
  if (tid < t.nrows)
    ws_hmlp(t.ws, t.layer)[t.row0 + tid] = f2bf(residual(res, rbf(gemv_row<INTER, RC_DOWN>(t.part, tid))));
}
__device__ __forceinline__ void template_lmhead(const GemvTask& t, u32& chunk) {
  if (t.fresh) norm_to_smem<HID>(ws_hmlp(t.ws, NLAYER - 1), ws_gfinal(t.ws), t.xs, t.red);
  stamp(t.tr, 2);
  gemv<HID, RC_LMHEAD>(t.xs, t.ring, t.full, t.empty, chunk, t.nchunks, t.keep, t.part, t.tr);
  float* logits = ws_logits(t.ws) + (u64)(t.pos % LOGIT_SLOTS) * VOCAB;
  float best = -3.0e38f;
  int arg = 0x7fffffff;
  for (int r = threadIdx.x; r < t.nrows; r += NCONSUMERS) {
    const float y = rbf(gemv_row<HID, RC_LMHEAD>(t.part, r));
    logits[t.row0 + r] = y;
    if (better(y, t.row0 + r, best, arg)) { best = y; arg = t.row0 + r; }
  }
  block_argmax(best, arg, t.red);
  if (threadIdx.x == 0) { ws_lmval(t.ws)[t.tile] = best; ws_lmidx(t.ws)[t.tile] = arg; }
}

// ---- attention for one KV head and one split of the positions 0..pos (split-KV decode).
// The split's cached positions were written by earlier steps, so attention_prefetch copies the first KV_CAP of
// them into shared memory (cp.async) before the task waits for this step's q, k and v, and before them (a group
// of its own) this position's RoPE row and the layer's q/k norm weights; attention then norms
// (Qwen3) and rotates q and this position's k (RoPE, from the bf16 cos/sin table, rounded as HF rounds:
// bf16(bf16(x cos) + bf16(rotate_half(x) sin))), split 0 appends k and v to the cache, and each chunk of at
// most KV_CAP positions takes three passes: scores, a warp per q head for the online softmax, outputs. It writes
// (max, sum, unnormalized output) per q head. The passes are bound by shared-memory traffic, so their layouts keep
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
    if (hh <= GRP) {
      if (QK_NORM) {
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < E; ++i) ss += r[k][i] * r[k][i];
        const float inv = rsqrtf(warp_sum(ss) / HD + EPS);
        const u16* g = cst + (hh < GRP ? HD : 2 * HD);
#pragma unroll
        for (int i = 0; i < E; ++i) r[k][i] = rbf(bf2f(g[lane + 32 * i]) * rbf(r[k][i] * inv));
      }
      if constexpr (E % 2 == 0) {
#pragma unroll
        for (int i = 0; i < E / 2; ++i) {
          const float c = bf2f(cst[lane + 32 * i]), s = bf2f(cst[HD / 2 + lane + 32 * i]);
          const float x1 = r[k][i], x2 = r[k][i + E / 2];
          r[k][i] = rbf(rbf(x1 * c) - rbf(x2 * s));
          r[k][i + E / 2] = rbf(rbf(x2 * c) + rbf(x1 * s));
        }
      } else {  // HD / 32 odd: a pair (d, d + HD / 2) spans two lanes, so it meets in the head's row of x
        float* row = x + hh * HD;
#pragma unroll
        for (int i = 0; i < E; ++i) row[lane + 32 * i] = r[k][i];
        __syncwarp();
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const int e = lane + 32 * i, m = e % (HD / 2);
          const float c = bf2f(cst[m]), s = bf2f(cst[HD / 2 + m]), p = rbf(row[(e + HD / 2) % HD] * s);
          r[k][i] = rbf(rbf(r[k][i] * c) + (e < HD / 2 ? -p : p));
        }
        __syncwarp();
      }
    }
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
          sv[i] = t * SCALE;
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
