// Fuzzes the steer-GGUF loader: every input must load (and then steer finite-size rows) or be
// rejected with a message, never read or write out of bounds. Built by tests/test_llama_fuzz.py
// with -fsanitize=address,undefined as a seeded mutation loop:
//     fuzz_loader SEED.gguf ITERATIONS RNG_SEED
// and usable as a libFuzzer target (clang -fsanitize=fuzzer -DINNSTEER_LIBFUZZER).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <vector>

#include "innsteer_llama_hook.h"

static int accepted = 0;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  char err[512];
  innsteer_steer* steer = innsteer_steer_load_buffer(data, size, err, sizeof err);
  if (!steer) return 0;
  ++accepted;
  const int64_t dim = innsteer_steer_hidden_size(steer);
  std::vector<float> rows(3 * dim);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>(i % 7) - 3.0f;
  innsteer_steer_apply(steer, rows.data(), 3, 1.5f, 1, err, sizeof err);
  innsteer_steer_free(steer);
  return 0;
}

#ifndef INNSTEER_LIBFUZZER
int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s SEED.gguf ITERATIONS RNG_SEED\n", argv[0]);
    return 2;
  }
  std::ifstream file(argv[1], std::ios::binary);
  const std::vector<uint8_t> seed((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  char err[512];
  innsteer_steer* check = innsteer_steer_load_buffer(seed.data(), seed.size(), err, sizeof err);
  if (!check) {
    std::fprintf(stderr, "the seed file does not load: %s\n", err);
    return 2;
  }
  innsteer_steer_free(check);
  const long iterations = std::atol(argv[2]);
  std::mt19937_64 rng(std::strtoull(argv[3], nullptr, 10));
  // Most mutations go to the first bytes (header, keys, tensor infos), where the sizes live.
  const size_t head = std::min<size_t>(seed.size(), 2048);
  const uint64_t interesting[] = {0, 1, 2, 3, 7, 0x7f, 0x80, 0xff, 0xffff, 0x7fffffff, 0x80000000, 0xffffffff,
                                  0x100000000ull, 0x7fffffffffffffffull, 0xffffffffffffffffull, seed.size()};
  for (long it = 0; it < iterations; ++it) {
    std::vector<uint8_t> data = seed;
    const int n_mutations = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < n_mutations && !data.empty(); ++m) {
      const size_t limit = (rng() % 10 < 8) ? std::min(head, data.size()) : data.size();
      const size_t pos = rng() % limit;
      switch (rng() % 5) {
        case 0: data[pos] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
        case 1: data[pos] = static_cast<uint8_t>(rng()); break;
        case 2: {  // an interesting 1-, 4- or 8-byte integer
          const uint64_t v = interesting[rng() % (sizeof interesting / sizeof interesting[0])];
          const size_t width = (rng() % 3 == 0) ? 1 : (rng() % 2 ? 4 : 8);
          std::memcpy(data.data() + pos, &v, std::min(width, data.size() - pos));
          break;
        }
        case 3: data.resize(pos); break;  // truncate
        default: {  // duplicate a chunk
          const size_t n = std::min<size_t>(1 + rng() % 64, data.size() - pos);
          std::vector<uint8_t> chunk(data.begin() + pos, data.begin() + pos + n);
          data.insert(data.begin() + rng() % (data.size() + 1), chunk.begin(), chunk.end());
        }
      }
    }
    LLVMFuzzerTestOneInput(data.data(), data.size());
  }
  std::printf("fuzz_loader: %ld inputs, %d loaded, %ld rejected\n", iterations, accepted, iterations - accepted);
  return 0;
}
#endif
