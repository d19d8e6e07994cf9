// Fused float32 CPU kernels (exact GELU, LayerNorm, Linear, attention) for MindSpore ops.Custom(func_type="aot").
// pvt_dense/models/fast_ops.py compiles this file (cached by a hash of its content), loads it and checks its
// symbols with ctypes, and describes the kernels' accuracy and speed.
#include <sched.h>
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#ifdef PVT_HAVE_DNNL
// oneDNN's row-major sgemm, from the libdnnl that ships inside MindSpore's CPU wheel: C = alpha op(A) op(B) + beta C.
// It runs on the calling thread (MindSpore builds oneDNN with its threadpool runtime), so the kernels below split
// the work over their own threads.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
#endif

namespace {

// Threads: one pool per process, started at the first parallel call and kept (starting threads on every call
// cost ~20-50 us each, several times per layer). The count comes from PvtSetThreadCount (pvt_dense sets it from
// PVT_DENSE_NUM_THREADS, or from the CPUs this process may use divided among msrun's local workers); 0 means
// "the CPUs this process may use".
std::atomic<int> requested_threads{0};

int affinity_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

int thread_count() {
  const int requested = requested_threads.load();
  if (requested > 0) return requested;
  static const int fallback = affinity_count();
  return fallback;
}

// Runs task(c) for c in [0, chunks): chunk 0 and any chunk no worker has taken on the calling thread, the rest on
// the pool's workers. Which thread runs a chunk never changes its result: each chunk writes only its own outputs
// and its own partial-sum slot, so results are the same as running the chunks one after another.
class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) {
      try {
        threads_.emplace_back([this] { work(); });
      } catch (...) {
        break;  // could not start another thread: run with the ones that started
      }
    }
  }

  int size() const { return static_cast<int>(threads_.size()); }

  void run(int64_t chunks, const std::function<void(int64_t)> &task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      chunks_ = chunks;
      next_.store(1);
      busy_ = static_cast<int>(threads_.size());
      error_ = nullptr;
      ++generation_;
    }
    start_.notify_all();
    std::exception_ptr mine;
    try {
      task(0);
      drain(task);
    } catch (...) {
      mine = std::current_exception();
      next_.store(chunks);  // let the workers stop early
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    task_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain(const std::function<void(int64_t)> &task) {
    for (int64_t c = next_.fetch_add(1); c < chunks_; c = next_.fetch_add(1)) task(c);
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)> *task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        task = task_;
      }
      std::exception_ptr failure;
      try {
        drain(*task);
      } catch (...) {
        failure = std::current_exception();
        next_.store(chunks_);
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (failure && !error_) error_ = failure;
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int64_t)> *task_ = nullptr;
  int64_t chunks_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

// The pool is never destroyed (its workers must not be joined while the process exits) and is remade after a fork,
// where only the forking thread survives, or when the thread count changes. One parallel call uses it at a time;
// a kernel launched while another holds it (MindSpore may run independent kernels concurrently) runs its chunks on
// its own thread.
std::mutex pool_mutex;
ThreadPool *pool = nullptr;
int pool_workers = -1;
pid_t pool_pid = 0;

