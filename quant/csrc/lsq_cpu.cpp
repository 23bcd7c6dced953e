// Fused CPU kernels for LSQ fake quantization (Esser et al., ICLR 2020, eq. 1-3) with the
// bin statistics of Bin Regularization (Han et al., ICCV 2021, eq. 5) as a by-product.
//
// One pass over the tensor in the forward (quantized output, and optionally the per-bin
// count, sum of d and sum of d^2 with d = x - q*a, plus the total of |d|), one pass in the
// backward (straight-through gradient, LSQ's step-size sum, and optionally BR's gradient).
// Eager PyTorch needs 4 + 3 passes for LSQ alone and about 10 more for BR.
//
// Fused ReLU (input_relu): the kernels quantize relu(x) and pass the gradient through the
// ReLU, exactly as torch.relu followed by the unfused kernels (relu(x) = x < 0 ? 0 : x,
// which keeps -0 and NaN; its gradient is 0 where relu(x) <= 0, as threshold_backward),
// so a ReLU whose only consumer is a quantizer costs no pass of its own either way.
//
// Binary grid (quant/grid.py): the range [qmin, qmax] = [-1, 1] has the levels -1 and +1 only
// (spacing 2): a value goes to +1 where v/a >= 0, to -1 where v/a < 0, NaN stays NaN; bin k holds
// level qmin + k * spacing. Everything else (STE, LSQ eq. 3, BR) is the same code on that grid.
//
// Exactness: the quotient is computed as x / a (a true division, as the eager ops do) and
// rounded half-to-even, so the output equals round(clamp(x / a, lo, hi)) * a to the bit
// (signed zeros included). Sums are not bit-identical to PyTorch's (another order).
// Sums are accumulated in float32 lanes within fixed chunks of kChunk elements and added
// in float64 across chunks, in chunk order: the result does not depend on the thread count.
// The vector code uses GCC vector extensions, so it builds for any x86-64 (or other) target;
// quant/kernels.py passes the -m flags of the CPU torch itself detected.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Floats per vector: the widest registers the build targets (a wider GCC vector type than
// the target's registers is split badly: 8x slower on AVX2 for 16 floats).
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
constexpr int64_t kChunk = 1 << 14;        // elements per reduction chunk (a multiple of every W)
constexpr float kRound = 12582912.0f;      // 1.5 * 2^23: (c + kRound) - kRound is c rounded half-to-even for |c| < 2^22
constexpr int kMaxVectorBins = 16;         // grids up to 4 bits use the vector bin loop; wider ones the scalar one

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int vi __attribute__((vector_size(W * sizeof(float))));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return vf{} + s; }
inline float lane_sum(vf v) { float s = 0; for (int j = 0; j < W; ++j) s += v[j]; return s; }

// Clamp to [lo, hi] (NaN stays NaN) and round half-to-even; lo and hi are integers in [-128, 255].
// The magic-number rounding gives +0 for -0.5 < t <= -0; the sign of t is copied back, so
// the result is std::nearbyint's (and torch.round's) to the bit, signed zeros included.
inline vf clamp_round(vf c, vf lo, vf hi) {
  vf t = c < lo ? lo : c;
  t = t > hi ? hi : t;
  vf r = (t + kRound) - kRound;
  return (vf)(((vi)r & 0x7fffffff) | ((vi)t & (int)0x80000000));
}
inline float clamp_round(float c, float lo, float hi) {
  float t = c < lo ? lo : c;
  t = t > hi ? hi : t;
  return std::copysign((t + kRound) - kRound, t);
}
// The level of the binary grid: +1 for c >= 0, -1 for c < 0, NaN for NaN.
inline vf binary_level(vf c) { const vf one = splat(1.0f); return c < 0.0f ? -one : (c >= 0.0f ? one : c); }
inline float binary_level(float c) { return c < 0.0f ? -1.0f : (c >= 0.0f ? 1.0f : c); }

