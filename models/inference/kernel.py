"""The batch-1 gate kernel of the channel-skipping path (models/inference/skip.py): one C++ call per gated conv.

At batch 1 each torch op costs 1-3 us of dispatch and allocation, and a gate written in torch ops needs a
dozen (pool, scatter, linear, relu, topk, three index_selects, the saliency fold...): 20-30 us a gate,
as much as a resnet20 conv saves by skipping a quarter of its channels. `gt_prepare` does all of them in
one pass over preallocated buffers:

    pooled = mean_hw x (|x| for a signed input), full width (zeros where x is compact)
    z      = clamp((pooled / (mean pooled + eps) - m) * a, -clip, clip)   (the running standardisation and
             its clip, models/inference/skip_gate.py's folded_predictor)
    s      = relu(W_p . z + b_p)                            (accumulated in double; INPUT_GAIN folded into W_p)
    o      = topk(s, k) indices, ascending                 (torch's CPU topk: same winners, ties included)
    gather: w_out[j, i] = W'[o_j, in_i] * s[o_j],  b_out[j] = s[o_j] * shift[o_j] + beta[o_j]   (fbs)
            w_out[j, i] = W'[o_j, in_i],           b_out[j] = shift[o_j]                         (mse)

so conv(x, w_out, b_out) is the gate's output on its kept channels (models/inference/skip.py explains W', shift,
beta). `gt_epilogue` is the dense variant's tail: out[j] = s_j * z[o_j] + beta[o_j] (fbs) or z[o_j] (mse);
`gt_residual_relu` a BasicBlock's tail, relu(identity + the compact output scattered), in one pass.
The top-k replicates torch's CPU topk (std::nth_element, or std::partial_sort when k * 64 <= C, with
torch's comparator), so equal saliencies, e.g. several exact zeros after the ReLU, keep the same channels.

The source is compiled once per machine with the system C++ compiler (g++ -O3 -march=native, ~1 s) into
the cache folder (`core.cache.cache_dir()`: $GATETUNE_CACHE_DIR, else ~/.cache/gatetune), named by a hash of source,
compiler and CPU; loaded with ctypes. No torch headers are needed. Without a compiler (or with
GATETUNE_NO_KERNEL=1), `load()` returns None and models/inference/skip.py runs the same computation in torch ops.
Float32, contiguous, CPU tensors only.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

from gatetune.core.cache import cache_dir
from gatetune.models.gate_ops import SCALE_EPS

__all__ = ["cpu_name", "load", "GateSpec", "SOURCE", "PAD"]

PAD = 16   # floats of slack after the conv weight and the gathered-weight buffer (the kernel's vector copies)

SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

static const double SCALE_EPS = SCALE_EPS_VALUE;

struct GateSpec {
  int64_t c_in, c_out, k, kk, nonneg, scaled;
  const float* weight;    // (c_out, c_in, kk): the BN-folded conv weight W', then PAD floats
  const float* shift;     // (c_out)
  const float* beta;      // (c_out)
  const float* p_weight;  // (c_out, c_in)
  const float* p_bias;    // (c_out)
  const float* p_mean;    // (c_in): the predictor input's running standardisation (0 and 1 when none)
  const float* p_scale;   // (c_in)
  double p_clip;          // its clip (inf when none)
};

typedef std::pair<float, int64_t> elem_t;   // torch's topk_impl_loop<float, float>

static void topk_indices(const float* s, int64_t n, int64_t k, int64_t* out) {
  thread_local std::vector<elem_t> queue;
  queue.resize(n);
  for (int64_t j = 0; j < n; ++j) queue[j] = elem_t(s[j], j);
  auto larger = [](const elem_t& x, const elem_t& y) -> bool {
    return ((std::isnan(x.first) && !std::isnan(y.first)) || (x.first > y.first));
  };
  if (k * 64 <= n) std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), larger);
  else std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), larger);
  // the same set, in ascending channel order: the weight gathers then walk memory forwards
  thread_local std::vector<unsigned char> kept;
  kept.assign(n, 0);
  for (int64_t j = 0; j < k; ++j) kept[queue[j].second] = 1;
  for (int64_t c = 0, j = 0; c < n; ++c)
    if (kept[c]) out[j++] = c;
}

// Saliency, top-k and (gather != 0) the kept weights. x: (k_in, hw) holding the input channels in_idx
// (nullptr: all c_in). Writes idx_out (k), s_out (k: the winners' saliencies), and with gather w_out
// (k, k_in, kk) + PAD floats of slack, and b_out (k). Returns 0, or 1 when a saliency is NaN (the caller falls back to torch ops).
extern "C" int64_t gt_prepare(const GateSpec* g, const float* x, const int64_t* in_idx, int64_t k_in,
                              int64_t hw, int64_t gather, float* w_out, float* b_out, int64_t* idx_out,
                              float* s_out) {
  const int64_t c_in = g->c_in, c_out = g->c_out, k = g->k, kk = g->kk;
  thread_local std::vector<double> pooled;
  thread_local std::vector<float> s;
  pooled.assign(c_in, 0.0);
  s.resize(c_out);
  for (int64_t j = 0; j < k_in; ++j) {
    const float* p = x + j * hw;
    double acc = 0.0;
    if (g->nonneg) {
#pragma omp simd reduction(+ : acc)
      for (int64_t q = 0; q < hw; ++q) acc += p[q];
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t q = 0; q < hw; ++q) acc += std::fabs(p[q]);
    }
    pooled[in_idx ? in_idx[j] : j] = acc / (double)hw;
  }
  double* pv = pooled.data();
  double total = 0.0;
  for (int64_t i = 0; i < c_in; ++i) total += pv[i];
  const double inv = 1.0 / (total / (double)c_in + SCALE_EPS);   // gate_ops.scale_free
  const double clip = g->p_clip;
  for (int64_t i = 0; i < c_in; ++i) {   // in place: scale-free, standardised, clipped (gate.predictor_input)
    double v = (pv[i] * inv - (double)g->p_mean[i]) * (double)g->p_scale[i];
    pv[i] = v < -clip ? -clip : (v > clip ? clip : v);
  }
  int64_t nan = 0;
  for (int64_t c = 0; c < c_out; ++c) {
    const float* w = g->p_weight + c * c_in;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < c_in; ++i) acc += (double)w[i] * pv[i];
    float v = (float)(acc + (double)g->p_bias[c]);
    if (std::isnan(v)) nan = 1;
    s[c] = v > 0.0f ? v : (std::isnan(v) ? v : 0.0f);
  }
  if (nan) return 1;
  if (k < c_out) {
    topk_indices(s.data(), c_out, k, idx_out);
  } else {
    for (int64_t j = 0; j < k; ++j) idx_out[j] = j;
  }
  for (int64_t j = 0; j < k; ++j) s_out[j] = s[idx_out[j]];
  if (!gather) return 0;
  const int64_t row = c_in * kk, out_row = k_in * kk;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t c = idx_out[j];
    const float sc = g->scaled ? s_out[j] : 1.0f;
    const float* src = g->weight + c * row;
    float* dst = w_out + j * out_row;
    if (!in_idx) {
#pragma omp simd
      for (int64_t t = 0; t < out_row; ++t) dst[t] = src[t] * sc;
    } else if (kk == 9) {
      // 16 floats per 9-float chunk, one vector load and store: the 7 extra floats land where the next
      // chunk is written next (both buffers have PAD floats of slack at the end)
      for (int64_t i = 0; i < k_in; ++i) {
        const float* a = src + in_idx[i] * 9;
        float* b = dst + i * 9;
        float v[16];
#pragma omp simd
        for (int t = 0; t < 16; ++t) v[t] = a[t] * sc;
#pragma omp simd
        for (int t = 0; t < 16; ++t) b[t] = v[t];
      }
    } else {
      for (int64_t i = 0; i < k_in; ++i) {
        const float* a = src + in_idx[i] * kk;
        float* b = dst + i * kk;
        for (int64_t t = 0; t < kk; ++t) b[t] = a[t] * sc;
      }
    }
    b_out[j] = g->scaled ? sc * g->shift[c] + g->beta[c] : g->shift[c];
  }
  return 0;
}

// The dense variant's tail: z (c_out, hw) = conv(x, W') + shift over every channel; out (k, hw) holds the
// kept channels idx: s_j * z[idx_j] + beta[idx_j] (fbs) or z[idx_j] (mse).
extern "C" void gt_epilogue(const GateSpec* g, const float* z, int64_t hw, const int64_t* idx,
                            const float* s, float* out) {
  for (int64_t j = 0; j < g->k; ++j) {
    const float* a = z + idx[j] * hw;
    float* b = out + j * hw;
    if (g->scaled) {
      const float sc = s[j], be = g->beta[idx[j]];
#pragma omp simd
      for (int64_t q = 0; q < hw; ++q) b[q] = sc * a[q] + be;
    } else {
#pragma omp simd
      for (int64_t q = 0; q < hw; ++q) b[q] = a[q];
    }
  }
}

// A BasicBlock's tail: out = relu(identity + z scattered to the channels idx), identity and out (c, hw),
// z (k, hw) holding the distinct channels idx (idx nullptr: k == c, every channel in order).
extern "C" void gt_residual_relu(const float* identity, const float* z, const int64_t* idx, int64_t k,
                                 int64_t c, int64_t hw, float* out) {
  thread_local std::vector<int64_t> pos;
  pos.assign(c, -1);
  for (int64_t j = 0; j < k; ++j) pos[idx ? idx[j] : j] = j;
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* a = identity + ch * hw;
    float* o = out + ch * hw;
    if (pos[ch] >= 0) {
      const float* b = z + pos[ch] * hw;
#pragma omp simd
      for (int64_t q = 0; q < hw; ++q) { float v = a[q] + b[q]; o[q] = v > 0.0f ? v : 0.0f; }
    } else {
#pragma omp simd
      for (int64_t q = 0; q < hw; ++q) o[q] = a[q] > 0.0f ? a[q] : 0.0f;
    }
  }
}
""".replace("SCALE_EPS_VALUE", repr(SCALE_EPS))