// Runs body(begin, end, slot) over [0, n) in contiguous chunks of at least `grain` items, at most one chunk per
// thread; slot is the chunk's index (< thread_count()), for per-chunk partial sums.
template <class Body>
void parallel_for(int64_t n, int64_t grain, const Body &body) {
  const int threads = thread_count();
  int64_t chunks = n / (grain > 0 ? grain : 1);
  if (chunks > threads) chunks = threads;
  if (chunks <= 1) {
    body(0, n, 0);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  const std::function<void(int64_t)> chunk = [&](int64_t c) {
    const int64_t begin = c * step, end = begin + step < n ? begin + step : n;
    if (begin < end) body(begin, end, static_cast<int>(c));
  };
  std::unique_lock<std::mutex> lock(pool_mutex, std::try_to_lock);
  if (lock.owns_lock()) {
    if (pool == nullptr || pool_pid != getpid() || pool_workers != threads - 1) {
      pool = new ThreadPool(threads - 1);  // an old pool's workers stay parked; a forked child has none
      pool_workers = threads - 1;
      pool_pid = getpid();
    }
    pool->run(chunks, chunk);
    return;
  }
  for (int64_t c = 0; c < chunks; ++c) chunk(c);
}

inline float as_float(int32_t i) { float f; std::memcpy(&f, &i, sizeof f); return f; }

// exp(a) for a in [-87, 88] (0 below, e^88 above), ~1 ulp; branch-free so loops vectorise.
inline float exp_clamped(float a_in) {
  float a = a_in < -87.0f ? -87.0f : a_in;
  a = a > 88.0f ? 88.0f : a;
  // Round a / ln2 to the nearest integer with the 1.5 * 2^23 shifter (exact for |a / ln2| < 2^22).
  const float n = (a * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = a - n * 0.693145751953125f;  // ln2 split in two so r is exact to float precision
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float value = p * as_float((static_cast<int32_t>(n) + 127) << 23);
  return a_in < -87.0f ? 0.0f : value;  // below e^-87 flush to zero instead of returning e^-87
}

// erfc(a) for a >= 0 as t * exp(-a^2 + P(t)), t = 1 / (1 + a/2): relative error ~1e-7 over the float range.
// P: least squares on ln(erfcx(a) / t) for a in [0, 10], reweighted toward minimax (max error 4.5e-8).
inline float erfc_nonneg(float a) {
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 1.422023271e-01f;
  p = p * t - 6.660994638e-01f;
  p = p * t + 1.122468556e+00f;
  p = p * t - 6.513143240e-01f;
  p = p * t - 1.167530199e-01f;
  p = p * t + 2.018824575e-02f;
  p = p * t + 2.835616645e-02f;
  p = p * t + 3.879006575e-01f;
  p = p * t + 9.984923255e-01f;
  p = p * t - 1.265441425e+00f;
  return t * exp_clamped(std::fma(-a, a, p));
}

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// GELU(x) = 0.5 x erfc(-x / sqrt(2)); erfc of a non-positive argument is 2 - erfc(|.|).
inline float gelu(float x) {
  const float z = -x * kSqrtHalf;
  const float e = erfc_nonneg(std::fabs(z));
  const float c = z >= 0.0f ? e : 2.0f - e;
  return 0.5f * x * c;
}

// d GELU / dx = Phi(x) + x phi(x).
inline float gelu_grad(float x) {
  const float z = -x * kSqrtHalf;
  const float a = std::fabs(z);
  const float e = erfc_nonneg(a);
  const float cdf = 0.5f * (z >= 0.0f ? e : 2.0f - e);
  const float pdf = a < 14.0f ? kInvSqrt2Pi * exp_clamped(-a * a) : 0.0f;
  return cdf + x * pdf;
}

bool all_float32(int count, const char **dtypes) {
  for (int i = 0; i < count; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

constexpr int64_t kElementGrain = 1 << 15;

struct RowStats {
  float mean, rstd;
};

inline RowStats row_stats(const float *__restrict x, int64_t cols, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) sum += x[j];
  const float mean = sum / static_cast<float>(cols);
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < cols; ++j) {
    const float d = x[j] - mean;
    sq += d * d;
  }
  const float var = sq / static_cast<float>(cols);
  return {mean, 1.0f / std::sqrt(var + eps)};
}

// Shape checks for the entry points: MindSpore passes every input's and output's shape; a kernel called with
// shapes that do not fit together would read or write out of bounds, so it refuses them (non-zero status) instead.
bool well_formed(int nparam, const int *ndims, int64_t **shapes) {
  for (int i = 0; i < nparam; ++i) {
    if (ndims[i] < 0 || ndims[i] > 16) return false;
    for (int a = 0; a < ndims[i]; ++a)
      if (shapes[i][a] < 0) return false;
  }
  return true;
}

bool same_shape(const int *ndims, int64_t **shapes, int a, int b) {
  if (ndims[a] != ndims[b]) return false;
  for (int i = 0; i < ndims[a]; ++i)
    if (shapes[a][i] != shapes[b][i]) return false;
  return true;
}

// Tensor `i` is a vector of `length` values.
bool is_vector(const int *ndims, int64_t **shapes, int i, int64_t length) {
  return ndims[i] == 1 && shapes[i][0] == length;
}

// Tensors a and b have the same rank and agree on every axis except the last `skip_last`.
bool same_leading(const int *ndims, int64_t **shapes, int a, int b, int skip_last) {
  if (ndims[a] != ndims[b] || ndims[a] < skip_last) return false;
  for (int i = 0; i < ndims[a] - skip_last; ++i)
    if (shapes[a][i] != shapes[b][i]) return false;
  return true;
}

int64_t last(const int *ndims, int64_t **shapes, int i) { return shapes[i][ndims[i] - 1]; }

// Exceptions (std::bad_alloc from a scratch buffer) must not cross the C interface.
template <class Kernel>
int guarded(const Kernel &kernel) {
  try {
    return kernel();
  } catch (...) {
    return 3;
  }
}

}  // namespace

extern "C" {

// inputs: x; output: y = GELU(x).
static int PvtGeluUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                            const char **dtypes, void *, void *) {
  if (nparam != 2 || !all_float32(2, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  float *__restrict y = static_cast<float *>(params[1]);
  parallel_for(element_count(ndims[0], shapes[0]), kElementGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) y[i] = gelu(x[i]);
  });
  return 0;
}

// inputs: x, dy; output: dx = dy * GELU'(x).
static int PvtGeluGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void *, void *) {
  if (nparam != 3 || !all_float32(3, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict dy = static_cast<const float *>(params[1]);
  float *__restrict dx = static_cast<float *>(params[2]);
  parallel_for(element_count(ndims[0], shapes[0]), kElementGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) dx[i] = dy[i] * gelu_grad(x[i]);
  });
  return 0;
}

// inputs: x (..., C), gamma (C), beta (C), eps (1); output: y. Normalises over the last axis.
static int PvtLayerNormUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
  if (nparam != 5 || !all_float32(5, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict gamma = static_cast<const float *>(params[1]);
  const float *__restrict beta = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *__restrict y = static_cast<float *>(params[4]);
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t rows = cols > 0 ? element_count(ndims[0], shapes[0]) / cols : 0;
  parallel_for(rows, 1 + kElementGrain / (cols > 0 ? cols : 1), [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      const float *__restrict xr = x + r * cols;
      float *__restrict yr = y + r * cols;
      const RowStats s = row_stats(xr, cols, eps);
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) yr[j] = (xr[j] - s.mean) * s.rstd * gamma[j] + beta[j];
    }
  });
  return 0;
}

