// A parallel loop whose chunks are handed out as threads become free, instead of at::parallel_for's one fixed
// share per thread.
//
// Why: on a machine with as many cores as compute threads (the 2-core CPU server), the server's event loop and
// its clients wake up between and during steps and take a core for a while. With fixed shares the thread they
// displace finishes late and its partner waits at the end of the call; with chunks handed out, the partner takes
// over the displaced thread's remaining work. The results do not depend on which thread computes a chunk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

// f(i0, i1) over [0, n) in chunks of about n / (threads * pieces) (at least 1).
template <class F>
void dynamic_for(int64_t n, int64_t pieces, const F& f) {
    if (n <= 0) return;
    const int64_t threads = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
    const int64_t chunk = std::max<int64_t>(1, n / (threads * pieces));
    const int64_t workers = std::min(threads, (n + chunk - 1) / chunk);
    if (workers <= 1) {
        f(0, n);
        return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
        for (int64_t i = next.fetch_add(chunk, std::memory_order_relaxed); i < n;
             i = next.fetch_add(chunk, std::memory_order_relaxed))
            f(i, std::min(n, i + chunk));
    });
}
