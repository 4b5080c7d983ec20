// Fused (rotated) fake quantisation for post-training quantisation on CPU
// (irformer.compress.fused).
//
// An activation quantiser of CompSRT runs, per row of the last dim: zero-pad
// to m, rotate by an orthonormal Hadamard matrix, fake-quantise on a uniform
// grid, rotate back and crop. In eager PyTorch that is two (rows x m x m)
// matrix products and six elementwise passes forward, and as many again in
// backward, each pass over a tensor as large as every attention map. Here each
// row is done in an L1-resident buffer: one read and one write forward; the
// backward recomputes the rotated row from the saved input and returns the
// input gradient plus the two scalar gradients (step and offset).
//
// Rotation modes: 0 none (m == n), 1 Sylvester/fast Walsh-Hadamard (m a power
// of two; H symmetric and self-inverse), 2 a dense orthonormal matrix H (m x m):
// rotate y = pad(x) H^T, back x = crop(y H).
//
// The quantisation step follows the eager op sequence exactly,
// clamp(round((y - z) / s), 0, L) * s + z with round-half-to-even, and this
// file is compiled without floating-point contraction, so without rotation the
// output equals the eager path bit for bit; with rotation the transforms sum
// in a different order than a matrix product (differences ~1e-7 relative).
#include <torch/extension.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Rows are processed in blocks of kLanes, stored transposed (element j of lane
// v at buf[j * kLanes + v]) so that every butterfly, product and grid step is a
// loop over kLanes contiguous floats: one AVX-512 register.
constexpr int64_t kLanes = 16;
// Elements per parallel work item (and fp32 partial sum) without rotation.
constexpr int64_t kChunk = 4096;

// Round half to even for |t| <= 2^22 (callers clamp t to [-1, levels + 1]
// first, which leaves clamp(round(t), 0, levels) unchanged): adding and
// subtracting 1.5 * 2^23 rounds in the FPU's default mode, and unlike
// std::nearbyint it vectorises.
inline float round_half_even(float t) {
  constexpr float kMagic = 12582912.0f;
  return (t + kMagic) - kMagic;
}

// min/max as comparisons (std::fmin/fmax are library calls that block vectorising).
inline float clamp_to(float t, float lo, float hi) {
  t = t < lo ? lo : t;
  return t > hi ? hi : t;
}

// The backward of the grid step on `count` rotated values y with their gradients g (overwritten with d loss / d y): the eager
// backward's arithmetic. With t = (y - z) / s, r = round(t), inside = [0 <= r <= L]:
// ds += (clamp(r) - t inside) g, dz += (1 - inside) g, dy = inside g. (t is
// clamped first for the rounding trick; where it matters, inside the grid, the
// clamp is a no-op.) Explicit AVX-512 where available: the compiler keeps a
// scalar version of this loop at run time otherwise.
inline void grid_backward(const float* y, float* g, int64_t count, float scale, float zero,
                          float top, float& gs, float& gz) {
#if defined(__AVX512F__)
  const __m512 vz = _mm512_set1_ps(zero), vs = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(top + 1.0f);
  const __m512 vtop = _mm512_set1_ps(top), nil = _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f), magic = _mm512_set1_ps(12582912.0f);
  __m512 acc_s = nil, acc_z = nil;
  for (int64_t j = 0; j + 16 <= count; j += 16) {
    const __m512 gv = _mm512_loadu_ps(g + j);
    __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(y + j), vz), vs);
    t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
    const __m512 rd = _mm512_sub_ps(_mm512_add_ps(t, magic), magic);
    const __mmask16 in = _mm512_cmp_ps_mask(rd, nil, _CMP_GE_OQ) &
                         _mm512_cmp_ps_mask(rd, vtop, _CMP_LE_OQ);
    const __m512 inside = _mm512_maskz_mov_ps(in, one);
    const __m512 clamped = _mm512_min_ps(_mm512_max_ps(rd, nil), vtop);
    acc_s = _mm512_add_ps(acc_s, _mm512_mul_ps(_mm512_sub_ps(clamped, _mm512_mul_ps(t, inside)), gv));
    acc_z = _mm512_add_ps(acc_z, _mm512_mul_ps(_mm512_sub_ps(one, inside), gv));
    _mm512_storeu_ps(g + j, _mm512_mul_ps(gv, inside));
  }
  gs = _mm512_reduce_add_ps(acc_s);
  gz = _mm512_reduce_add_ps(acc_z);
  const int64_t start = count - count % 16;
