#include <cstdio>
#include <exception>
#include <iostream>
#include <new>

#include "cli.hpp"
#include "qtool/formats/error.hpp"

#ifndef QTOOL_VERSION
#define QTOOL_VERSION "0.0.0"
#endif

namespace {

// The one place error kinds become exit codes (DESIGN.md §6).
int exit_code_for(qtool::ErrorKind kind) {
  switch (kind) {
    case qtool::ErrorKind::CheckFailed: return 1;
    case qtool::ErrorKind::InvalidInput:
    case qtool::ErrorKind::Usage:
    case qtool::ErrorKind::Io:
    case qtool::ErrorKind::Unsupported: return 2;
    case qtool::ErrorKind::Internal: return 3;
  }
  return 3;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qtool: checkpoint quantizer and offload planner"};
  app.set_version_flag("--version", std::string("qtool ") + QTOOL_VERSION);
  app.require_subcommand(1);
  qtool::cli::GlobalOptions global;
  app.add_flag("-q,--quiet", global.quiet, "Print only errors")->configurable(false);
  app.add_flag("-v,--verbose", global.verbose, "Print more detail");
  qtool::cli::CommandFn run;
  qtool::cli::add_registered_commands(app, global, run);
  // Global flags are accepted after the subcommand too.
  for (CLI::App* sub : app.get_subcommands({})) {
    sub->add_flag("-q,--quiet", global.quiet, "Print only errors");
    sub->add_flag("-v,--verbose", global.verbose, "Print more detail");
    sub->set_version_flag("--version", std::string("qtool ") + QTOOL_VERSION);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    return run ? run() : 2;
  } catch (const qtool::Error& e) {
    std::fprintf(stderr, "qtool: %s: %s\n", qtool::error_kind_name(e.kind()), e.what());
    return exit_code_for(e.kind());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "qtool: internal error: out of memory\n");
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qtool: internal error: %s\n", e.what());
    return 3;
  }
}
