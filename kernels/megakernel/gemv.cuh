// ---- GEMV over the weight ring: a task's rows stream through shared memory in chunks of RC rows of K.
// A warp takes whole rows when a chunk has at least as many rows as there are warps, else WPR warps share a
// row (WPR: a divisor of the row's 16-byte vectors over 32 lanes); lanes read 16 bytes of weights at a time and
// keep their part of x in registers for the whole task. part[row * WPR + segment] holds partial sums. A row's dot
// product runs in four independent FMA chains, and a warp with two rows in a chunk loads and reduces both at once
// (Qwen3's K = 1024 is four loads a lane: one chain a row is mostly latency; ~1% of a Qwen3 step on the H200,
// nothing measurable for Llama). `keep`: leave the chunks' slots to the caller to free. `tr` (tracing): when the
// first chunk arrived and when the sums are done.
//
// The weight format W says what a 16-byte vector holds (EPV weights) and how a lane multiplies it by its part of
// x: Bf16W, 8 bf16 (the lane's x: the matching 8 bf16); QuantW, 16 int8 or 32 int4 weights of one group, with
// the group's scale (and zero point) after the chunk's rows (layout.py's chunk: packed rows, scales, zeros). A
// quantized format keeps x as floats (at most 64 a lane: WPR grows with K until they fit) and each vector's sum.
__host__ __device__ constexpr int wpr(int k, int rc, int epv = 8) {
  int w = rc >= NCONSUMERS / 32 ? 1 : (NCONSUMERS / 32) / rc;
  while (w > 1 && (k / epv) % (32 * w)) w /= 2;
  while (epv > 8 && w < NCONSUMERS / 32 && (k / epv + 32 * w - 1) / (32 * w) * epv > 64 && (k / epv) % (64 * w) == 0)
    w *= 2;
  return w;
}
__device__ __forceinline__ void stamp(u64* tr, int k) {
  if (TRACE && tr) tr[k] = globaltimer();
}
struct Bf16W {
  static constexpr int EPV = 8;
  typedef V4 Vec;  // the lane's x for one weight vector
  static __device__ __forceinline__ V4 load_x(const u16* xs, int v, bool ok) {
    const V4 zero = {0u, 0u, 0u, 0u};
    return ok ? ((const V4*)xs)[v] : zero;
  }
  template <int K, int RC>
  static __device__ __forceinline__ float dot(const V4& w, const V4& x, float acc, const unsigned char*, int, int) {
    return dot8(w, x, acc);
  }
};
// Quantized weights, BITS 8 or 4, one bf16 scale (and zero point) a group of G. Value k of a row is
// (q_k - zero) * scale; a lane's vector lies in one group, so its dot product with x is taken on the integers
// and scaled once: s * (sum_k q_k x_k - zero * sum_k x_k). The integers become floats by magic-number
// tricks, exact, with no int-to-float conversion (I2F is a quarter-rate instruction): an int8 byte (offset to
// unsigned by one XOR a word) is put under the exponent of 2^23 by a byte permute (prmt), 2^23 + u, and 2^23 +
// 128 subtracted; an int4 nibble stays where it is, bits 4p..4p+3 (nibbles 5-7 shifted down once a word), and
// one lop3 masks it, offsets it to unsigned (XOR 8) and sets the exponent of 2^(23 - 4p) above it: 2^(23 - 4p)
// + u, less 2^(23 - 4p) + 8. So a weight costs one integer instruction (lop3 or prmt) and two float ones (the
// subtraction and the FMA): the integer pipe (half the float pipe's width) is not what bounds the GEMV.
// Packing (the IR's int4, superopt/ops.py): byte j holds values 2j (bits 0-3) and 2j + 1 (bits 4-7), swapped
// where HIGH_FIRST; so nibble e of a 32-bit word t holds value 8t + e (8t + (e ^ 1) where HIGH_FIRST).
template <int BITS, int G, bool ZERO, bool HIGH_FIRST>
struct QuantW {
  static constexpr int EPV = 128 / BITS;
  struct Vec {
    float v[EPV];
    float sum;
  };
  static __device__ __forceinline__ Vec load_x(const u16* xs, int v, bool ok) {
    Vec x;
    x.sum = 0.f;
#pragma unroll
    for (int j = 0; j < EPV / 8; ++j) {
      const V4 p = ((const V4*)xs)[ok ? v * (EPV / 8) + j : 0];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const u32 pair = (&p.x)[e >> 1];
        x.v[8 * j + e] = ok ? (e & 1 ? hi(pair) : lo(pair)) : 0.f;
        x.sum += x.v[8 * j + e];
      }
    }
    return x;
  }
  template <int K, int RC>
  static __device__ __forceinline__ float dot(const V4& w, const Vec& x, float acc, const unsigned char* chunk, int row,
                                              int v) {
    constexpr int NG = K / G, QROW = K * BITS / 8;
    const u16* params = (const u16*)(chunk + RC * QROW);  // the chunk's scales, then its zeros
    const int at = row * NG + min(v, K / EPV - 1) * EPV / G;  // a masked lane (x = 0) reads some group's
    const float s = bf2f(params[at]), z = ZERO ? bf2f(params[RC * NG + at]) : 0.f;
    const u32* q = &w.x;
    float d[2] = {0.f, 0.f};  // two chains
    if constexpr (BITS == 8) {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const u32 u = q[t] ^ 0x80808080u;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const float f = __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7440 | m)) - 8388736.f;
          d[m & 1] = fmaf(f, x.v[4 * t + m], d[m & 1]);
        }
      }
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const u32 high = q[t] >> 12;  // nibbles 5-7 to bits 8-19, where nibbles 2-4 were
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int p = e < 5 ? e : e - 3;  // the nibble's position in its word: bits 4p..4p+3, inside the mantissa
          const u32 magic = (150u - 4 * p) << 23;  // 2^(23 - 4p): the nibble's bits weigh 1, 2, 4, 8
          const float f = __uint_as_float(((e < 5 ? q[t] : high) & (15u << 4 * p)) ^ (magic | 8u << 4 * p));
          const float value = f - (__uint_as_float(magic) + 8.f);  // 2^(23 - 4p) + (nibble ^ 8), less the offset
          d[e & 1] = fmaf(value, x.v[8 * t + (HIGH_FIRST ? e ^ 1 : e)], d[e & 1]);
        }
      }
    }
    return fmaf(s, (d[0] + d[1]) - z * x.sum, acc);
  }
};
template <int K, int RC, class W = Bf16W>
__device__ void gemv(const u16* xs, unsigned char* ring, u64* full, u64* empty, u32& chunk, int nchunks, bool keep,
                     float* part, u64* tr) {
  constexpr int VEC = K / W::EPV, WPR = wpr(K, RC, W::EPV), RPP = (NCONSUMERS / 32) / WPR;
  constexpr int PER = (VEC + 32 * WPR - 1) / (32 * WPR);
  constexpr bool EXACT = VEC % (32 * WPR) == 0;  // else a row's last vectors fall to some lanes: the rest read zeros
  constexpr int RB = RC % (2 * RPP) == 0 ? 2 : 1;  // rows a warp takes at once (both inside the chunk)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, seg = warp % WPR, sub = warp / WPR;
  const int v0 = seg * 32 + lane;
  const V4 zero = {0u, 0u, 0u, 0u};
  typename W::Vec x[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) x[i] = W::load_x(xs, v0 + i * 32 * WPR, EXACT || v0 + i * 32 * WPR < VEC);
  for (int c = 0; c < nchunks; ++c, ++chunk) {
    const int slot = chunk % NSLOTS;
    mbar_wait(&full[slot], (chunk / NSLOTS) & 1);
    if (c == 0) stamp(tr, 3);
    const unsigned char* base = ring + slot * SLOT;
    const V4* w4 = (const V4*)base;
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
        for (int i = 0; i < PER; ++i)
          acc[b][i % 4] = W::template dot<K, RC>(w[b][i], x[i], acc[b][i % 4], base, r + b * RPP, v0 + i * 32 * WPR);
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
template <int K, int RC, class W = Bf16W>
__device__ __forceinline__ float gemv_row(const float* part, int r) {
  constexpr int WPR = wpr(K, RC, W::EPV);
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