#else
  gs = gz = 0.0f;
  const int64_t start = 0;
#endif
  for (int64_t j = start; j < count; ++j) {
    const float t = clamp_to((y[j] - zero) / scale, -1.0f, top + 1.0f);
    const float rd = round_half_even(t);
    const float inside = (rd >= 0.0f) & (rd <= top) ? 1.0f : 0.0f;
    const float gv = g[j];
    gs += (clamp_to(rd, 0.0f, top) - t * inside) * gv;
    gz += (1.0f - inside) * gv;
    g[j] = gv * inside;
  }
}

// The grid step forward on `count` values in place: the eager op sequence
// (y - z) / s, round, clamp, * s, + z.
inline void grid_forward(float* b, int64_t count, float scale, float zero, float top) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const float t = round_half_even(clamp_to((b[j] - zero) / scale, -1.0f, top + 1.0f));
    b[j] = clamp_to(t, 0.0f, top) * scale + zero;
  }
}

struct Rotation {
  int64_t n = 0;             // row length of the input
  int64_t m = 0;             // rotated length (>= n)
  int64_t mode = 0;          // 0 none, 1 fwht, 2 dense
  const float* h = nullptr;  // dense (m, m) when mode == 2
  float norm = 1.0f;         // 1 / sqrt(m) for the fwht

  // buf (m x lanes) <- rows [r0, r0 + count) of src, zero-padded, transposed.
  void load(const float* src, int64_t r0, int64_t count, float* buf) const {
    for (int64_t j = 0; j < m * kLanes; ++j) buf[j] = 0.0f;
    for (int64_t v = 0; v < count; ++v) {
      const float* row = src + (r0 + v) * n;
      for (int64_t i = 0; i < n; ++i) buf[i * kLanes + v] = row[i];
    }
  }

  // The first n entries of each lane back into rows [r0, r0 + count) of dst.
  void store(const float* buf, int64_t r0, int64_t count, float* dst) const {
    for (int64_t v = 0; v < count; ++v) {
      float* row = dst + (r0 + v) * n;
      for (int64_t i = 0; i < n; ++i) row[i] = buf[i * kLanes + v];
    }
  }

  // buf <- buf H^T (rotate); tmp: scratch of m x lanes.
  void rotate(float* buf, float* tmp) const {
    if (mode == 1) {
      fwht(buf);
    } else if (mode == 2) {
      product(buf, tmp, false);
    }
  }

  // buf <- buf H (rotate back).
  void unrotate(float* buf, float* tmp) const {
    if (mode == 1) {
      fwht(buf);  // the orthonormal Sylvester matrix is symmetric: its own inverse
    } else if (mode == 2) {
      product(buf, tmp, true);
    }
  }

  // Orthonormal Sylvester transform of every lane, in place.
  void fwht(float* buf) const {
    for (int64_t h2 = 1; h2 < m; h2 *= 2) {
      for (int64_t i = 0; i < m; i += 2 * h2) {
        for (int64_t j = i; j < i + h2; ++j) {
          float* a = buf + j * kLanes;
          float* b = buf + (j + h2) * kLanes;
#pragma omp simd
          for (int64_t v = 0; v < kLanes; ++v) {
            const float x = a[v], y = b[v];
            a[v] = x + y;
            b[v] = x - y;
          }
        }
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < m * kLanes; ++j) buf[j] *= norm;
  }

  // Dense: buf <- buf H^T (y_j = sum_i H[j, i] x_i) or buf H (x_i = sum_j H[j, i] y_j).
  void product(float* buf, float* tmp, bool transpose) const {
    for (int64_t j = 0; j < m * kLanes; ++j) tmp[j] = 0.0f;
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        const float w = transpose ? h[i * m + j] : h[j * m + i];
        const float* in = buf + i * kLanes;
        float* out = tmp + j * kLanes;
#pragma omp simd
        for (int64_t v = 0; v < kLanes; ++v) out[v] += w * in[v];
      }
    }
    for (int64_t j = 0; j < m * kLanes; ++j) buf[j] = tmp[j];
  }
};