// The level of c on the grid: clamp_round, or binary_level on the binary grid.
inline vf to_level(vf c, vf lo, vf hi, bool binary) { return binary ? binary_level(c) : clamp_round(c, lo, hi); }
inline float to_level(float c, float lo, float hi, bool binary) { return binary ? binary_level(c) : clamp_round(c, lo, hi); }

inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }  // clear the sign bit: one instruction

// torch.relu to the bit: x < 0 ? 0 : x keeps -0 and NaN as they are.
inline vf relu(vf v) { return v < 0.0f ? vf{} : v; }
inline float relu(float v) { return v < 0.0f ? 0.0f : v; }

// Per-chunk partial sums of the forward: K bins x (count, sum d, sum d^2), then sum |d|.
struct ForwardArgs {
  const float* x;
  float* out;
  float a, lo, hi;
  bool input_relu;
  bool binary;          // the binary grid [-1, 1]: levels -1 and +1 (spacing 2)
  float spacing;        // distance between levels: 2 on the binary grid, else 1
};

// Quantizes x[begin, begin + len) and adds its statistics to part (K bins x (count, sum d,
// sum d^2), then sum |d|) one value at a time: the wide grids (5-8 bits) and every chunk's tail.
void forward_scalar(const ForwardArgs& p, int64_t begin, int64_t len, int nb, double* part) {
  for (int64_t i = begin; i < begin + len; ++i) {
    const float v = p.input_relu ? relu(p.x[i]) : p.x[i];
    float q = to_level(v / p.a, p.lo, p.hi, p.binary), y = q * p.a;
    p.out[i] = y;
    float d = v - y;
    part[3 * nb] += std::fabs(d);
    int k = std::isnan(q) ? 0 : static_cast<int>((q - p.lo) / p.spacing);  // a NaN value makes its bin's sums NaN
    part[3 * k] += 1; part[3 * k + 1] += d; part[3 * k + 2] += static_cast<double>(d) * d;
  }
}

// Statistics of one chunk, vector bin loop (NB bins known at compile time; RELU: fused ReLU).
template <int NB, bool RELU>
void forward_chunk(const ForwardArgs& p, int64_t begin, int64_t len, double* part) {
  // Locals (not p's fields) and __restrict: stores to out cannot alias them, so nothing is
  // reloaded or re-broadcast inside the loop.
  const vf av = splat(p.a), lov = splat(p.lo), hiv = splat(p.hi);
  constexpr int nb = NB > 0 ? NB : 1;
  vf level[nb], cnt[nb] = {}, sum[nb] = {}, sq[nb] = {}, absd = {};
  for (int k = 0; k < nb; ++k) level[k] = splat(p.lo + k * p.spacing);
  const bool binary = p.binary;
  const float* __restrict x = p.x + begin;
  float* __restrict out = p.out + begin;
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    vf xv = load(x + i);
    if constexpr (RELU) xv = relu(xv);
    vf q = to_level(xv / av, lov, hiv, binary);
    vf y = q * av;
    store(out + i, y);
    if constexpr (NB > 0) {
      vf d = xv - y, d2 = d * d;
      absd += vabs(d);
      for (int k = 0; k < NB; ++k) {
        vi m = q == level[k];
        if (k == 0) m |= q != q;  // a NaN value counts in bin 0, making the loss NaN (as the PyTorch path)
        // "m ? acc + v : acc" is one masked add on AVX-512 (add and blend elsewhere).
        cnt[k] = m ? cnt[k] + 1.0f : cnt[k];
        sum[k] = m ? sum[k] + d : sum[k];
        sq[k] = m ? sq[k] + d2 : sq[k];
      }
    }
  }
  if constexpr (NB > 0) {
    double tail[3 * NB + 1] = {};
    forward_scalar(p, begin + i, len - i, NB, tail);
    for (int k = 0; k < NB; ++k) {
      part[3 * k] = lane_sum(cnt[k]) + tail[3 * k];
      part[3 * k + 1] = lane_sum(sum[k]) + tail[3 * k + 1];
      part[3 * k + 2] = lane_sum(sq[k]) + tail[3 * k + 2];
    }
    part[3 * NB] = lane_sum(absd) + tail[3 * NB];
  } else {
    for (; i < len; ++i) out[i] = to_level((RELU ? relu(x[i]) : x[i]) / p.a, p.lo, p.hi, binary) * p.a;
  }
}

