#!/usr/bin/env bash
# Fails (exit 1, naming each file and line) when a C++/CUDA source differs from what the checked-in
# .clang-format makes of it. Installs Debian's clang-format when it is missing (as root or via sudo).
# To fix: git ls-files '*.cpp' '*.hpp' '*.h' '*.cu' '*.cuh' | xargs clang-format -i
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang-format >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq clang-format
fi
git ls-files -z '*.cpp' '*.hpp' '*.h' '*.cu' '*.cuh' | xargs -0 clang-format --dry-run -Werror
echo "format: $(git ls-files '*.cpp' '*.hpp' '*.h' '*.cu' '*.cuh' | wc -l) files as .clang-format says"
