// The qtool CLI: each command lives in cmd_<name>.cpp and registers itself with add_<name>_command.
// Commands only parse options into a plain struct and call one library entry; errors are thrown
// as qtool::Error and mapped to exit codes in main.cpp.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "qtool/formats/error.hpp"
#include "qtool/formats/progress.hpp"

namespace qtool::cli {

// Runs `f`; an Error it throws comes back with `option` in front of its message ("--device-profile:
// ..."): the libraries name what is wrong, the CLI names the option it came from.
template <class F>
auto with_option(std::string_view option, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    throw Error(e.kind(), str_cat(option, ": ", e.what()));
  }
}

struct GlobalOptions {
  bool quiet = false;
  bool verbose = false;
};

// The function a command runs after parsing; returns the exit code (0, or 1 for a failed check).
using CommandFn = std::function<int()>;

// Each cmd_<name>.cpp registers its command with a static CommandRegistrar: `order` sets its place
// in --help; `declare` declares its options on the subcommand, to be parsed into a fresh Options;
// when it is the one invoked, main runs `run(options, global)`.
using AddCommandFn = std::function<void(CLI::App& app, const GlobalOptions& global, CommandFn& run)>;
struct CommandRegistrar {
  template <class Options>
  CommandRegistrar(int order, std::string name, std::string description,
                   void (*declare)(CLI::App* cmd, Options& o),
                   int (*run)(const Options& o, const GlobalOptions& global))
      : CommandRegistrar(order, [=](CLI::App& app, const GlobalOptions& global, CommandFn& run_fn) {
          auto o = std::make_shared<Options>();
          CLI::App* cmd = app.add_subcommand(name, description);
          cmd->callback(
              [o, &global, &run_fn, run] { run_fn = [o, &global, run] { return run(*o, global); }; });
          declare(cmd, *o);
        }) {}

 private:
  CommandRegistrar(int order, AddCommandFn add);
};
void add_registered_commands(CLI::App& app, const GlobalOptions& global, CommandFn& run);

// A check for count options: an integer from lo to hi. Checked on the text, so that "-1" is refused
// instead of wrapping into a huge unsigned value.
inline CLI::Range count_range(int64_t lo, int64_t hi) { return CLI::Range(lo, hi); }

// The options several commands share: --backend (auto, cuda or cpu) and --threads,-j (0: every
// core, at most kMaxThreads).
void add_backend_option(CLI::App* cmd, std::string& backend);
void add_threads_option(CLI::App* cmd, size_t& threads, const std::string& help);

// Human output goes to stderr; these respect --quiet, --verbose and NO_COLOR.
void info(const GlobalOptions& global, std::string_view line);
void verbose(const GlobalOptions& global, std::string_view line);
void warn(std::string_view line);
bool use_color();

// A progress bar on stderr, drawn only when stderr is a terminal and not --quiet.
// Thread-safe; redraws at most ~10 times a second.
class ProgressBar {
 public:
  ProgressBar(const GlobalOptions& global, std::string title);
  ~ProgressBar();
  ProgressFn callback();
  void finish();

 private:
  struct State;
  State* state_;
};

}  // namespace qtool::cli
