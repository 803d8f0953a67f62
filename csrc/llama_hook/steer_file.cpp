#include "steer_file.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "../cpu/flow_cpu.h"
#include "parallel_for.h"

namespace innsteer {
namespace llama_hook {
namespace {

// GGUF value and tensor type codes (gguf spec; ggml.h's ggml_type).
enum : uint32_t { kU8 = 0, kI8, kU16, kI16, kU32, kI32, kF32, kBool, kString, kArray, kU64, kI64, kF64 };
enum : uint32_t { kTensorF32 = 0, kTensorF16 = 1, kTensorI32 = 26, kTensorI64 = 27, kTensorBF16 = 30 };

constexpr size_t kMaxString = 1 << 16;
constexpr int64_t kMaxDim = 1 << 20;       // hidden sizes of real models are < 2^15
constexpr int64_t kMaxCouplings = 1 << 10;

size_t scalar_size(uint32_t type) {
  switch (type) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: return 8;
    default: return 0;
  }
}

struct Value {
  uint32_t type = 0;
  uint64_t u = 0;  // unsigned integers and bool
  int64_t i = 0;   // signed integers
  double f = 0;    // floats
  std::string s;
};

struct TensorInfo {
  uint32_t n_dims = 0;
  uint64_t ne[4] = {1, 1, 1, 1};
  uint32_t type = 0;
  uint64_t offset = 0;
  const uint8_t* data = nullptr;  // set once the data section is located
  uint64_t n_elements = 1;
};

// A cursor that refuses to read past the end; every read reports failure instead.
class Reader {
 public:
  Reader(const uint8_t* data, size_t len) : data_(data), len_(len) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return len_ - pos_; }
  bool bytes(void* out, size_t n) {
    if (n > remaining()) return false;
    std::memcpy(out, data_ + pos_, n);
    pos_ += n;
    return true;
  }
  bool skip(uint64_t n) {
    if (n > remaining()) return false;
    pos_ += static_cast<size_t>(n);
    return true;
  }
  template <class T> bool get(T& v) { return bytes(&v, sizeof v); }
  bool string(std::string& s) {
    uint64_t n;
    if (!get(n) || n > remaining() || n > kMaxString) return false;
    s.assign(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return true;
  }

 private:
  const uint8_t* data_;
  size_t len_;
  size_t pos_ = 0;
};

std::string short_real(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", v);
  return text;
}

bool fail(std::string& error, const std::string& message) {
  error = message;
  return false;
}

bool read_scalar(Reader& r, uint32_t type, Value& v) {
  v.type = type;
  switch (type) {
    case kU8: { uint8_t x; if (!r.get(x)) return false; v.u = x; v.i = x; return true; }
    case kBool: { uint8_t x; if (!r.get(x)) return false; v.u = x; return true; }
    case kI8: { int8_t x; if (!r.get(x)) return false; v.i = x; return true; }
    case kU16: { uint16_t x; if (!r.get(x)) return false; v.u = x; v.i = x; return true; }
    case kI16: { int16_t x; if (!r.get(x)) return false; v.i = x; return true; }
    case kU32: { uint32_t x; if (!r.get(x)) return false; v.u = x; v.i = x; return true; }
    case kI32: { int32_t x; if (!r.get(x)) return false; v.i = x; return true; }
    case kU64: { uint64_t x; if (!r.get(x)) return false; v.u = x; return true; }
    case kI64: { int64_t x; if (!r.get(x)) return false; v.i = x; return true; }
    case kF32: { float x; if (!r.get(x)) return false; v.f = x; return true; }
    case kF64: { double x; if (!r.get(x)) return false; v.f = x; return true; }
    case kString: return r.string(v.s);
    default: return false;
  }
}

// Reads one key's value; arrays are skipped (the steer format uses none), their size checked.
bool read_value(Reader& r, uint32_t type, Value& v, std::string& error, const std::string& key) {
  if (type != kArray) {
    if (!read_scalar(r, type, v)) return fail(error, "key '" + key + "': bad type " + std::to_string(type) +
                                                         " or value past the end of the file");
    return true;
  }
  v.type = kArray;
  uint32_t elem;
  uint64_t count;
  if (!r.get(elem) || !r.get(count)) return fail(error, "key '" + key + "': array header past the end of the file");
  if (elem == kString) {
    if (count > r.remaining() / 8) return fail(error, "key '" + key + "': array count exceeds the file");
    std::string s;
    for (uint64_t n = 0; n < count; ++n) {
      if (!r.string(s)) return fail(error, "key '" + key + "': array string past the end of the file");
    }
    return true;
  }
  const size_t size = scalar_size(elem);
  if (size == 0) return fail(error, "key '" + key + "': unsupported array element type " + std::to_string(elem));
  if (count > r.remaining() / size || !r.skip(count * size))
    return fail(error, "key '" + key + "': array data past the end of the file");
  return true;
}

size_t tensor_type_size(uint32_t type) {
  switch (type) {
    case kTensorF32: case kTensorI32: return 4;
    case kTensorF16: case kTensorBF16: return 2;
    case kTensorI64: return 8;
    default: return 0;
  }
}

struct Parsed {
  std::map<std::string, Value> kv;
  std::map<std::string, TensorInfo> tensors;
};

bool parse_container(const uint8_t* data, size_t len, Parsed& out, std::string& error) {
  Reader r(data, len);
  char magic[4];
  if (!r.bytes(magic, 4) || std::memcmp(magic, "GGUF", 4) != 0) return fail(error, "not a GGUF file (bad magic)");
  uint32_t version;
  uint64_t n_tensors, n_kv;
  if (!r.get(version) || !r.get(n_tensors) || !r.get(n_kv)) return fail(error, "GGUF header is truncated");
  if (version != 3) return fail(error, "GGUF container version " + std::to_string(version) + " is not supported (need 3)");
  // Each key takes >= 12 bytes and each tensor info >= 24: larger counts cannot fit in the file.
  if (n_kv > r.remaining() / 12) return fail(error, "GGUF key count " + std::to_string(n_kv) + " exceeds the file size");
  if (n_tensors > r.remaining() / 24)
    return fail(error, "GGUF tensor count " + std::to_string(n_tensors) + " exceeds the file size");

  for (uint64_t n = 0; n < n_kv; ++n) {
    std::string key;
    uint32_t type;
    if (!r.string(key) || !r.get(type)) return fail(error, "GGUF key " + std::to_string(n) + " is truncated");
    Value v;
    if (!read_value(r, type, v, error, key)) return false;
    if (!out.kv.emplace(key, std::move(v)).second) return fail(error, "duplicate key '" + key + "'");
  }

  uint64_t alignment = 32;
  auto it = out.kv.find("general.alignment");
  if (it != out.kv.end()) {
    if (it->second.type != kU32 || it->second.u == 0 || (it->second.u & (it->second.u - 1)) != 0 ||
        it->second.u > 65536)
      return fail(error, "general.alignment must be a uint32 power of two <= 65536");
    alignment = it->second.u;
  }

  for (uint64_t n = 0; n < n_tensors; ++n) {
    std::string name;
    TensorInfo t;
    if (!r.string(name) || !r.get(t.n_dims)) return fail(error, "GGUF tensor info " + std::to_string(n) + " is truncated");
    if (t.n_dims < 1 || t.n_dims > 4) return fail(error, "tensor '" + name + "' has " + std::to_string(t.n_dims) + " dims");
    for (uint32_t d = 0; d < t.n_dims; ++d) {
      if (!r.get(t.ne[d])) return fail(error, "tensor '" + name + "' shape is truncated");
      if (t.ne[d] != 0 && t.n_elements > len / t.ne[d])
        return fail(error, "tensor '" + name + "' has more elements than the file has bytes");
      t.n_elements *= t.ne[d];  // <= len: no overflow
    }
    if (!r.get(t.type) || !r.get(t.offset)) return fail(error, "tensor '" + name + "' info is truncated");
    if (tensor_type_size(t.type) == 0) return fail(error, "tensor '" + name + "' has unsupported type " + std::to_string(t.type));
    if (t.offset % alignment != 0) return fail(error, "tensor '" + name + "' offset is not aligned");
    if (!out.tensors.emplace(name, t).second) return fail(error, "duplicate tensor '" + name + "'");
  }

  const uint64_t data_start = (r.pos() + alignment - 1) / alignment * alignment;
  if (data_start > len) return fail(error, "GGUF data section starts past the end of the file");
  for (auto& [name, t] : out.tensors) {
    const uint64_t available = len - data_start;
    const uint64_t n_bytes = t.n_elements * tensor_type_size(t.type);
    if (t.offset > available || n_bytes > available - t.offset)
      return fail(error, "tensor '" + name + "' data lies past the end of the file (truncated?)");
    t.data = data + data_start + t.offset;
  }
  return true;
}

// Typed access to the parsed keys with messages that name the key.
class Keys {
 public:
  Keys(const Parsed& p, std::string& error) : p_(p), error_(error) {}

