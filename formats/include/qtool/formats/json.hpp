// The one way qtool reads JSON (config.json, model_index.json, indexes, quant configs, budgets,
// device profiles, plans, quant-state blobs) and writes it. Reading bounds the nesting depth
// without recursing, refuses duplicate keys and turns every nlohmann exception into
// Error(InvalidInput or Usage) naming the file or option and the byte position.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "qtool/formats/error.hpp"

namespace qtool {

// Deepest nesting of arrays and objects accepted (a value at the top level is depth 0).
inline constexpr size_t kMaxJsonDepth = 128;

// Parses `text`. `label` names the source in errors ("cfg.json", "--max-memory"); `kind` is the
// error kind (InvalidInput for files, Usage for the command line). Refuses: malformed text
// ("<label>: invalid JSON at byte N: ..."), numbers outside the double range, nesting deeper than
// kMaxJsonDepth, and a key given twice in one object (naming the key and the object's path).
nlohmann::json parse_json(std::string_view text, std::string_view label,
                          ErrorKind kind = ErrorKind::InvalidInput);
// The same, keeping the key order of objects.
nlohmann::ordered_json parse_ordered_json(std::string_view text, std::string_view label,
                                          ErrorKind kind = ErrorKind::InvalidInput);

// Reads a whole file. Only a regular file is opened for reading: a FIFO, socket, device or folder
// is refused (Error(InvalidInput) naming the path) without blocking.
std::string read_text_file(const std::filesystem::path& path);

// Reads and parses a JSON file (read_text_file + parse_json).
nlohmann::json read_json_file(const std::filesystem::path& path);
// Writes JSON (indent 2) under a temporary name and renames it into place.
void write_json_file(const std::filesystem::path& path, const nlohmann::json& value);
// `text` into `path` atomically (a temporary file in the same folder, fsync, rename); Error(Io)
// naming the file otherwise.
void write_text_file(const std::filesystem::path& path, std::string_view text);

// JSON text that never throws on strings that are not UTF-8 (paths from the file system or the
// command line): their invalid bytes are written as U+FFFD. indent -1: one line.
std::string dump_json(const nlohmann::json& value, int indent = -1);
std::string dump_json(const nlohmann::ordered_json& value, int indent = -1);

// Opens `path` for reading when it is a regular file and returns the descriptor (O_CLOEXEC).
// A FIFO is opened without blocking and refused like any other special file:
// Error(InvalidInput) "<path>: not a regular file (a FIFO)". Error(Io) when it cannot be opened.
int open_regular_file(const std::filesystem::path& path);

}  // namespace qtool