Rotation make_rotation(const torch::Tensor& x, int64_t m, int64_t mode,
                       const c10::optional<torch::Tensor>& matrix) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 &&
                  x.device().is_cpu(),
              "fake_quant: x must be a contiguous 2-d fp32 CPU tensor, got ", x.sizes());
  Rotation r;
  r.n = x.size(1);
  r.m = m;
  r.mode = mode;
  TORCH_CHECK(m >= r.n, "fake_quant: rotated size ", m, " < row length ", r.n);
  TORCH_CHECK(mode >= 0 && mode <= 2, "fake_quant: unknown rotation mode ", mode);
  TORCH_CHECK(mode != 0 || m == r.n, "fake_quant: no rotation needs m == n");
  TORCH_CHECK(mode != 1 || (m & (m - 1)) == 0, "fake_quant: fwht needs a power of two, got ", m);
  if (mode == 2) {
    TORCH_CHECK(matrix.has_value(), "fake_quant: dense rotation needs its matrix");
    const auto& h = *matrix;
    TORCH_CHECK(h.dim() == 2 && h.size(0) == m && h.size(1) == m && h.is_contiguous() &&
                    h.scalar_type() == torch::kFloat32,
                "fake_quant: matrix must be a contiguous fp32 (", m, ", ", m, ") tensor");
    r.h = h.data_ptr<float>();
  }
  r.norm = 1.0f / std::sqrt(static_cast<float>(m));
  return r;
}

torch::Tensor fake_quant_forward(const torch::Tensor& x, int64_t m, int64_t mode,
                                 const c10::optional<torch::Tensor>& matrix, double scale_d,
                                 double zero_d, int64_t levels) {
  const Rotation rot = make_rotation(x, m, mode, matrix);
  const float scale = static_cast<float>(scale_d), zero = static_cast<float>(zero_d);
  const float top = static_cast<float>(levels);
  auto out = torch::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t rows = x.size(0);
  if (rot.mode == 0) {  // elementwise: no transposed blocks needed
    const int64_t total = x.numel();
    out.copy_(x);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < total; c += kChunk) {
      grid_forward(dst + c, std::min(kChunk, total - c), scale, zero, top);
    }
    return out;
  }
  const int64_t blocks = (rows + kLanes - 1) / kLanes;
#pragma omp parallel
  {
    std::vector<float> buf(m * kLanes), tmp(m * kLanes);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * kLanes, count = std::min(kLanes, rows - r0);
      float* b = buf.data();
      rot.load(src, r0, count, b);
      rot.rotate(b, tmp.data());
      grid_forward(b, m * kLanes, scale, zero, top);
      rot.unrotate(b, tmp.data());
      rot.store(b, r0, count, dst);
    }
  }
  return out;
}

// Returns (grad_x or an empty tensor, [grad_scale, grad_zero] as float64).
std::tuple<torch::Tensor, torch::Tensor> fake_quant_backward(
    const torch::Tensor& x, const torch::Tensor& grad, int64_t m, int64_t mode,
    const c10::optional<torch::Tensor>& matrix, double scale_d, double zero_d, int64_t levels,
    bool need_x) {
  const Rotation rot = make_rotation(x, m, mode, matrix);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == torch::kFloat32,
              "fake_quant: grad must match x");
  const float scale = static_cast<float>(scale_d), zero = static_cast<float>(zero_d);
  const float top = static_cast<float>(levels);
  auto gx = need_x ? torch::empty_like(x) : torch::Tensor();
  const float* src = x.data_ptr<float>();
  const float* gsrc = grad.data_ptr<float>();
  float* gdst = need_x ? gx.data_ptr<float>() : nullptr;
  const int64_t rows = x.size(0);
  double gs_total = 0.0, gz_total = 0.0;
  if (rot.mode == 0) {  // elementwise: no transposed blocks needed
    const int64_t total = x.numel();
    auto gy = need_x ? gx : torch::empty_like(x);
    gy.copy_(grad);
    float* gdata = gy.data_ptr<float>();
#pragma omp parallel for schedule(static) reduction(+ : gs_total, gz_total)
    for (int64_t c = 0; c < total; c += kChunk) {
      float gs_chunk = 0.0f, gz_chunk = 0.0f;
      grid_backward(src + c, gdata + c, std::min(kChunk, total - c), scale, zero, top, gs_chunk,
                    gz_chunk);
      gs_total += gs_chunk;
      gz_total += gz_chunk;
    }
  } else {
  const int64_t blocks = (rows + kLanes - 1) / kLanes;
#pragma omp parallel reduction(+ : gs_total, gz_total)
  {
    std::vector<float> y(m * kLanes), g(m * kLanes), tmp(m * kLanes);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * kLanes, count = std::min(kLanes, rows - r0);
      float* yy = y.data();
      float* gg = g.data();
      rot.load(src, r0, count, yy);
      rot.rotate(yy, tmp.data());
      // d loss / d (quantised rotated row) = pad(grad) H^T: the same map as rotate.
      // Padded lanes and padded entries carry zero gradient, so they add nothing.
      rot.load(gsrc, r0, count, gg);
      rot.rotate(gg, tmp.data());
      float gs_block = 0.0f, gz_block = 0.0f;
      grid_backward(yy, gg, m * kLanes, scale, zero, top, gs_block, gz_block);
      gs_total += gs_block;
      gz_total += gz_block;
      if (need_x) {
        rot.unrotate(gg, tmp.data());
        rot.store(gg, r0, count, gdst);
      }
    }
  }
  }
  auto totals = torch::empty({2}, torch::kFloat64);
  totals[0] = gs_total;
  totals[1] = gz_total;
  return {gx, totals};
}