class GateSpec(ctypes.Structure):
    """The C struct GateSpec: shapes, flags and data pointers of one gate's (contiguous float32) tensors.
    The tensors must outlive it (models/inference/skip.py keeps them as buffers of the gate module)."""

    _fields_ = [("c_in", ctypes.c_int64), ("c_out", ctypes.c_int64), ("k", ctypes.c_int64),
                ("kk", ctypes.c_int64), ("nonneg", ctypes.c_int64), ("scaled", ctypes.c_int64),
                ("weight", ctypes.c_void_p), ("shift", ctypes.c_void_p), ("beta", ctypes.c_void_p),
                ("p_weight", ctypes.c_void_p), ("p_bias", ctypes.c_void_p), ("p_mean", ctypes.c_void_p),
                ("p_scale", ctypes.c_void_p), ("p_clip", ctypes.c_double)]


def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo), else platform.processor() or the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_LOCK = threading.Lock()
_LIB: list = []   # [CDLL or None] once tried


def _compile(cxx: str, path: str) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = os.path.join(tmp, "gate.cpp"), os.path.join(tmp, "gate.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        subprocess.run([cxx, "-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC",
                        "-o", out, src], check=True, capture_output=True, timeout=120)
        os.replace(out, path)   # atomic: a concurrent process sees the old file or the whole new one