template <int NB, bool RELU>
void run_forward(const ForwardArgs& p, int64_t n, int nb, double* totals) {
  const int64_t chunks = (n + kChunk - 1) / kChunk, width = 3 * nb + 1;
  std::vector<double> parts(nb > 0 ? chunks * width : 0, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
      if (NB > 0 || nb == 0) forward_chunk<NB, RELU>(p, begin, len, nb > 0 ? parts.data() + c * width : nullptr);
      else forward_scalar(p, begin, len, nb, parts.data() + c * width);
    }
  });
  for (int64_t c = 0; c < (nb > 0 ? chunks : 0); ++c)
    for (int64_t r = 0; r < width; ++r) totals[r] += parts[c * width + r];
}

// The step size: a float32 scalar tensor on the CPU (read here, so Python never calls .item()).
float step_size(const torch::Tensor& a) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.numel() == 1,
              "the step size must be a one-element float32 CPU tensor");
  return a.item<float>();
}

// The binary grid (quant/grid.py BINARY_RANGE) and the number of levels (bins) of a grid.
bool is_binary(int64_t qmin, int64_t qmax) { return qmin == -1 && qmax == 1; }
int num_levels(int64_t qmin, int64_t qmax) { return is_binary(qmin, qmax) ? 2 : static_cast<int>(qmax - qmin + 1); }

void check_input(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_non_overlapping_and_dense(),
              what, ": expected a dense float32 CPU tensor");
}

}  // namespace

// out = round(clamp(v / a, qmin, qmax)) * a, in the memory layout of x, where v = relu(x)
// with input_relu and v = x otherwise. With with_stats, also stats (3, K) float32: per bin
// k (level qmin + k) the count, sum of d and sum of d^2, d = v - out; and abs_sum, a float32
// scalar: the sum of |d| over all elements.
std::vector<torch::Tensor> lsq_forward(const torch::Tensor& x, const torch::Tensor& a, int64_t qmin, int64_t qmax,
                                       bool with_stats, bool input_relu) {
  check_input(x, "lsq_forward");
  TORCH_CHECK(qmin < qmax && qmax - qmin < 256, "lsq_forward: need qmin < qmax, at most 256 levels");
  const bool binary = is_binary(qmin, qmax);
  const int nb = with_stats ? num_levels(qmin, qmax) : 0;
  torch::Tensor out = torch::empty_like(x);  // the layout of x (the memory format is preserved)
  ForwardArgs p{x.data_ptr<float>(), out.data_ptr<float>(),
                step_size(a), static_cast<float>(qmin), static_cast<float>(qmax), input_relu,
                binary, binary ? 2.0f : 1.0f};
  std::vector<double> totals(3 * nb + 1, 0.0);
  const int64_t n = x.numel();
  auto run = [&](auto relu) {  // relu: std::true_type or std::false_type, a template argument
    constexpr bool R = decltype(relu)::value;
    switch (nb) {
      case 0: run_forward<0, R>(p, n, 0, nullptr); break;
      case 2: run_forward<2, R>(p, n, nb, totals.data()); break;
      case 4: run_forward<4, R>(p, n, nb, totals.data()); break;
      case 8: run_forward<8, R>(p, n, nb, totals.data()); break;
      case 16: run_forward<16, R>(p, n, nb, totals.data()); break;
      default: run_forward<-1, R>(p, n, nb, totals.data()); break;
    }
  };
  if (input_relu) run(std::true_type{}); else run(std::false_type{});
  torch::Tensor stats = torch::empty({3, nb}, x.options());
  auto s = stats.accessor<float, 2>();
  for (int k = 0; k < nb; ++k)
    for (int r = 0; r < 3; ++r) s[r][k] = static_cast<float>(totals[3 * k + r]);
  torch::Tensor abs_sum = torch::full({}, static_cast<float>(totals[3 * nb]), x.options());
  return {out, stats, abs_sum};
}

