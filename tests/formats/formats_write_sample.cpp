// Writes a sharded checkpoint of every dtype with qtool's writer (ComponentWriter), and beside it
// the bytes it meant to write: DIR/ckpt/ (the model folder), DIR/expected.json (name, dtype,
// shape, offset and size in DIR/expected.bin). The interop test reads the checkpoint with the
// safetensors Python library and compares.
//
//   formats_write_sample DIR SEED MAX_SHARD_SIZE
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s DIR SEED MAX_SHARD_SIZE\n", argv[0]);
    return 2;
  }
  const fs::path dir = argv[1];
  const uint64_t seed = std::strtoull(argv[2], nullptr, 10);
  const uint64_t max_shard = std::strtoull(argv[3], nullptr, 10);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  try {
    std::vector<std::vector<qtool::TensorDecl>> groups;
    std::vector<std::vector<uint8_t>> data;
    auto add = [&](std::vector<qtool::TensorDecl> g) { groups.push_back(std::move(g)); };
    for (int l = 0; l < 6; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      const auto rows = static_cast<int64_t>(16 + rng() % 48), cols = static_cast<int64_t>(8 + rng() % 40);
      add({{p + "self_attn.q_proj.weight", qtool::DType::BF16, {rows, cols}}});
      add({{p + "mlp.up_proj.weight", qtool::DType::F8_E4M3, {rows, cols}},
           {p + "mlp.up_proj.weight_scale", qtool::DType::BF16, {rows, 1}}});
      add({{p + "mlp.down_proj.weight", qtool::DType::F8_E5M2, {cols, rows}}});
      add({{p + "mlp.gate_proj.weight", qtool::DType::I8, {rows, cols}},
           {p + "mlp.gate_proj.SCB", qtool::DType::F32, {rows}},
           {p + "mlp.gate_proj.weight_format", qtool::DType::U8, {}}});
      add({{p + "input_layernorm.weight", qtool::DType::F16, {cols}}});
    }
    add({{"misc.f64", qtool::DType::F64, {3, 5}},
         {"misc.i16", qtool::DType::I16, {7}},
         {"misc.u16", qtool::DType::U16, {9}},
         {"misc.i32", qtool::DType::I32, {2, 3}},
         {"misc.u32", qtool::DType::U32, {4}},
         {"misc.i64", qtool::DType::I64, {5}},
         {"misc.u64", qtool::DType::U64, {3}},
         {"misc.bool", qtool::DType::BOOL, {11}},
         {"misc.scalar_f32", qtool::DType::F32, {}},
         {"misc.empty_bf16", qtool::DType::BF16, {4, 0}},
         {"misc.empty_u8", qtool::DType::U8, {0}}});

    // Values: floats from a normal distribution rounded to the dtype (specials too), integers random.
    nlohmann::json manifest = nlohmann::json::array();
    std::vector<uint8_t> expected;
    for (const auto& g : groups) {
      for (const auto& d : g) {
        const uint64_t n = d.nbytes();
        std::vector<uint8_t> bytes(n);
        const size_t numel = n / qtool::dtype_size(d.dtype);
        if (qtool::dtype_is_float(d.dtype)) {
          std::vector<float> f(numel);
          for (auto& x : f) x = normal(rng) * 0.05f;
          if (numel > 3 && d.dtype != qtool::DType::F8_E4M3) {
            f[0] = -0.0f;
            f[1] = INFINITY;
            f[2] = 1e-40f;  // subnormal in f32
          }
          if (numel > 4) f[3] = NAN;
          qtool::convert_from_f32(d.dtype, f.data(), bytes.data(), numel);
        } else if (d.dtype == qtool::DType::BOOL) {
          for (auto& b : bytes) b = static_cast<uint8_t>(rng() & 1);
        } else {
          for (auto& b : bytes) b = static_cast<uint8_t>(rng());
        }
        manifest.push_back({{"name", d.name},
                            {"dtype", std::string(qtool::dtype_name(d.dtype))},
                            {"shape", d.shape},
                            {"offset", expected.size()},
                            {"nbytes", n}});
        expected.insert(expected.end(), bytes.begin(), bytes.end());
        data.push_back(std::move(bytes));
      }
    }

    fs::create_directories(dir);
    qtool::OutputPath out(dir / "ckpt", true);
    fs::create_directories(out.tmp());
    qtool::ComponentWriter writer(out.tmp(), "model", groups, max_shard,
                                  {{"qtool.sample_seed", std::to_string(seed)}});
    size_t k = 0;
    for (const auto& g : groups)
      for (const auto& d : g) {
        // In two pieces, the second first: the writer takes any order.
        const auto& b = data[k++];
        const size_t half = b.size() / 2;
        writer.write(d.name, std::span<const uint8_t>(b.data() + half, b.size() - half), half);
        writer.write(d.name, std::span<const uint8_t>(b.data(), half), 0);
      }
    writer.commit();
    qtool::write_json_file(out.tmp() / "config.json",
                           {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}});
    out.commit();

    std::ofstream bin(dir / "expected.bin", std::ios::binary | std::ios::trunc);
    bin.write(reinterpret_cast<const char*>(expected.data()), static_cast<std::streamsize>(expected.size()));
    qtool::write_json_file(dir / "expected.json",
                           {{"seed", seed}, {"n_shards", writer.n_shards()}, {"tensors", manifest}});
    std::printf("wrote %zu tensors in %zu shards to %s\n", manifest.size(), writer.n_shards(),
                (dir / "ckpt").c_str());
    return 0;
  } catch (const qtool::Error& e) {
    std::fprintf(stderr, "formats_write_sample: %s\n", e.what());
    return 2;
  }
}
