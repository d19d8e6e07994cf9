// The kernels' thread pool: one per process, shared by every kernel source (common.h declares its interface), and
// the control entry points PvtSetThreadCount / PvtThreadCount.
#include "common.h"

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

}  // namespace

namespace pvt {

int thread_count() {
  const int requested = requested_threads.load();
  if (requested > 0) return requested;
  static const int fallback = affinity_count();
  return fallback;
}

void run_chunks(int threads, int64_t chunks, const std::function<void(int64_t)> &chunk) {
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

}  // namespace pvt

extern "C" {

// Threads the kernels use from now on (> 0), or 0 for the CPUs this process may use. Returns the count in effect.
int PvtSetThreadCount(int count) {
  requested_threads.store(count > 0 ? count : 0);
  return thread_count();
}

int PvtThreadCount() { return thread_count(); }

}  // extern "C"