// inputs: x, gamma, dy, eps; outputs: dx, dgamma, dbeta.
static int PvtLayerNormGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  if (nparam != 7 || !all_float32(7, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict gamma = static_cast<const float *>(params[1]);
  const float *__restrict dy = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *__restrict dx = static_cast<float *>(params[4]);
  float *__restrict dgamma = static_cast<float *>(params[5]);
  float *__restrict dbeta = static_cast<float *>(params[6]);
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t rows = cols > 0 ? element_count(ndims[0], shapes[0]) / cols : 0;
  const int slots = thread_count();
  // dgamma and dbeta sum over all rows (25088 at stage 1, batch 8): accumulate in double.
  std::vector<double> partial(static_cast<size_t>(slots) * 2 * cols, 0.0);
  parallel_for(rows, 1 + kElementGrain / (cols > 0 ? cols : 1), [&](int64_t b, int64_t e, int slot) {
    double *__restrict pg = partial.data() + static_cast<size_t>(slot) * 2 * cols;
    double *__restrict pb = pg + cols;
    for (int64_t r = b; r < e; ++r) {
      const float *__restrict xr = x + r * cols;
      const float *__restrict dyr = dy + r * cols;
      float *__restrict dxr = dx + r * cols;
      const RowStats s = row_stats(xr, cols, eps);
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t j = 0; j < cols; ++j) {
        const float xhat = (xr[j] - s.mean) * s.rstd;
        const float g = dyr[j] * gamma[j];
        sum_g += g;
        sum_gx += g * xhat;
        pg[j] += dyr[j] * xhat;
        pb[j] += dyr[j];
      }
      const float mean_g = sum_g / static_cast<float>(cols), mean_gx = sum_gx / static_cast<float>(cols);
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const float xhat = (xr[j] - s.mean) * s.rstd;
        dxr[j] = s.rstd * (dyr[j] * gamma[j] - mean_g - xhat * mean_gx);
      }
    }
  });
  for (int64_t j = 0; j < cols; ++j) {
    double g = 0.0, bsum = 0.0;
    for (int s = 0; s < slots; ++s) {
      g += partial[static_cast<size_t>(s) * 2 * cols + j];
      bsum += partial[static_cast<size_t>(s) * 2 * cols + cols + j];
    }
    dgamma[j] = static_cast<float>(g);
    dbeta[j] = static_cast<float>(bsum);
  }
  return 0;
}

#ifdef PVT_HAVE_DNNL
// Rows of a (rows x cols) matrix per thread so that each sgemm call still gets a well-shaped block.
constexpr int64_t kGemmRowGrain = 64;

// inputs: x (..., K), w (N, K), b (N); output: y (..., N) = x w^T + b, as nn.Dense (weight layout (out, in)).
static int PvtDenseUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  if (m == 0 || n == 0) return 0;
  std::atomic<int> status{0};
  if (m >= 2 * kGemmRowGrain || n < 2 * kGemmRowGrain) {
    parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) std::memcpy(y + r * n, b, sizeof(float) * n);
      if (dnnl_sgemm('N', 'T', r1 - r0, n, k, 1.0f, x + r0 * k, k, w, k, 1.0f, y + r0 * n, n) != 0) status = 2;
    });
  } else {  // few rows (a late stage at batch 1): split the output features instead
    for (int64_t r = 0; r < m; ++r) std::memcpy(y + r * n, b, sizeof(float) * n);
    parallel_for(n, kGemmRowGrain, [&](int64_t c0, int64_t c1, int) {
      if (dnnl_sgemm('N', 'T', m, c1 - c0, k, 1.0f, x, k, w + c0 * k, k, 1.0f, y + c0, n) != 0) status = 2;
    });
  }
  return status.load();
}

// inputs: x (..., K), w (N, K), dy (..., N); outputs: dx = dy w, dw = dy^T x, db = sum of dy over rows.
static int PvtDenseGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  float *db = static_cast<float *>(params[5]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  std::memset(dw, 0, sizeof(float) * n * k);
  if (m == 0 || n == 0) {
    std::memset(db, 0, sizeof(float) * n);
    if (m > 0) std::memset(dx, 0, sizeof(float) * m * k);
    return 0;
  }
  std::atomic<int> status{0};
  parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int) {
    if (dnnl_sgemm('N', 'N', r1 - r0, k, n, 1.0f, dy + r0 * n, n, w, k, 0.0f, dx + r0 * k, k) != 0) status = 2;
  });
  // dw rows are independent: each thread owns a band of output features and reads all rows of dy and x.
  parallel_for(n, 16, [&](int64_t c0, int64_t c1, int) {
    if (dnnl_sgemm('T', 'N', c1 - c0, k, m, 1.0f, dy + c0, n, x, k, 0.0f, dw + c0 * k, k) != 0) status = 2;
  });
  // db sums up to ~10^5 rows: accumulate in double, one partial row per thread.
  const int slots = thread_count();
  std::vector<double> partial(static_cast<size_t>(slots) * n, 0.0);
  parallel_for(m, 1 + kElementGrain / n, [&](int64_t r0, int64_t r1, int slot) {
    double *__restrict acc = partial.data() + static_cast<size_t>(slot) * n;
    for (int64_t r = r0; r < r1; ++r) {
      const float *__restrict row = dy + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
    }
  });
  for (int64_t j = 0; j < n; ++j) {
    double total = 0.0;
    for (int s = 0; s < slots; ++s) total += partial[static_cast<size_t>(s) * n + j];
    db[j] = static_cast<float>(total);
  }
  return status.load();
}

// Row-wise softmax of a (rows x m) block in place.
inline void softmax_rows(float *s, int64_t rows, int64_t m) {
  for (int64_t r = 0; r < rows; ++r) {
    float *__restrict row = s + r * m;
    float top = row[0];
    for (int64_t j = 1; j < m; ++j) top = row[j] > top ? row[j] : top;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < m; ++j) {
      row[j] = exp_clamped(row[j] - top);
      total += row[j];
    }
    const float inverse = 1.0f / total;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) row[j] *= inverse;
  }
}

// Rows per sgemm inside a thread's share of the fused GELU + Linear kernels: the GELU'd block (rows x K) stays in
// a per-thread buffer of at most 256 x K floats.
constexpr int64_t kGeluDenseRows = 256;

// inputs: h (..., K), w (N, K), b (N); output: y (..., N) = GELU(h) w^T + b. GELU(h) is made per block of rows in a
// per-thread buffer and never stored: the MLP keeps only fc1's output h, from which the backward recomputes it.
static int PvtGeluDenseUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes)) return 1;
  const float *h = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  if (m == 0 || n == 0) return 0;
  std::atomic<int> status{0};
  parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int) {
    std::vector<float> act(static_cast<size_t>((r1 - r0 < kGeluDenseRows ? r1 - r0 : kGeluDenseRows) * k));
    for (int64_t s0 = r0; s0 < r1; s0 += kGeluDenseRows) {
      const int64_t rows = r1 - s0 < kGeluDenseRows ? r1 - s0 : kGeluDenseRows;
      const float *__restrict hs = h + s0 * k;
      float *__restrict a = act.data();
#pragma omp simd
      for (int64_t i = 0; i < rows * k; ++i) a[i] = gelu(hs[i]);
      for (int64_t r = s0; r < s0 + rows; ++r) std::memcpy(y + r * n, b, sizeof(float) * n);
      if (dnnl_sgemm('N', 'T', rows, n, k, 1.0f, a, k, w, k, 1.0f, y + s0 * n, n) != 0) status = 2;
    }
  });
  return status.load();
}