  bool string(const char* key, std::string& out, bool required) {
    auto it = p_.kv.find(key);
    if (it == p_.kv.end()) return required ? fail(error_, std::string("missing key '") + key + "'") : true;
    if (it->second.type != kString) return fail(error_, std::string("key '") + key + "' must be a string");
    out = it->second.s;
    return true;
  }
  bool integer(const char* key, int64_t lo, int64_t hi, int64_t& out) {
    auto it = p_.kv.find(key);
    if (it == p_.kv.end()) return fail(error_, std::string("missing key '") + key + "'");
    const Value& v = it->second;
    if (v.type == kU32 || v.type == kU64 || v.type == kU16 || v.type == kU8) {
      if (v.u > static_cast<uint64_t>(hi)) return fail(error_, std::string("key '") + key + "' is out of range");
      out = static_cast<int64_t>(v.u);
    } else if (v.type == kI32 || v.type == kI64 || v.type == kI16 || v.type == kI8) {
      out = v.i;
    } else {
      return fail(error_, std::string("key '") + key + "' must be an integer");
    }
    if (out < lo || out > hi)
      return fail(error_, std::string("key '") + key + "' = " + std::to_string(out) + " is out of range [" +
                              std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return true;
  }
  bool real(const char* key, float& out) {
    auto it = p_.kv.find(key);
    if (it == p_.kv.end()) return fail(error_, std::string("missing key '") + key + "'");
    if (it->second.type != kF32 && it->second.type != kF64)
      return fail(error_, std::string("key '") + key + "' must be a float");
    out = static_cast<float>(it->second.f);
    if (!std::isfinite(out)) return fail(error_, std::string("key '") + key + "' is not finite");
    return true;
  }

 private:
  const Parsed& p_;
  std::string& error_;
};

// Fetches tensor `name`, checking its type and exact shape (ne order, innermost first).
bool tensor(const Parsed& p, const std::string& name, std::initializer_list<uint32_t> types,
            std::initializer_list<int64_t> ne, const TensorInfo*& out, std::string& error) {
  auto it = p.tensors.find(name);
  if (it == p.tensors.end()) return fail(error, "missing tensor '" + name + "'");
  const TensorInfo& t = it->second;
  bool type_ok = false;
  for (uint32_t type : types) type_ok |= t.type == type;
  if (!type_ok) return fail(error, "tensor '" + name + "' has type " + std::to_string(t.type));
  std::string want, got;
  bool shape_ok = t.n_dims == ne.size();
  size_t d = 0;
  for (int64_t n : ne) {
    want += (d ? "," : "") + std::to_string(n);
    if (shape_ok && t.ne[d] != static_cast<uint64_t>(n)) shape_ok = false;
    ++d;
  }
  for (uint32_t i = 0; i < t.n_dims; ++i) got += (i ? "," : "") + std::to_string(t.ne[i]);
  if (!shape_ok) return fail(error, "tensor '" + name + "' has shape [" + got + "], expected [" + want + "]");
  out = &t;
  return true;
}

bool copy_floats(const TensorInfo& t, const std::string& name, std::vector<float>& out, std::string& error) {
  out.resize(t.n_elements);
  std::memcpy(out.data(), t.data, t.n_elements * sizeof(float));
  for (float v : out) {
    if (!std::isfinite(v)) return fail(error, "tensor '" + name + "' contains NaN or Inf");
  }
  return true;
}

bool copy_bf16(const TensorInfo& t, const std::string& name, std::vector<bf16_t>& out, std::string& error) {
  out.resize(t.n_elements);
  std::memcpy(out.data(), t.data, t.n_elements * sizeof(bf16_t));
  for (bf16_t v : out) {
    if (!std::isfinite(to_acc(v))) return fail(error, "tensor '" + name + "' contains NaN or Inf");
  }
  return true;
}

bool copy_indices(const TensorInfo& t, const std::string& name, int64_t dim, std::vector<int64_t>& out,
                  std::vector<uint8_t>& used, std::string& error) {
  out.resize(t.n_elements);
  for (uint64_t i = 0; i < t.n_elements; ++i) {
    int64_t v;
    if (t.type == kTensorI32) {
      int32_t x;
      std::memcpy(&x, t.data + 4 * i, 4);
      v = x;
    } else {
      std::memcpy(&v, t.data + 8 * i, 8);
    }
    if (v < 0 || v >= dim) return fail(error, "tensor '" + name + "' holds index " + std::to_string(v) + " outside [0, dim)");
    if (used[v]) return fail(error, "tensor '" + name + "': index " + std::to_string(v) + " appears twice in the coupling");
    used[v] = 1;
    out[i] = v;
  }
  return true;
}

}  // namespace

bool parse_steer_gguf(const uint8_t* data, size_t len, SteerModel& m, std::string& error) {
  Parsed p;
  if (!parse_container(data, len, p, error)) return false;
  Keys keys(p, error);
  std::string arch, kind;
  if (!keys.string("general.architecture", arch, true)) return false;
  if (arch == "controlvector")
    return fail(error, "this is a llama.cpp control vector, not an innsteer steer file (load it as a control vector)");
  if (arch != "innsteer") return fail(error, "general.architecture is '" + arch + "', not 'innsteer'");
  int64_t version, dim, hidden, n_couplings, layer;
  if (!keys.integer("innsteer.format_version", 0, INT32_MAX, version)) return false;
  if (version != kSteerFormatVersion)
    return fail(error, "steer format version " + std::to_string(version) + "; this library reads version " +
                           std::to_string(kSteerFormatVersion));
  if (!keys.string("innsteer.kind", kind, true)) return false;
  if (kind != "inn") return fail(error, "steer kind '" + kind + "' is not supported (expected 'inn')");
  if (!keys.integer("innsteer.hidden_size", 2, kMaxDim, dim) || !keys.integer("innsteer.mlp_hidden", 1, kMaxDim, hidden) ||
      !keys.integer("innsteer.num_couplings", 1, kMaxCouplings, n_couplings) ||
      !keys.integer("innsteer.layer", 0, 1 << 16, layer) || !keys.real("innsteer.clamp", m.clamp) ||
      !keys.real("innsteer.alpha", m.alpha) || !keys.string("innsteer.model_id", m.model_id, false) ||
      !keys.string("innsteer.model_hint", m.model_hint, false) || !keys.string("innsteer.method", m.method, false) ||
      !keys.string("innsteer.behavior", m.behavior, false))
    return false;
  std::string scaling = "latent";  // files written before the key existed
  if (!keys.string("innsteer.scaling", scaling, false)) return false;
  if (scaling != "latent" && scaling != "displacement")
    return fail(error, "innsteer.scaling is '" + scaling.substr(0, 64) + "', not 'latent' or 'displacement'");
  m.displacement = scaling == "displacement";
  if (!(m.clamp >= kMinClamp && m.clamp <= kMaxClamp))  // a clamp of 3e38 makes every steer NaN
    return fail(error, "innsteer.clamp = " + short_real(m.clamp) + " is outside [" + short_real(kMinClamp) + ", " +
                           short_real(kMaxClamp) + "]");
  m.dim = dim;
  m.mlp_hidden = hidden;
  m.layer = static_cast<int32_t>(layer);

  // Every tensor must be one of the expected names: a stray tensor means another writer or version.
  const size_t expected_tensors = 3 + 6 * static_cast<size_t>(n_couplings);
  if (p.tensors.size() != expected_tensors)
    return fail(error, "steer file holds " + std::to_string(p.tensors.size()) + " tensors; " +
                           std::to_string(n_couplings) + " couplings need " + std::to_string(expected_tensors));

  const TensorInfo* t;
  const char* vectors[] = {"mean", "scale", "direction"};
  std::vector<float>* targets[] = {&m.mean, &m.scale, &m.direction};
  for (int i = 0; i < 3; ++i) {
    if (!tensor(p, vectors[i], {kTensorF32}, {dim}, t, error) || !copy_floats(*t, vectors[i], *targets[i], error))
      return false;
  }
  for (float s : m.scale) {
    if (!(s > 0)) return fail(error, "tensor 'scale' must be positive");
  }

  m.couplings.resize(n_couplings);
  for (int64_t k = 0; k < n_couplings; ++k) {
    CouplingData& c = m.couplings[k];
    const std::string pre = "coupling." + std::to_string(k) + ".";
    auto idx_it = p.tensors.find(pre + "cond_idx");
    if (idx_it == p.tensors.end()) return fail(error, "missing tensor '" + pre + "cond_idx'");
    const int64_t n_cond = static_cast<int64_t>(idx_it->second.ne[0]);
    const int64_t n_trans = dim - n_cond;
    if (n_cond < 1 || n_trans < 1) return fail(error, "tensor '" + pre + "cond_idx' must hold between 1 and dim-1 indices");
    std::vector<uint8_t> used(dim, 0);
    if (!tensor(p, pre + "cond_idx", {kTensorI32, kTensorI64}, {n_cond}, t, error) ||
        !copy_indices(*t, pre + "cond_idx", dim, c.cond_idx, used, error) ||
        !tensor(p, pre + "trans_idx", {kTensorI32, kTensorI64}, {n_trans}, t, error) ||
        !copy_indices(*t, pre + "trans_idx", dim, c.trans_idx, used, error))
      return false;

    const TensorInfo *w1, *w2;
    if (!tensor(p, pre + "w1", {kTensorF32, kTensorBF16}, {hidden, n_cond}, w1, error) ||
        !tensor(p, pre + "w2", {kTensorF32, kTensorBF16}, {2 * n_trans, hidden}, w2, error))
      return false;
    if (w1->type != w2->type) return fail(error, "coupling " + std::to_string(k) + ": w1 and w2 have different types");
    const bool bf16 = w1->type == kTensorBF16;
    if (k == 0) m.bf16_weights = bf16;
    if (bf16 != m.bf16_weights) return fail(error, "couplings mix float32 and bfloat16 weights");
    if (bf16 ? !(copy_bf16(*w1, pre + "w1", c.w1_bf16, error) && copy_bf16(*w2, pre + "w2", c.w2_bf16, error))
             : !(copy_floats(*w1, pre + "w1", c.w1_f32, error) && copy_floats(*w2, pre + "w2", c.w2_f32, error)))
      return false;
    if (!tensor(p, pre + "b1", {kTensorF32}, {hidden}, t, error) || !copy_floats(*t, pre + "b1", c.b1, error) ||
        !tensor(p, pre + "b2", {kTensorF32}, {2 * n_trans}, t, error) || !copy_floats(*t, pre + "b2", c.b2, error))
      return false;
  }

  for (const CouplingData& c : m.couplings) {
    const int64_t n_cond = static_cast<int64_t>(c.cond_idx.size()), n_trans = static_cast<int64_t>(c.trans_idx.size());
    m.views_f32.push_back({n_cond, n_trans, c.cond_idx.data(), c.trans_idx.data(), c.w1_f32.data(), c.b1.data(),
                           c.w2_f32.data(), c.b2.data()});
    m.views_bf16.push_back({n_cond, n_trans, c.cond_idx.data(), c.trans_idx.data(), c.w1_bf16.data(), c.b1.data(),
                            c.w2_bf16.data(), c.b2.data()});
  }
  return true;
}

FlowView<float, float> SteerModel::flow_f32() const {
  return {dim, mlp_hidden, static_cast<int64_t>(views_f32.size()), clamp, mean.data(), scale.data(), views_f32.data()};
}

FlowView<float, bf16_t> SteerModel::flow_bf16() const {
  return {dim, mlp_hidden, static_cast<int64_t>(views_bf16.size()), clamp, mean.data(), scale.data(), views_bf16.data()};
}

int64_t SteerModel::workspace_per_worker() const {
  return bf16_weights ? cpu::workspace_per_worker(flow_bf16()) : cpu::workspace_per_worker(flow_f32());
}

namespace {

// One tile (a decode's few rows): its gemms' columns split across OpenMP threads. Inside llama.cpp's
// eval callback these are ggml's own OpenMP workers, idle between two graph splits and still
// spinning, so a fork costs microseconds, where starting threads per token would cost more than
// the flow. Chunks are whole multiples of 64 columns, so every column sums as in one call.
struct OpenMPColumns {
  int n_threads;
  template <class Fn>
  void operator()(int64_t n_cols, Fn&& fn) const {
    const int64_t chunk = ((n_cols + n_threads - 1) / n_threads + 63) / 64 * 64;
    const int64_t n_chunks = (n_cols + chunk - 1) / chunk;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < n_chunks; ++i) fn(i * chunk, std::min(n_cols, (i + 1) * chunk));
  }
};

template <class In, class W, class Columns>
void run_steer(const FlowView<float, W>& f, const SteerModel& m, In* rows, int64_t n_rows, float alpha,
               float* workspace, int n_workers, const Columns& columns) {
  auto pfor = [n_workers](int64_t n, int64_t, auto&& fn) { parallel_for(n_workers, n, fn); };
  cpu::run_flow<float, In, W>(f, FlowMode::kSteer, rows, nullptr, rows, nullptr, n_rows, alpha, m.direction.data(),
                              workspace, n_workers, pfor, columns);
}

// x <- phi^-1(phi(x) + alpha * direction) over the rows. Several tiles: whole tiles per thread. One
// tile: inline, or with split_tile its columns split.
template <class In>
void steer_latent(const SteerModel& m, In* rows, int64_t n_rows, float alpha, float* workspace, int n_workers,
                  bool split_tile) {
  const bool one_tile = split_tile && n_rows <= cpu::kTileTokens && n_workers > 1;
  if (m.bf16_weights) {
    if (one_tile) return run_steer<In>(m.flow_bf16(), m, rows, n_rows, alpha, workspace, 1, OpenMPColumns{n_workers});
    run_steer<In>(m.flow_bf16(), m, rows, n_rows, alpha, workspace, n_workers, cpu::SerialColumns());
  } else {
    if (one_tile) return run_steer<In>(m.flow_f32(), m, rows, n_rows, alpha, workspace, 1, OpenMPColumns{n_workers});
    run_steer<In>(m.flow_f32(), m, rows, n_rows, alpha, workspace, n_workers, cpu::SerialColumns());
  }
}

}  // namespace

template <class In>
void steer_rows(const SteerModel& m, In* rows, int64_t n_rows, float alpha, float* workspace, int n_workers,
                bool split_tile) {
  if (!m.displacement || alpha == 0.0f) return steer_latent(m, rows, n_rows, alpha, workspace, n_workers, split_tile);
  // x + |alpha| (steer(x, sign alpha) - x), in float32 as the torch steerer computes it
  thread_local std::vector<float> before;
  const size_t n = static_cast<size_t>(n_rows) * static_cast<size_t>(m.dim);
  before.resize(n);
  for (size_t i = 0; i < n; ++i) before[i] = to_acc(rows[i]);
  steer_latent(m, rows, n_rows, alpha > 0.0f ? 1.0f : -1.0f, workspace, n_workers, split_tile);
  const float length = std::fabs(alpha);
  for (size_t i = 0; i < n; ++i) rows[i] = from_acc<In>(before[i] + length * (to_acc(rows[i]) - before[i]));
}

template void steer_rows<float>(const SteerModel&, float*, int64_t, float, float*, int, bool);
template void steer_rows<half_t>(const SteerModel&, half_t*, int64_t, float, float*, int, bool);
template void steer_rows<bf16_t>(const SteerModel&, bf16_t*, int64_t, float, float*, int, bool);

}  // namespace llama_hook
}  // namespace innsteer
