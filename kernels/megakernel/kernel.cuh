enum { OP_QKV, OP_ATTN, OP_OPROJ, OP_GATEUP, OP_DOWN, OP_LMHEAD, OP_ARGMAX };
enum { D_OP, D_LAYER, D_TILE, D_ROW0, D_NROWS, D_HEAD, D_SPLIT, D_WAIT_OFF, D_WAIT_CNT, D_SIG0, D_SIG1, D_NCHUNKS,
       D_CHUNK_BYTES, D_EARLY, D_WLO, D_WHI };

// The loader: every chunk of every task's weights, in the order the consumers use them, one ring slot each,
// marked evict-first in L2: read once a step, they should not push out the activations, KV cache and counters
// (1-2% a step on the H200). Prefetching the chunks past the ring into L2 as well (cp.async.bulk.prefetch.L2), a
// fixed distance ahead or only while attention and the O projection wait, evict-last or not, cost 4-52% instead.
// One chunk in flight an SM (the next is issued when the last has landed) still streams at the copy bandwidth,
// and keeps the memory system's queues short: a task's release fence waits for the SM's loads in flight, and
// every counter and activation crosses those queues. Likewise a task whose chunks all fit the ring frees their
// slots only after its signal, so the loader has nothing in flight during the fence. On the H200, one in flight
// instead of up to six took 6% off a step; freeing after the signal 2-5% more (two in flight: Llama 1% better
// and Qwen3 7% worse).
__device__ __forceinline__ const unsigned char* weight_chunk(const int* d, int c) {
  const unsigned char* w = (const unsigned char*)((u64)(u32)d[D_WLO] | ((u64)(u32)d[D_WHI] << 32));
  return w + (u64)c * (u32)d[D_CHUNK_BYTES];
}
__device__ void load_weights(const int* tasks, int first, int last, int steps, unsigned char* ring, u64* full,
                             u64* empty) {
  const u64 policy = l2_evict_first();
  u32 chunk = 0;
  for (int s = 0; s < steps; ++s)
    for (int t = first; t < last; ++t) {
      const int* d = tasks + t * 16;
      for (int c = 0; c < d[D_NCHUNKS]; ++c, ++chunk) {
        const int slot = chunk % NSLOTS;
        if (chunk >= NSLOTS) mbar_wait(&empty[slot], (chunk / NSLOTS - 1) & 1);
        if (chunk >= 1) mbar_wait(&full[(chunk - 1) % NSLOTS], ((chunk - 1) / NSLOTS) & 1);  // one load in flight
        mbar_expect_tx(&full[slot], d[D_CHUNK_BYTES]);
        bulk_load(ring + slot * SLOT, weight_chunk(d, c), d[D_CHUNK_BYTES], &full[slot], policy);
      }
    }
}

// Waits (the consumer threads, one entry each) for entries lo..hi of a task's wait list at global step g.
__device__ __forceinline__ void wait_for(const u64* counters, const int* w, int lo, int hi, u64 g) {
  for (int i = lo + threadIdx.x; i < hi; i += NCONSUMERS) {
    const u64 target = (g + 1 - (u64)w[4 * i + 2]) * (u64)w[4 * i + 1];
    while (ld_acquire(counters + w[4 * i]) < target) {}
  }
}