// inputs: h (..., K), w (N, K), dy (..., N); outputs: dh = (dy w) * GELU'(h), dw = dy^T GELU(h), db = sum of dy.
// Per block of rows: GELU(h) recomputed into a per-thread buffer, dh written in place of (dy w); dw summed per
// thread (N x K partials, added in slot order), db in double.
static int PvtGeluDenseGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  const float *h = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dh = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  float *db = static_cast<float *>(params[5]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  std::memset(dw, 0, sizeof(float) * n * k);
  std::memset(db, 0, sizeof(float) * n);
  if (m == 0) return 0;
  if (n == 0) {
    std::memset(dh, 0, sizeof(float) * m * k);
    return 0;
  }
  const int slots = thread_count();
  std::vector<float> dw_partial(static_cast<size_t>(slots) * n * k, 0.0f);
  std::vector<double> db_partial(static_cast<size_t>(slots) * n, 0.0);
  std::atomic<int> status{0};
  parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int slot) {
    std::vector<float> act(static_cast<size_t>((r1 - r0 < kGeluDenseRows ? r1 - r0 : kGeluDenseRows) * k));
    float *pw = dw_partial.data() + static_cast<size_t>(slot) * n * k;
    double *__restrict pb = db_partial.data() + static_cast<size_t>(slot) * n;
    for (int64_t s0 = r0; s0 < r1; s0 += kGeluDenseRows) {
      const int64_t rows = r1 - s0 < kGeluDenseRows ? r1 - s0 : kGeluDenseRows;
      const float *__restrict hs = h + s0 * k;
      float *__restrict a = act.data();
      float *__restrict dhs = dh + s0 * k;
      if (dnnl_sgemm('N', 'N', rows, k, n, 1.0f, dy + s0 * n, n, w, k, 0.0f, dhs, k) != 0) status = 2;
#pragma omp simd
      for (int64_t i = 0; i < rows * k; ++i) {
        a[i] = gelu(hs[i]);
        dhs[i] *= gelu_grad(hs[i]);
      }
      if (dnnl_sgemm('T', 'N', n, k, rows, 1.0f, dy + s0 * n, n, a, k, 1.0f, pw, k) != 0) status = 2;
      for (int64_t r = s0; r < s0 + rows; ++r) {
        const float *__restrict row = dy + r * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) pb[j] += row[j];
      }
    }
  });
  for (int s = 0; s < slots; ++s) {
    const float *__restrict pw = dw_partial.data() + static_cast<size_t>(s) * n * k;
#pragma omp simd
    for (int64_t i = 0; i < n * k; ++i) dw[i] += pw[i];
  }
  for (int64_t j = 0; j < n; ++j) {
    double total = 0.0;
    for (int s = 0; s < slots; ++s) total += db_partial[static_cast<size_t>(s) * n + j];
    db[j] = static_cast<float>(total);
  }
  return status.load();
}

// Multi-head attention on token layouts, as the q and kv Linear layers produce them, so that no head transpose,
// key/value split or scaling pass is needed around it:
//   q (B, N, C) with C = heads * D (head h in columns [h D, (h + 1) D)),
//   kv (B, M, 2 C) (keys in columns [0, C), values in [C, 2 C), heads as in q),
//   meta (2) = [heads, scale];  out (B, N, C) = per head softmax(scale q k^T) v, heads side by side.
struct HeadLayout {
  int64_t batch, n, m, c, heads, d;
  float scale;
  int64_t groups() const { return batch * heads; }
  // Offsets of group g = (b, h): its queries / outputs (leading dimension c), keys and values (leading 2 c).
  int64_t q_at(int64_t g, int64_t row) const { return ((g / heads) * n + row) * c + (g % heads) * d; }
  int64_t k_at(int64_t g) const { return (g / heads) * m * 2 * c + (g % heads) * d; }
  int64_t v_at(int64_t g) const { return k_at(g) + c; }
};

// The layout of q, kv and meta, or false when they do not fit together (meta is read here: its values, not its
// shape, give the head count).
bool head_layout(int *ndims, int64_t **shapes, const float *meta, HeadLayout *out) {
  const float heads = meta[0], scale = meta[1];
  const int64_t c = shapes[0][2];
  if (!(heads >= 1.0f && heads <= static_cast<float>(c > 0 ? c : 1)) || heads != std::floor(heads) ||
      !std::isfinite(scale))
    return false;
  const int64_t h = static_cast<int64_t>(heads);
  if (c % h != 0) return false;
  *out = {shapes[0][0], shapes[0][1], shapes[1][1], c, h, c / h, scale};
  return true;
}

// Blocks of 64 query rows: scores (64 x M) in a per-thread buffer, softmax in place, then times v, so the
// N x M score matrix is never stored (at 800x1344 it would be 67200 x 1050 per stage-1 block).
constexpr int64_t kAttentionRows = 64;

