#pragma once

#include "fence.h"

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

namespace gcoffload {

// One host thread that runs jobs in the order they were submitted, so that
// work which blocks (a copy to or from pageable memory) never blocks the
// thread that submits it. The thread starts with the first job.
//
// Each job comes with the fence it signals. A job still queued when the
// worker is destroyed does not run; its fence is signalled with an error.
class HostWorker {
 public:
  HostWorker() = default;
  HostWorker(const HostWorker&) = delete;
  HostWorker& operator=(const HostWorker&) = delete;

  ~HostWorker() {
    std::deque<Job> unrun;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      unrun.swap(jobs_);
    }
    wake_.notify_all();
    if (thread_.joinable()) {
      thread_.join();
    }
    for (Job& job : unrun) {
      job.done.signal("gcoffload: the copy engine was destroyed before this copy ran");
    }
  }

  // Queues `run`, which must signal `done` when it has finished.
  void submit(std::function<void()> run, Fence done) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back(Job{std::move(run), std::move(done)});
      if (!thread_.joinable()) {
        thread_ = std::thread([this] { work(); });
      }
    }
    wake_.notify_one();
  }

  // A fence that completes once every job submitted so far has run.
  Fence drained() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!thread_.joinable()) {
      return Fence();
    }
    Fence done = Fence::host_signal();
    jobs_.push_back(Job{[done] { done.signal(); }, done});
    wake_.notify_one();
    return done;
  }

 private:
  struct Job {
    std::function<void()> run;
    Fence done;
  };

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (stopping_) {
        return;
      }
      Job job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job.run();
      job = Job{};
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Job> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

} // namespace gcoffload