struct BackwardArgs {
  const float* x;
  const float* grad_out;
  float* grad_x;
  float a, lo, hi;
  bool binary;          // the binary grid [-1, 1] (levels -1, +1)
  float spacing;        // distance between levels: 2 on the binary grid, else 1
  int nb;
  const float* t_sum;  // BR table row 1 per bin, or nullptr without BR
  const float* t_sq2;  // 2 x BR table row 2 per bin
};

// The backward of elements [begin, end) (RELU: fused ReLU); returns their LSQ eq. 3 sum.
template <bool RELU>
double backward_chunk(const BackwardArgs& p, int64_t begin, int64_t end) {
  const bool br = p.t_sum != nullptr, vector_bins = p.nb <= kMaxVectorBins, by_permute = p.nb <= W;
  const vf av = splat(p.a), lov = splat(p.lo), hiv = splat(p.hi), inv_spacing = splat(1.0f / p.spacing);
  const bool binary = p.binary;
  vf level[kMaxVectorBins], table_sum[kMaxVectorBins], table_sq2[kMaxVectorBins];  // hoisted out of the loop
  vf lanes_sum = {}, lanes_sq2 = {};  // the tables in one register each, for a permute when nb <= W
  for (int k = 0; k < p.nb && br && vector_bins; ++k) {
    level[k] = splat(p.lo + k * p.spacing); table_sum[k] = splat(p.t_sum[k]); table_sq2[k] = splat(p.t_sq2[k]);
    if (k < W) { lanes_sum[k] = p.t_sum[k]; lanes_sq2[k] = p.t_sq2[k]; }
  }
  const float* __restrict x = p.x;
  const float* __restrict g_in = p.grad_out;
  float* __restrict g_x = p.grad_x;
  vf acc = {};
  int64_t i = begin;
  for (; i + W <= end && (!br || vector_bins); i += W) {
    vf xv = load(x + i), g = load(g_in + i);
    if constexpr (RELU) xv = relu(xv);
    vf cv = xv / av;
    vi inside = (cv > lov) & (cv < hiv);
    vf q = to_level(cv, lov, hiv, binary);
    acc += inside ? g * (q - cv) : g * q + cv * 0.0f;  // cv * 0 is NaN for an infinite x/a, as in the plain form
    vf gx = inside ? g : vf{};
    if (br) {
      vf d = xv - q * av, ts = {}, tq = {};
      if (by_permute) {  // one vpermps per table (a NaN q gives some entry; its d is NaN anyway)
        vi bin = __builtin_convertvector(q == q ? (q - lov) * inv_spacing : vf{}, vi);  // NaN -> bin 0 (no UB)
        ts = __builtin_shuffle(lanes_sum, bin);
        tq = __builtin_shuffle(lanes_sq2, bin);
      } else {
        for (int k = 0; k < p.nb; ++k) {
          vi m = q == level[k];
          ts = m ? table_sum[k] : ts;
          tq = m ? table_sq2[k] : tq;
        }
      }
      gx += ts + tq * d;
    }
    if constexpr (RELU) gx = xv <= 0.0f ? vf{} : gx;  // the ReLU's own gradient (threshold_backward)
    store(g_x + i, gx);
  }
  double tail = 0;
  for (; i < end; ++i) {
    const float v = RELU ? relu(x[i]) : x[i], g = g_in[i];
    float cv = v / p.a;
    bool inside = cv > p.lo && cv < p.hi;
    float q = to_level(cv, p.lo, p.hi, binary);
    tail += inside ? g * (q - cv) : g * q + cv * 0.0f;
    float gx = inside ? g : 0.0f;
    if (br) {
      int k = std::isnan(q) ? 0 : static_cast<int>((q - p.lo) / p.spacing);
      gx += p.t_sum[k] + p.t_sq2[k] * (v - q * p.a);
    }
    g_x[i] = RELU && v <= 0.0f ? 0.0f : gx;
  }
  return lane_sum(acc) + tail;
}

