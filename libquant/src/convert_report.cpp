// The report of a conversion: JSON and the human summary (convert.hpp).
#include <cmath>
#include <cstdio>
#include <limits>

#include "qtool/formats/size.hpp"
#include "qtool/libquant/convert.hpp"

namespace qtool::quant {
namespace {

using nlohmann::json;

json finite_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

double rel_rms_of(double sum_ref, double sum_err) {
  if (sum_err == 0) return 0;
  if (sum_ref == 0) return std::numeric_limits<double>::infinity();
  return std::sqrt(sum_err / sum_ref);
}

double sqnr_of(double sum_ref, double sum_err) {
  if (sum_err == 0) return std::numeric_limits<double>::infinity();
  if (sum_ref == 0) return -std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(sum_ref / sum_err);
}

// The sums over every component of a report.
struct Totals {
  double sum_ref = 0, sum_err = 0;
  size_t n_quantized = 0, n_copied = 0;
  void add(const ComponentReport& c) {
    sum_ref += c.sum_sq_ref;
    sum_err += c.sum_sq_err;
    n_quantized += c.n_quantized;
    n_copied += c.n_copied;
  }
};

// The figures a component and the totals both report.
json counts_json(size_t n_quantized, size_t n_copied, uint64_t bytes_in, uint64_t bytes_out) {
  return {{"tensors_converted", n_quantized},
          {"tensors_copied", n_copied},
          {"bytes_in", bytes_in},
          {"bytes_out", bytes_out}};
}

// The relative RMS error and the SQNR of error sums (null where not finite).
void add_error_json(json& j, double sum_ref, double sum_err) {
  j["rel_rms"] = finite_or_null(rel_rms_of(sum_ref, sum_err));
  j["sqnr_db"] = finite_or_null(sqnr_of(sum_ref, sum_err));
}

json component_json(const ComponentReport& c, bool with_error) {
  json cj = counts_json(c.n_quantized, c.n_copied, c.bytes_in, c.bytes_out);
  cj["name"] = c.name;
  cj["scheme"] = c.options.is_null() ? json(nullptr) : c.options.at("scheme");
  cj["options"] = c.options;
  cj["shards"] = c.n_shards;
  cj["unquantized_modules"] = c.unquantized_modules;
  if (with_error) {
    add_error_json(cj, c.sum_sq_ref, c.sum_sq_err);
    cj["worst_tensor"] = c.worst_tensor;
    cj["worst_sqnr_db"] = finite_or_null(c.worst_sqnr_db);
  }
  return cj;
}

json tensor_json(const TensorReport& t) {
  json tj = {{"component", t.component},
             {"name", t.name},
             {"scheme", t.scheme.empty() ? json(nullptr) : json(t.scheme)},
             {"dtype", std::string(dtype_name(t.dtype))},
             {"shape", t.shape},
             {"bytes_in", t.bytes_in},
             {"bytes_out", t.bytes_out}};
  if (t.has_error) {
    add_error_json(tj, t.sum_sq_ref, t.sum_sq_err);
    tj["max_abs_err"] = t.max_abs_err;
  }
  return tj;
}

// The component with the lowest SQNR of a quantize report, or null.
json worst_component_tensor(const ConvertReport& report) {
  json worst = nullptr;
  double worst_sqnr = std::numeric_limits<double>::infinity();
  for (const auto& c : report.components) {
    if (c.n_quantized == 0 || c.worst_tensor.empty() || !(c.worst_sqnr_db < worst_sqnr)) continue;
    worst_sqnr = c.worst_sqnr_db;
    worst = {{"component", c.name}, {"tensor", c.worst_tensor}, {"sqnr_db", finite_or_null(c.worst_sqnr_db)}};
  }
  return worst;
}

// "%.2f s"-style formatting into a std::string.
template <typename... Args>
std::string format_line(const char* format, Args... args) {
  char line[512];
  std::snprintf(line, sizeof line, format, args...);
  return line;
}

std::string tensor_lines(const ConvertReport& report) {
  std::string out;
  for (const auto& t : report.tensors) {
    if (t.scheme.empty()) continue;
    const std::string name = t.component.empty() ? t.name : t.component + "/" + t.name;
    if (t.has_error) {
      out += format_line("  %-60s %-8s %10s -> %10s  rel RMS %.4f  SQNR %6.2f dB\n", name.c_str(),
                         t.scheme.c_str(), format_size(t.bytes_in).c_str(), format_size(t.bytes_out).c_str(),
                         t.rel_rms(), t.sqnr_db());
    } else {
      out += format_line("  %-60s %-8s %10s -> %10s\n", name.c_str(), t.scheme.c_str(),
                         format_size(t.bytes_in).c_str(), format_size(t.bytes_out).c_str());
    }
  }
  return out;
}

std::string component_line(const ComponentReport& c, bool quantize) {
  const std::string scheme = c.options.is_null() ? "-" : c.options.at("scheme").get<std::string>();
  const std::string name = c.name.empty() ? "(model)" : c.name;
  std::string out =
      format_line("  %-16s %-9s %9zu %7zu %11s -> %-11s", name.c_str(), scheme.c_str(), c.n_quantized,
                  c.n_copied, format_size(c.bytes_in).c_str(), format_size(c.bytes_out).c_str());
  if (quantize && c.n_quantized > 0) {
    out += format_line(" %8.4f %6.2f dB  %.2f dB %s", rel_rms_of(c.sum_sq_ref, c.sum_sq_err),
                       sqnr_of(c.sum_sq_ref, c.sum_sq_err), c.worst_sqnr_db, c.worst_tensor.c_str());
  }
  return out + "\n";
}

}  // namespace

double TensorReport::rel_rms() const { return rel_rms_of(sum_sq_ref, sum_sq_err); }
double TensorReport::sqnr_db() const { return sqnr_of(sum_sq_ref, sum_sq_err); }

json report_to_json(const ConvertReport& report) {
  const bool quantize = report.command == "quantize";
  json j;
  j["command"] = report.command;
  j["qtool_version"] = report.tool_version;
  j["input"] = report.input.string();
  j["output"] = report.output.string();
  j["threads"] = report.n_threads;
  j["seconds"] = report.seconds;
  j["bytes_in"] = report.bytes_in;
  j["bytes_out"] = report.bytes_out;
  j["input_bytes_per_second"] =
      report.seconds > 0 ? static_cast<double>(report.bytes_in) / report.seconds : 0.0;
  j["files_copied"] = report.files_copied;
  if (!report.config.is_null()) j["config"] = report.config;
  Totals totals;
  json comps = json::array();
  for (const auto& c : report.components) {
    comps.push_back(component_json(c, quantize && c.n_quantized > 0));
    totals.add(c);
  }
  j["components"] = comps;
  json tj = counts_json(totals.n_quantized, totals.n_copied, report.bytes_in, report.bytes_out);
  if (quantize) {
    add_error_json(tj, totals.sum_ref, totals.sum_err);
    tj["worst"] = worst_component_tensor(report);
  }
  j["totals"] = tj;
  json tensors = json::array();
  for (const auto& t : report.tensors) tensors.push_back(tensor_json(t));
  j["tensors"] = tensors;
  j["warnings"] = report.warnings;
  return j;
}

std::string summary_text(const ConvertReport& report, bool per_tensor) {
  const double gbps = report.seconds > 0 ? static_cast<double>(report.bytes_in) / report.seconds / 1e9 : 0.0;
  std::string out = format_line("%s: %s -> %s (%zu threads, %.2f s, %.2f GB/s of input)\n",
                                report.command.c_str(), report.input.string().c_str(),
                                report.output.string().c_str(), report.n_threads, report.seconds, gbps);
  const bool quantize = report.command == "quantize";
  if (per_tensor) out += tensor_lines(report);
  out += format_line("  %-16s %-9s %9s %7s %11s    %-11s%s\n", "component", "scheme", "converted", "copied",
                     "bytes in", "bytes out", quantize ? "  rel RMS      SQNR  worst tensor" : "");
  Totals totals;
  for (const auto& c : report.components) {
    out += component_line(c, quantize);
    totals.add(c);
  }
  out += format_line("  %-16s %-9s %9zu %7zu %11s -> %-11s", "total", "", totals.n_quantized, totals.n_copied,
                     format_size(report.bytes_in).c_str(), format_size(report.bytes_out).c_str());
  if (quantize && totals.n_quantized > 0) {
    out += format_line(" %8.4f %6.2f dB", rel_rms_of(totals.sum_ref, totals.sum_err),
                       sqnr_of(totals.sum_ref, totals.sum_err));
  }
  out += "\n";
  if (report.files_copied > 0) out += str_cat("  ", report.files_copied, " other files copied\n");
  return out;
}

}  // namespace qtool::quant
