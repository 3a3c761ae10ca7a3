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