// out = per head softmax(scale q k^T [+ bias]) v (see HeadLayout); bias (B, M) or null. bias[b, j] is added to every
// score of key j in batch element b before the softmax: -1e30 leaves key j out exactly, which is how padded positions
// of a size bucket are kept out of the attention (inference only, so PvtAttentionGrad has no bias).
static int attention_forward(int *ndims, int64_t **shapes, const float *q, const float *kv, const float *meta,
                             const float *bias, float *out) {
  HeadLayout L;
  if (!head_layout(ndims, shapes, meta, &L)) return 1;
  if (L.n == 0 || L.c == 0 || L.batch == 0) return 0;
  if (L.m == 0) {
    std::memset(out, 0, sizeof(float) * L.batch * L.n * L.c);
    return 0;
  }
  const int64_t blocks = (L.n + kAttentionRows - 1) / kAttentionRows, m = L.m, d = L.d, c = L.c;
  std::atomic<int> status{0};
  parallel_for(L.groups() * blocks, 1, [&](int64_t t0, int64_t t1, int) {
    std::vector<float> scores(static_cast<size_t>(kAttentionRows * m));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / blocks, r0 = (t % blocks) * kAttentionRows;
      const int64_t rows = L.n - r0 < kAttentionRows ? L.n - r0 : kAttentionRows;
      float *s = scores.data();
      if (dnnl_sgemm('N', 'T', rows, m, d, L.scale, q + L.q_at(g, r0), c, kv + L.k_at(g), 2 * c, 0.0f, s, m) != 0)
        status = 2;
      if (bias != nullptr) {
        const float *__restrict b = bias + (g / L.heads) * m;
        for (int64_t r = 0; r < rows; ++r) {
          float *__restrict sr = s + r * m;
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) sr[j] += b[j];
        }
      }
      softmax_rows(s, rows, m);
      if (dnnl_sgemm('N', 'N', rows, d, m, 1.0f, s, m, kv + L.v_at(g), 2 * c, 0.0f, out + L.q_at(g, r0), c) != 0)
        status = 2;
    }
  });
  return status.load();
}

// inputs: q, kv, meta; output: out.
static int PvtAttentionUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes)) return 1;
  return attention_forward(ndims, shapes, static_cast<const float *>(params[0]),
                           static_cast<const float *>(params[1]), static_cast<const float *>(params[2]), nullptr,
                           static_cast<float *>(params[3]));
}

// inputs: q, kv, meta, bias (B, M); output: out.
static int PvtAttentionBiasUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  if (nparam != 5 || !all_float32(5, dtypes)) return 1;
  return attention_forward(ndims, shapes, static_cast<const float *>(params[0]),
                           static_cast<const float *>(params[1]), static_cast<const float *>(params[2]),
                           static_cast<const float *>(params[3]), static_cast<float *>(params[4]));
}


// Convolution, inference only (the training path keeps MindSpore's Im2Col + BatchMatMul, which have gradients):
//   x (B, C, H, W), w (O, C, k, k), b (O), meta (3) = [stride, pad, relu] -> y (B, O, OH, OW),
//   OH = (H + 2 pad - k) / stride + 1 (floor), zero padding on every side, as PyTorch's and nn.Conv2d(pad_mode="pad").
// Each block of output rows is unfolded (im2col) into a per-thread buffer of C k k rows and multiplied by the
// weight (O x C k k) with one sgemm that writes the block's rows of every output channel in place (NCHW: a block of
// rows of one channel is contiguous). The whole-tensor columns that Im2Col + BatchMatMul build (k*k times the
// input, ~70 MB for 256 channels at 100x168) never exist: each block's columns stay in cache for its product.
struct ConvLayout {
  int64_t batch, c, h, w, o, k, stride, pad, oh, ow;
  bool relu;
  int64_t taps() const { return c * k * k; }
};

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

bool conv_layout(int *ndims, int64_t **shapes, const float *meta, ConvLayout *L) {
  const float stride = meta[0], pad = meta[1], relu = meta[2];
  if (!(stride >= 1.0f && stride <= 64.0f) || stride != std::floor(stride) || !(pad >= 0.0f && pad <= 64.0f) ||
      pad != std::floor(pad) || !(relu == 0.0f || relu == 1.0f))
    return false;
  const int64_t s = static_cast<int64_t>(stride), p = static_cast<int64_t>(pad), k = shapes[1][2];
  const int64_t h = shapes[0][2], w = shapes[0][3];
  if (h + 2 * p < k || w + 2 * p < k) return false;
  const int64_t oh = (h + 2 * p - k) / s + 1, ow = (w + 2 * p - k) / s + 1;
  if (shapes[4][2] != oh || shapes[4][3] != ow) return false;
  *L = {shapes[0][0], shapes[0][1], h, w, shapes[1][0], k, s, p, oh, ow, relu == 1.0f};
  return true;
}

// The columns of output rows [r0, r1) of one image x (C, H, W): col (C k k, (r1 - r0) OW), row (c, ky, kx) holding
// x[c, r s - pad + ky, ow s - pad + kx] (0 outside the image) for each output pixel (r, ow) of the block.
void conv_columns(const ConvLayout &L, const float *__restrict x, int64_t r0, int64_t r1, float *__restrict col) {
  const int64_t n = (r1 - r0) * L.ow, k = L.k, s = L.stride, p = L.pad, ow = L.ow;
  for (int64_t c = 0; c < L.c; ++c) {
    const float *plane = x + c * L.h * L.w;
    for (int64_t ky = 0; ky < k; ++ky) {
      for (int64_t kx = 0; kx < k; ++kx) {
        float *dst = col + ((c * k + ky) * k + kx) * n;
        // output columns whose input column ix = j s - p + kx lies inside [0, W)
        const int64_t lo = std::min<int64_t>(ow, std::max<int64_t>(0, floor_div(p - kx + s - 1, s)));
        const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(ow, floor_div(L.w - 1 + p - kx, s) + 1));
        for (int64_t r = r0; r < r1; ++r) {
          float *__restrict d = dst + (r - r0) * ow;
          const int64_t iy = r * s - p + ky;
          if (iy < 0 || iy >= L.h) {
            std::memset(d, 0, sizeof(float) * ow);
            continue;
          }
          const float *__restrict src = plane + iy * L.w - p + kx;
          std::memset(d, 0, sizeof(float) * lo);
          if (s == 1) {
            std::memcpy(d + lo, src + lo, sizeof(float) * (hi - lo));
          } else {
            for (int64_t j = lo; j < hi; ++j) d[j] = src[j * s];
          }
          std::memset(d + hi, 0, sizeof(float) * (ow - hi));
        }
      }
    }
  }
}

