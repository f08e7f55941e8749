#include "cli.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include "qtool/formats/size.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace qtool::cli {
namespace {

std::vector<std::pair<int, AddCommandFn>>& registry() {
  static std::vector<std::pair<int, AddCommandFn>> commands;
  return commands;
}

}  // namespace

CommandRegistrar::CommandRegistrar(int order, AddCommandFn add) {
  registry().emplace_back(order, std::move(add));
}

void add_registered_commands(CLI::App& app, const GlobalOptions& global, CommandFn& run) {
  auto commands = registry();
  std::sort(commands.begin(), commands.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [order, add] : commands) add(app, global, run);
}

void add_backend_option(CLI::App* cmd, std::string& backend) {
  cmd->add_option("--backend", backend, "auto (CUDA when a GPU is present), cuda or cpu")
      ->check(CLI::IsMember({"auto", "cuda", "cpu"}));
}

void add_threads_option(CLI::App* cmd, size_t& threads, const std::string& help) {
  cmd->add_option("--threads,-j", threads, help)->check(count_range(0, static_cast<int64_t>(kMaxThreads)));
}

bool use_color() {
  const char* no_color = std::getenv("NO_COLOR");
  if (no_color && *no_color) return false;
  return isatty(STDERR_FILENO) != 0;
}

void info(const GlobalOptions& global, std::string_view line) {
  if (global.quiet) return;
  std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
}

void verbose(const GlobalOptions& global, std::string_view line) {
  if (global.quiet || !global.verbose) return;
  std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
}

void warn(std::string_view line) {
  if (use_color())
    std::fprintf(stderr, "\033[33mwarning:\033[0m %.*s\n", static_cast<int>(line.size()), line.data());
  else
    std::fprintf(stderr, "warning: %.*s\n", static_cast<int>(line.size()), line.data());
}

struct ProgressBar::State {
  bool enabled = false;
  std::string title;
  std::mutex mu;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_draw{};
  bool drawn = false;
};

ProgressBar::ProgressBar(const GlobalOptions& global, std::string title) : state_(new State) {
  state_->enabled = !global.quiet && isatty(STDERR_FILENO) != 0;
  state_->title = std::move(title);
}

ProgressBar::~ProgressBar() {
  finish();
  delete state_;
}

ProgressFn ProgressBar::callback() {
  State* s = state_;
  return [s](uint64_t done, uint64_t total, std::string_view label) {
    if (!s->enabled) return;
    std::lock_guard<std::mutex> lock(s->mu);
    const auto now = std::chrono::steady_clock::now();
    if (s->drawn && done < total && now - s->last_draw < std::chrono::milliseconds(100)) return;
    s->last_draw = now;
    s->drawn = true;
    const double frac = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '-');
    const double secs = std::chrono::duration<double>(now - s->start).count();
    std::fprintf(stderr, "\r\033[K%s [%s] %5.1f%% %s / %s %.1fs %.*s", s->title.c_str(), bar.c_str(),
                 frac * 100.0, format_size(done).c_str(), format_size(total).c_str(), secs,
                 static_cast<int>(std::min<size_t>(label.size(), 40)), label.data());
    std::fflush(stderr);
  };
}

void ProgressBar::finish() {
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->enabled && state_->drawn) std::fprintf(stderr, "\r\033[K");
  state_->drawn = false;
}

}  // namespace qtool::cli
