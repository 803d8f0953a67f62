// A fork/join parallel-for on std::thread for the flow inside llama.cpp's eval callback.
// llama.cpp's own thread pool is idle while the callback runs, so the steer may use the cores.
// One token (decode) is a single task and runs inline: no thread is started per token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace innsteer {
namespace llama_hook {

// Calls fn(begin, end, worker) over [0, n) split into at most n_workers contiguous chunks.
template <class Fn>
void parallel_for(int n_workers, int64_t n, Fn&& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n_workers, n));
  if (workers == 1) {
    if (n > 0) fn(int64_t(0), n, 0);
    return;
  }
  const int64_t chunk = (n + workers - 1) / workers;
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t w = 1; w < workers; ++w) {
    const int64_t b = w * chunk, e = std::min(n, b + chunk);
    if (b < e) threads.emplace_back([&fn, b, e, w] { fn(b, e, static_cast<int>(w)); });
  }
  fn(int64_t(0), std::min(n, chunk), 0);
  for (std::thread& t : threads) t.join();
}

}  // namespace llama_hook
}  // namespace innsteer