// Output pixels per im2col block: enough columns for an efficient sgemm, few enough that the block's columns
// (C k k x 768 floats: 7 MB at 256 channels) stay near the cache. Measured on one thread (Xeon, AVX-512), in
// GFLOP/s for 256 channels at 100x168 / 128 at 128x176 / 256 at 25x42: 384 columns 129 / 118 / 125, 768 141 /
// 127 / 115, 1536 118 / 113 / 108 (PyTorch 139-167).
constexpr int64_t kConvColumns = 768;

// y rows [r0, r1) of every channel of one image: bias, then += w col, then ReLU if asked.
int conv_block(const ConvLayout &L, const float *w, const float *b, const float *col, int64_t r0, int64_t r1,
               int64_t o0, int64_t o1, float *y) {
  const int64_t plane = L.oh * L.ow, n = (r1 - r0) * L.ow;
  for (int64_t o = o0; o < o1; ++o) std::fill_n(y + o * plane + r0 * L.ow, n, b[o]);
  if (dnnl_sgemm('N', 'N', o1 - o0, n, L.taps(), 1.0f, w + o0 * L.taps(), L.taps(), col, n, 1.0f,
                 y + o0 * plane + r0 * L.ow, plane) != 0)
    return 2;
  if (L.relu) {
    for (int64_t o = o0; o < o1; ++o) {
      float *__restrict v = y + o * plane + r0 * L.ow;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) v[j] = v[j] > 0.0f ? v[j] : 0.0f;
    }
  }
  return 0;
}

// inputs: x, w, b, meta; output: y.
static int PvtConv2dUnchecked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  if (nparam != 5 || !all_float32(5, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[4]);
  ConvLayout L;
  if (!conv_layout(ndims, shapes, static_cast<const float *>(params[3]), &L)) return 1;
  if (L.batch == 0 || L.o == 0 || L.oh == 0 || L.ow == 0) return 0;
  const int64_t in_size = L.c * L.h * L.w, out_size = L.o * L.oh * L.ow;
  if (L.taps() == 0) {  // no input channels: the bias alone
    for (int64_t i = 0; i < L.batch * L.o; ++i) std::fill_n(y + i * L.oh * L.ow, L.oh * L.ow, b[i % L.o]);
    return 0;
  }
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(L.oh, kConvColumns / L.ow));
  const int64_t blocks = (L.oh + rows - 1) / rows;
  std::atomic<int> status{0};
  if (L.batch * blocks >= 2 * thread_count() || L.o < 2 * kGemmRowGrain) {
    // many blocks: each thread unfolds and multiplies its own blocks
    parallel_for(L.batch * blocks, 1, [&](int64_t t0, int64_t t1, int) {
      std::vector<float> col(static_cast<size_t>(L.taps() * rows * L.ow));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t image = t / blocks, r0 = (t % blocks) * rows, r1 = std::min(L.oh, r0 + rows);
        conv_columns(L, x + image * in_size, r0, r1, col.data());
        if (conv_block(L, w, b, col.data(), r0, r1, 0, L.o, y + image * out_size) != 0) status = 2;
      }
    });
  } else {
    // a small map (few blocks): unfold it once, split the output channels over the threads
    std::vector<float> col(static_cast<size_t>(L.taps() * L.oh * L.ow));
    for (int64_t image = 0; image < L.batch; ++image) {
      conv_columns(L, x + image * in_size, 0, L.oh, col.data());
      parallel_for(L.o, kGemmRowGrain, [&](int64_t o0, int64_t o1, int) {
        if (conv_block(L, w, b, col.data(), 0, L.oh, o0, o1, y + image * out_size) != 0) status = 2;
      });
    }
  }
  return status.load();
}

// The backward of group g's query rows [r0, r0 + rows): recomputes p = softmax(scale q k^T) for those rows (as the
// forward did), writes their dq and adds their share of dk and dv into dk_acc and dv_acc (m x d, leading
// dimension ld). ds = p * (dp - rowsum(dp * p)) with dp = dout v^T. `scratch` holds 2 * rows * m floats.
int attention_grad_rows(const HeadLayout &L, const float *q, const float *kv, const float *dout, float *dq,
                        int64_t g, int64_t r0, int64_t rows, float *dk_acc, float *dv_acc, int64_t ld,
                        float *scratch) {
  const int64_t m = L.m, d = L.d, c = L.c;
  const float *qg = q + L.q_at(g, r0), *k = kv + L.k_at(g), *v = kv + L.v_at(g), *dog = dout + L.q_at(g, r0);
  int status = 0;
  float *p = scratch, *ds = scratch + rows * m;
  if (dnnl_sgemm('N', 'T', rows, m, d, L.scale, qg, c, k, 2 * c, 0.0f, p, m) != 0) status = 2;
  softmax_rows(p, rows, m);
  if (dnnl_sgemm('N', 'T', rows, m, d, 1.0f, dog, c, v, 2 * c, 0.0f, ds, m) != 0) status = 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float *__restrict pr = p + r * m;
    float *__restrict dr = ds + r * m;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < m; ++j) dot += dr[j] * pr[j];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) dr[j] = pr[j] * (dr[j] - dot);
  }
  if (dnnl_sgemm('N', 'N', rows, d, m, L.scale, ds, m, k, 2 * c, 0.0f, dq + L.q_at(g, r0), c) != 0) status = 2;
  if (dnnl_sgemm('T', 'N', m, d, rows, L.scale, ds, m, qg, c, 1.0f, dk_acc, ld) != 0) status = 2;
  if (dnnl_sgemm('T', 'N', m, d, rows, 1.0f, p, m, dog, c, 1.0f, dv_acc, ld) != 0) status = 2;
  return status;
}