// Gradients of lsq_forward, with v = relu(x) if input_relu else x. grad_x = grad_out where
// qmin < v/a < qmax, else 0 (straight-through estimator), plus, with a BR table (2, K) float32
// (t_sum, t_sq), t_sum[k] + 2 t_sq[k] d for an element in bin k (the gradient of stats rows 1
// and 2); with input_relu, times the ReLU's gradient (0 where v <= 0). step_sum (float64
// scalar) is sum grad_out * (round(v/a) - v/a) inside the range and * qmin / * qmax at or
// beyond the clip points: LSQ eq. 3 before the gradient scale g.
std::vector<torch::Tensor> lsq_backward(const torch::Tensor& grad_out, const torch::Tensor& x, const torch::Tensor& a,
                                        int64_t qmin, int64_t qmax, const c10::optional<torch::Tensor>& br_table,
                                        bool input_relu) {
  check_input(x, "lsq_backward");
  check_input(grad_out, "lsq_backward");
  TORCH_CHECK(qmin < qmax && qmax - qmin < 256, "lsq_backward: need qmin < qmax, at most 256 levels");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.strides() == x.strides(),
              "lsq_backward: grad_out must have the shape and strides of x");
  const int nb = num_levels(qmin, qmax);
  std::vector<float> t_sum, t_sq2;
  if (br_table && br_table->defined()) {
    TORCH_CHECK(br_table->scalar_type() == at::kFloat && br_table->dim() == 2 && br_table->size(0) == 2 &&
                br_table->size(1) == nb, "lsq_backward: br_table must be float32 (2, K)");
    const torch::Tensor table = br_table->contiguous();
    auto t = table.accessor<float, 2>();
    for (int k = 0; k < nb; ++k) { t_sum.push_back(t[0][k]); t_sq2.push_back(2 * t[1][k]); }
  }
  torch::Tensor grad_x = torch::empty_like(x);  // the layout of x (the memory format is preserved)
  const BackwardArgs p{x.data_ptr<float>(), grad_out.data_ptr<float>(), grad_x.data_ptr<float>(),
                       step_size(a), static_cast<float>(qmin), static_cast<float>(qmax), is_binary(qmin, qmax),
                       is_binary(qmin, qmax) ? 2.0f : 1.0f, nb,
                       t_sum.empty() ? nullptr : t_sum.data(), t_sq2.data()};
  const int64_t n = x.numel(), chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> parts(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      parts[c] = input_relu ? backward_chunk<true>(p, begin, end) : backward_chunk<false>(p, begin, end);
    }
  });
  double step_sum = 0;
  for (double v : parts) step_sum += v;
  return {grad_x, torch::full({}, step_sum, x.options().dtype(at::kDouble))};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lsq_forward", &lsq_forward, "LSQ fake quantization (and BR bin statistics) of x or relu(x), one pass",
        py::arg("x"), py::arg("a"), py::arg("qmin"), py::arg("qmax"), py::arg("with_stats"), py::arg("input_relu") = false);
  m.def("lsq_backward", &lsq_backward, "Gradients of lsq_forward (STE, LSQ eq. 3 sum, BR), one pass",
        py::arg("grad_out"), py::arg("x"), py::arg("a"), py::arg("qmin"), py::arg("qmax"), py::arg("br_table"),
        py::arg("input_relu") = false);
}