def load():
    """The compiled kernel (a ctypes.CDLL with gt_prepare and gt_epilogue typed), or None when it cannot
    be built here (no C++ compiler, GATETUNE_NO_KERNEL=1, not Linux/macOS). Compiled once per machine."""
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib = None
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if cxx and os.environ.get("GATETUNE_NO_KERNEL", "") in ("", "0") and os.name == "posix":
            try:
                version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
                key = hashlib.sha256("\0".join([SOURCE, version, cpu_name(), platform.machine()]).encode())
                path = cache_dir("kernels", f"gate-{key.hexdigest()[:16]}.so")
                if not os.path.exists(path):
                    _compile(cxx, path)
                lib = ctypes.CDLL(path)
                p, v, i64 = ctypes.POINTER(GateSpec), ctypes.c_void_p, ctypes.c_int64
                lib.gt_prepare.argtypes = [p, v, v, i64, i64, i64, v, v, v, v]
                lib.gt_prepare.restype = i64
                lib.gt_epilogue.argtypes = [p, v, i64, v, v, v]
                lib.gt_epilogue.restype = None
                lib.gt_residual_relu.argtypes = [v, v, v, i64, i64, i64, v]
                lib.gt_residual_relu.restype = None
            except (OSError, subprocess.SubprocessError):
                lib = None
        _LIB.append(lib)
        return lib