// inputs: q, kv, meta, dout like q; outputs: dq like q, dkv like kv. The probabilities are recomputed per (group,
// block of 64 query rows) in a per-thread buffer, so no N x M matrix of the whole tensor is ever stored. dk and dv
// sum over every query row of their group: with at least as many groups as threads each thread owns whole groups;
// otherwise (batch 1, one head) each thread sums its rows into its own (M x D) partials, added up in slot order.
static int PvtAttentionGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *kv = static_cast<const float *>(params[1]);
  const float *dout = static_cast<const float *>(params[3]);
  float *dq = static_cast<float *>(params[4]);
  float *dkv = static_cast<float *>(params[5]);
  HeadLayout L;
  if (!head_layout(ndims, shapes, static_cast<const float *>(params[2]), &L)) return 1;
  std::memset(dkv, 0, sizeof(float) * L.batch * L.m * 2 * L.c);
  if (L.n == 0 || L.c == 0 || L.batch == 0) return 0;
  if (L.m == 0) {
    std::memset(dq, 0, sizeof(float) * L.batch * L.n * L.c);
    return 0;
  }
  const int64_t blocks = (L.n + kAttentionRows - 1) / kAttentionRows, m = L.m, d = L.d, c = L.c;
  const int64_t groups = L.groups();
  std::atomic<int> status{0};
  const int threads = thread_count();
  if (groups >= threads || blocks == 1) {
    // Heads of one sample write disjoint columns of the same dkv rows: no two threads write one element.
    parallel_for(groups, 1, [&](int64_t g0, int64_t g1, int) {
      std::vector<float> scratch(static_cast<size_t>(2 * kAttentionRows * m));
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t r0 = 0; r0 < L.n; r0 += kAttentionRows) {
          const int64_t rows = L.n - r0 < kAttentionRows ? L.n - r0 : kAttentionRows;
          if (attention_grad_rows(L, q, kv, dout, dq, g, r0, rows, dkv + L.k_at(g), dkv + L.v_at(g), 2 * c,
                                  scratch.data()) != 0)
            status = 2;
        }
    });
    return status.load();
  }
  const int64_t part = m * d;
  std::vector<float> partial(static_cast<size_t>(threads) * 2 * part);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    parallel_for(blocks, 1, [&](int64_t b0, int64_t b1, int slot) {
      std::vector<float> scratch(static_cast<size_t>(2 * kAttentionRows * m));
      float *pk = partial.data() + static_cast<size_t>(slot) * 2 * part, *pv = pk + part;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kAttentionRows, rows = L.n - r0 < kAttentionRows ? L.n - r0 : kAttentionRows;
        if (attention_grad_rows(L, q, kv, dout, dq, g, r0, rows, pk, pv, d, scratch.data()) != 0) status = 2;
      }
    });
    for (int s = 0; s < threads; ++s) {
      const float *pk = partial.data() + static_cast<size_t>(s) * 2 * part, *pv = pk + part;
      for (int64_t j = 0; j < m; ++j) {
        float *__restrict gk = dkv + L.k_at(g) + j * 2 * c, *__restrict gv = dkv + L.v_at(g) + j * 2 * c;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          gk[i] += pk[j * d + i];
          gv[i] += pv[j * d + i];
        }
      }
    }
  }
  return status.load();
}
#endif  // PVT_HAVE_DNNL