extern "C" __global__ void __launch_bounds__(NCONSUMERS + 32, 1)
megakernel(unsigned char* ws, const u16* embed, const int* tasks, const int* sm_start, const int* waits,
           u64* counters, int steps, u64* trace) {
  extern __shared__ V4 smem4[];
  unsigned char* smem = (unsigned char*)smem4;
  const int first = sm_start[blockIdx.x], last = sm_start[blockIdx.x + 1];
  if (first == last) return;
  unsigned char* ring = smem;
  u64* full = (u64*)(smem + NSLOTS * SLOT);
  u64* empty = full + NSLOTS;
  float* red = (float*)(empty + NSLOTS);
  u16* xs = (u16*)(red + 64);  // one region: a GEMV's x and partial sums, or attention's scratch
  float* part = (float*)(xs + XS_ELEMS);
  float* scratch = (float*)xs;
  if (threadIdx.x == 0) {
    for (int i = 0; i < NSLOTS; ++i) { mbar_init(&full[i], 1); mbar_init(&empty[i], NCONSUMERS / 32); }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x >= NCONSUMERS) {
    if (threadIdx.x == NCONSUMERS) load_weights(tasks, first, last, steps, ring, full, empty);
    return;
  }
  const int tid = threadIdx.x;
  int* state = (int*)(ws + OFF_STATE);
  const u64 epoch = ldcg64((const u64*)state);
  const int pos0 = ldcgi(state + 2), prompt_len = ldcgi(state + 3);
  u32 chunk = 0;
  for (int s = 0; s < steps; ++s) {
    const u64 g = epoch + s;
    const int pos = pos0 + s;
    int prev = -1;  // the previous task's (op, layer) this step: same input vector, so x in smem is still valid
    for (int t = first; t < last; ++t) {
      const int* d = tasks + t * 16;
      const u32 chunk0 = chunk;
      // The launch's last step is traced: start, dependencies met, prologue done, weights in shared memory,
      // computed, done.
      u64* const tr = TRACE && s == steps - 1 && tid == 0 ? trace + STAMPS * t : nullptr;
      stamp(tr, 0);
      const int early = d[D_EARLY];
      wait_for(counters, waits + 4 * d[D_WAIT_OFF], 0, early, g);
      if (d[D_OP] == OP_ATTN) {  // the KV cache earlier steps wrote is ready: fetch it while q, k, v are not
        consumers_sync();
        attention_prefetch(ws, d[D_LAYER], d[D_HEAD], d[D_SPLIT], pos, scratch);
      }
      wait_for(counters, waits + 4 * d[D_WAIT_OFF], early, d[D_WAIT_CNT], g);
      consumers_sync();
      if (TRACE && tr) tr[1] = tr[2] = tr[3] = tr[4] = globaltimer();
      const int layer = d[D_LAYER], row0 = d[D_ROW0], nrows = d[D_NROWS], nchunks = d[D_NCHUNKS];
      const bool keep = nchunks <= NSLOTS;  // free the task's slots after its signal (see the loader)
      const bool fresh = d[D_OP] * 1024 + layer != prev;
      prev = d[D_OP] * 1024 + layer;
      const GemvTask gt{ws, embed, layer, pos, d[D_TILE], row0, nrows, nchunks, fresh, keep, xs, part, red, ring,
                        full, empty, tr};
      switch (d[D_OP]) {
        case OP_QKV: task_qkv(gt, chunk); break;
        case OP_ATTN:
          attention(ws, layer, d[D_HEAD], d[D_SPLIT], pos, scratch, tr);
          stamp(tr, 4);
          break;
        case OP_OPROJ: task_oproj(gt, chunk); break;
        case OP_GATEUP: task_gateup(gt, chunk); break;
        case OP_DOWN: task_down(gt, chunk); break;
        case OP_LMHEAD: task_lmhead(gt, chunk); break;
        case OP_ARGMAX: {
          float best = -3.0e38f;
          int arg = 0x7fffffff;
          constexpr int PER = (LM_TILES + NCONSUMERS - 1) / NCONSUMERS;
          float v[PER];
          int a[PER];
#pragma unroll
          for (int k = 0; k < PER; ++k) {  // every load issued before any is used: one L2 round trip
            const int i = min(tid + k * NCONSUMERS, LM_TILES - 1);  // a repeated tile cannot change the argmax
            v[k] = ldcgf(ws_lmval(ws) + i);
            a[k] = ldcgi(ws_lmidx(ws) + i);
          }
#pragma unroll
          for (int k = 0; k < PER; ++k)
            if (better(v[k], a[k], best, arg)) { best = v[k]; arg = a[k]; }
          block_argmax(best, arg, red);
          if (tid == 0) {
            if (pos + 1 >= prompt_len) ws_tokens(ws)[pos + 1] = arg;
            if (s == steps - 1) {  // every CTA read the state before its first task, which precedes this one
              *(u64*)state = epoch + steps;
              state[2] = pos0 + steps;
            }
          }
          break;
        }
      }
      consumers_sync();
      if (tid == 0) {
        if (d[D_SIG0] >= 0) signal(counters + d[D_SIG0]);
        if (d[D_SIG1] >= 0) signal(counters + d[D_SIG1]);
        if (keep)  // the slots the task's GEMV kept, freed only now: see the loader
          for (u32 c = chunk0; c < chunk; ++c) mbar_arrive_count(&empty[c % NSLOTS], NCONSUMERS / 32);
        stamp(tr, 5);
      }
    }
  }
}
