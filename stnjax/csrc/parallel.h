// ParallelFor for stnjax's CPU kernels: a loop's chunks shared between the
// calling thread and helper threads that stay awake briefly between calls.
//
// Why helpers of our own rather than XLA's intra-op pool: a kernel call takes
// 0.1 ms to a few ms, and waking a sleeping pool thread can take tens of
// microseconds (on virtual machines whose idle CPUs halt at once, about
// 60 us), a large part of such a call. OpenMP runtimes, and so PyTorch, keep
// their threads spinning after a parallel loop for the same reason. Our
// helpers spin for kSpinMicros after their last chunk, yielding the CPU to
// any other runnable thread as they do, then sleep until the next call.
// A spinning helper that finds itself on the caller's CPU would halve the
// caller's speed until the scheduler moved one of them (milliseconds), so it
// moves itself to another CPU the process may use.

#ifndef STNJAX_CSRC_PARALLEL_H_
#define STNJAX_CSRC_PARALLEL_H_

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

namespace stnjax {

// How long an idle helper spins before it sleeps: longer than the gap between
// back-to-back kernel calls (tens of microseconds), and short, because a CPU
// with a spinning helper does not count as idle where XLA's own pool threads
// wake: spinning longer slowed the gradients, where XLA's loops follow the
// kernels (docs/performance.md, "C++ kernels on CPU").
constexpr int64_t kSpinMicros = 100;

// One parallel loop: fn(begin, end) over [0, total) in chunks of `chunk`.
struct ParallelJob {
  std::function<void(int64_t, int64_t)> fn;
  int64_t total = 0, chunk = 1, chunks = 0;
  int caller_cpu = -1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Runs chunks until none is left; fn is only called for a claimed chunk,
  // so a helper that arrives after the caller has returned calls nothing.
  void Work() {
    int64_t k;
    while ((k = next.fetch_add(1, std::memory_order_relaxed)) < chunks) {
      fn(k * chunk, std::min(total, (k + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helper threads that work on the latest posted job. Several callers at once
// are fine: each caller works through its own job's chunks as well and
// returns when they are all done, so helpers only ever speed a job up and a
// caller never waits for a helper to start.
class Helpers {
 public:
  // The process's helpers: one per CPU this process may use, less the caller.
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // Never deleted: its threads run until exit.
    return *helpers;
  }

  // Whether there is any helper in this process (none after a fork: the
  // threads were not copied).
  bool active() const { return size_ > 0 && getpid() == pid_; }

  void Post(std::shared_ptr<ParallelJob> job) {
    {
      std::lock_guard<std::mutex> lock(job_mutex_);
      job_ = std::move(job);
    }
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
  }

 private:
  Helpers() : pid_(getpid()) {
    CPU_ZERO(&allowed_);
    if (sched_getaffinity(0, sizeof(allowed_), &allowed_) == 0) {
      size_ = std::max(0, CPU_COUNT(&allowed_) - 1);
    }
    for (int i = 0; i < size_; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      seen = WaitForNew(seen);
      std::shared_ptr<ParallelJob> job;
      {
        std::lock_guard<std::mutex> lock(job_mutex_);
        job = job_;
      }
      if (!job) continue;
      if (job->caller_cpu >= 0 && sched_getcpu() == job->caller_cpu) {
        MoveAwayFrom(job->caller_cpu);
      }
      job->Work();
    }
  }

  // Moves this thread to another allowed CPU than `cpu`, then allows it all
  // of them again (which does not move it back).
  void MoveAwayFrom(int cpu) {
    cpu_set_t others = allowed_;
    if (cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &others)) return;
    CPU_CLR(cpu, &others);
    if (CPU_COUNT(&others) == 0) return;
    sched_setaffinity(0, sizeof(others), &others);
    sched_setaffinity(0, sizeof(allowed_), &allowed_);
  }

  // Spins (yielding) for up to kSpinMicros, then sleeps, until a job is
  // posted after generation `seen`; returns the new generation.
  uint64_t WaitForNew(uint64_t seen) {
    using Clock = std::chrono::steady_clock;
    const auto deadline = Clock::now() + std::chrono::microseconds(kSpinMicros);
    for (int i = 1;; ++i) {
      const uint64_t now = generation_.load(std::memory_order_acquire);
      if (now != seen) return now;
      if (i % 64 == 0) {
        if (Clock::now() > deadline) break;
        sched_yield();
      } else {
        __builtin_ia32_pause();
      }
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t now;
    while ((now = generation_.load(std::memory_order_seq_cst)) == seen) wake_.wait(lock);
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    return now;
  }

  const pid_t pid_;
  cpu_set_t allowed_;
  int size_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::mutex job_mutex_;
  std::shared_ptr<ParallelJob> job_;
  // A Post that sees no sleeper skips the notify; the seq_cst order of
  // generation_ and sleepers_ makes sure a helper about to sleep sees the job.
  std::atomic<int64_t> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

// Runs fn(begin, end) over [0, total) in chunks of `chunk`, claimed in turn by
// the calling thread and the helpers; returns when all are done.
template <typename Fn>
void ParallelFor(int64_t total, int64_t chunk, Fn fn) {
  const int64_t chunks = (total + chunk - 1) / chunk;
  Helpers& helpers = Helpers::Get();
  if (chunks <= 1 || !helpers.active()) {
    fn(int64_t{0}, total);
    return;
  }
  auto job = std::make_shared<ParallelJob>();
  job->fn = std::move(fn);
  job->total = total;
  job->chunk = chunk;
  job->chunks = chunks;
  job->caller_cpu = sched_getcpu();
  helpers.Post(job);
  job->Work();
  while (job->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace stnjax

#endif  // STNJAX_CSRC_PARALLEL_H_