// The entry points MindSpore calls (ops.Custom "library:Name", func_type="aot"): status 0 on success, 1 for
// tensors this kernel does not take (count, dtype or shapes), 2 for a failed sgemm, 3 for an exception.
#define PVT_ENTRY(name, count, shapes_fit)                                                                       \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *extra,           \
           void *stream) {                                                                                      \
    if (nparam != (count) || params == nullptr || ndims == nullptr || shapes == nullptr || dtypes == nullptr ||   \
        !all_float32(count, dtypes) || !well_formed(count, ndims, shapes) || !(shapes_fit))                     \
      return 1;                                                                                                 \
    return guarded([&] { return name##Unchecked(nparam, params, ndims, shapes, dtypes, extra, stream); });       \
  }

// y = GELU(x); dx = dy * GELU'(x)
PVT_ENTRY(PvtGelu, 2, same_shape(ndims, shapes, 0, 1))
PVT_ENTRY(PvtGeluGrad, 3, same_shape(ndims, shapes, 0, 1) && same_shape(ndims, shapes, 0, 2))
// x (..., C), gamma (C), beta (C), eps (1) -> y like x
PVT_ENTRY(PvtLayerNorm, 5,
          ndims[0] >= 1 && is_vector(ndims, shapes, 1, last(ndims, shapes, 0)) &&
              is_vector(ndims, shapes, 2, last(ndims, shapes, 0)) &&
              element_count(ndims[3], shapes[3]) == 1 && same_shape(ndims, shapes, 0, 4))
// x, gamma, dy, eps -> dx like x, dgamma (C), dbeta (C)
PVT_ENTRY(PvtLayerNormGrad, 7,
          ndims[0] >= 1 && is_vector(ndims, shapes, 1, last(ndims, shapes, 0)) &&
              same_shape(ndims, shapes, 0, 2) && element_count(ndims[3], shapes[3]) == 1 &&
              same_shape(ndims, shapes, 0, 4) && is_vector(ndims, shapes, 5, last(ndims, shapes, 0)) &&
              is_vector(ndims, shapes, 6, last(ndims, shapes, 0)))

#ifdef PVT_HAVE_DNNL
// x (..., K), w (N, K), b (N) -> y (..., N)
PVT_ENTRY(PvtDense, 4,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              is_vector(ndims, shapes, 2, shapes[1][0]) && same_leading(ndims, shapes, 0, 3, 1) &&
              last(ndims, shapes, 3) == shapes[1][0])
// x (..., K), w (N, K), dy (..., N) -> dx like x, dw like w, db (N)
PVT_ENTRY(PvtDenseGrad, 6,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              same_leading(ndims, shapes, 0, 2, 1) && last(ndims, shapes, 2) == shapes[1][0] &&
              same_shape(ndims, shapes, 0, 3) && same_shape(ndims, shapes, 1, 4) &&
              is_vector(ndims, shapes, 5, shapes[1][0]))
// h (..., K), w (N, K), b (N) -> y (..., N) = GELU(h) w^T + b
PVT_ENTRY(PvtGeluDense, 4,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              is_vector(ndims, shapes, 2, shapes[1][0]) && same_leading(ndims, shapes, 0, 3, 1) &&
              last(ndims, shapes, 3) == shapes[1][0])
// h (..., K), w (N, K), dy (..., N) -> dh like h, dw like w, db (N)
PVT_ENTRY(PvtGeluDenseGrad, 6,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              same_leading(ndims, shapes, 0, 2, 1) && last(ndims, shapes, 2) == shapes[1][0] &&
              same_shape(ndims, shapes, 0, 3) && same_shape(ndims, shapes, 1, 4) &&
              is_vector(ndims, shapes, 5, shapes[1][0]))
// q (B, N, C), kv (B, M, 2C), meta [heads, scale] -> out like q
PVT_ENTRY(PvtAttention, 4,
          ndims[0] == 3 && ndims[1] == 3 && shapes[1][0] == shapes[0][0] && shapes[1][2] == 2 * shapes[0][2] &&
              element_count(ndims[2], shapes[2]) == 2 && same_shape(ndims, shapes, 0, 3))
// q, kv, meta, bias (B, M) -> out like q
PVT_ENTRY(PvtAttentionBias, 5,
          ndims[0] == 3 && ndims[1] == 3 && shapes[1][0] == shapes[0][0] && shapes[1][2] == 2 * shapes[0][2] &&
              element_count(ndims[2], shapes[2]) == 2 && ndims[3] == 2 && shapes[3][0] == shapes[0][0] &&
              shapes[3][1] == shapes[1][1] && same_shape(ndims, shapes, 0, 4))
// x (B, C, H, W), w (O, C, k, k), b (O), meta [stride, pad, relu] -> y (B, O, OH, OW) (OH, OW checked in the kernel).
// One entry per stride, each taking only its own stride and "same" padding (k odd, pad k / 2: OH = ceil(H / stride)):
// MindSpore's PyNative mode keeps one output-shape function per kernel name, so one name must mean one shape rule.
#define PVT_CONV_ENTRY(name, stride)                                                                              \
  static int name##Unchecked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,       \
                             void *extra, void *stream) {                                                         \
    const float *meta = static_cast<const float *>(params[3]);                                                   \
    if (meta[0] != (stride) || meta[1] != static_cast<float>(shapes[1][2] / 2) || shapes[1][2] % 2 != 1)        \
      return 1;                                                                                                   \
    return PvtConv2dUnchecked(nparam, params, ndims, shapes, dtypes, extra, stream);                             \
  }                                                                                                               \
  PVT_ENTRY(name, 5,                                                                                              \
            ndims[0] == 4 && ndims[1] == 4 && shapes[1][1] == shapes[0][1] && shapes[1][2] == shapes[1][3] &&     \
                is_vector(ndims, shapes, 2, shapes[1][0]) && element_count(ndims[3], shapes[3]) == 3 &&           \
                ndims[4] == 4 && shapes[4][0] == shapes[0][0] && shapes[4][1] == shapes[1][0])
PVT_CONV_ENTRY(PvtConv2dStride1, 1)
PVT_CONV_ENTRY(PvtConv2dStride2, 2)
PVT_CONV_ENTRY(PvtConv2dStride4, 4)
// q, kv, meta, dout like q -> dq like q, dkv like kv
PVT_ENTRY(PvtAttentionGrad, 6,
          ndims[0] == 3 && ndims[1] == 3 && shapes[1][0] == shapes[0][0] && shapes[1][2] == 2 * shapes[0][2] &&
              element_count(ndims[2], shapes[2]) == 2 && same_shape(ndims, shapes, 0, 3) &&
              same_shape(ndims, shapes, 0, 4) && same_shape(ndims, shapes, 1, 5))
#endif  // PVT_HAVE_DNNL

// Host-side (called through ctypes, not a MindSpore op): out[i] = the index of the largest of x[c * n + i] over
// c in [0, k), the first one on ties and the first NaN if any, as numpy's argmax(axis=0) on (k, n) float32.
// Segmentation takes it over 150 class maps of a whole photo: numpy walks the pixels with a stride of n floats per
// channel; here each thread keeps a block of pixels' running maxima and reads every channel's block contiguously.
int PvtArgmaxChannels(const float *x, int64_t k, int64_t n, int32_t *out) {
  if (x == nullptr || out == nullptr || k < 1 || n < 0) return 1;
  return guarded([&] {
    constexpr int64_t kBlock = 2048;
    parallel_for((n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1, int) {
      float best[kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlock, count = std::min(kBlock, n - i0);
        int32_t *__restrict index = out + i0;
        std::memcpy(best, x + i0, sizeof(float) * count);
        std::fill_n(index, count, 0);
        for (int64_t c = 1; c < k; ++c) {
          const float *__restrict row = x + c * n + i0;
          for (int64_t i = 0; i < count; ++i) {
            // take v when it is larger, or NaN while the best so far is not (best != best: NaN)
            const float v = row[i];
            const bool take = (v > best[i] || (v != v)) && (best[i] == best[i]);
            best[i] = take ? v : best[i];
            index[i] = take ? static_cast<int32_t>(c) : index[i];
          }
        }
      }
    });
    return 0;
  });
}

// Threads the kernels use from now on (> 0), or 0 for the CPUs this process may use. Returns the count in effect.
int PvtSetThreadCount(int count) {
  requested_threads.store(count > 0 ? count : 0);
  return thread_count();
}

int PvtThreadCount() { return thread_count(); }

}  // extern "C"