// Grid indices of the rotated rows, clamp(round((y - z) / s), 0, L) - offset, as
// int8 (rows, m): the integer operand of a real low-bit matmul
// (irformer.compress.int_linear); offset 128 maps 8-bit indices into int8.
torch::Tensor quantize_indices(const torch::Tensor& x, int64_t m, int64_t mode,
                               const c10::optional<torch::Tensor>& matrix, double scale_d,
                               double zero_d, int64_t levels, int64_t offset) {
  const Rotation rot = make_rotation(x, m, mode, matrix);
  const float scale = static_cast<float>(scale_d), zero = static_cast<float>(zero_d);
  const float top = static_cast<float>(levels), shift = static_cast<float>(offset);
  TORCH_CHECK(levels - offset <= 127 && -offset >= -128, "fake_quant: indices do not fit int8");
  const int64_t rows = x.size(0);
  auto out = torch::empty({rows, m}, x.options().dtype(torch::kInt8));
  const float* src = x.data_ptr<float>();
  int8_t* dst = out.data_ptr<int8_t>();
  const int64_t blocks = (rows + kLanes - 1) / kLanes;
#pragma omp parallel
  {
    std::vector<float> buf(m * kLanes), tmp(m * kLanes);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * kLanes, count = std::min(kLanes, rows - r0);
      float* b = buf.data();
      rot.load(src, r0, count, b);
      rot.rotate(b, tmp.data());
#pragma omp simd
      for (int64_t j = 0; j < m * kLanes; ++j) {
        const float t = round_half_even(clamp_to((b[j] - zero) / scale, -1.0f, top + 1.0f));
        b[j] = clamp_to(t, 0.0f, top) - shift;
      }
      for (int64_t v = 0; v < count; ++v) {
        int8_t* row = dst + (r0 + v) * m;
        for (int64_t j = 0; j < m; ++j) row[j] = static_cast<int8_t>(b[j * kLanes + v]);
      }
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("forward", &fake_quant_forward, "rotate, fake-quantise, rotate back (rows of x)",
          py::arg("x"), py::arg("m"), py::arg("mode"), py::arg("matrix"), py::arg("scale"),
          py::arg("zero"), py::arg("levels"));
  mod.def("backward", &fake_quant_backward,
          "straight-through gradients of forward: (grad_x, [grad_scale, grad_zero])",
          py::arg("x"), py::arg("grad"), py::arg("m"), py::arg("mode"), py::arg("matrix"),
          py::arg("scale"), py::arg("zero"), py::arg("levels"), py::arg("need_x"));
  mod.def("indices", &quantize_indices, "int8 grid indices of the rotated rows of x",
          py::arg("x"), py::arg("m"), py::arg("mode"), py::arg("matrix"), py::arg("scale"),
          py::arg("zero"), py::arg("levels"), py::arg("offset"));
}
