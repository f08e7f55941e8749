// Dumps every tensor of a checkpoint as qtool's reader sees it: OUT.json lists component, name,
// dtype, shape, shard file, offset and size in OUT.bin, which holds the bytes back to back.
//
//   formats_dump CKPT OUT
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CKPT OUT\n", argv[0]);
    return 2;
  }
  try {
    const auto ck = qtool::Checkpoint::open(argv[1]);
    const std::string out = argv[2];
    std::ofstream bin(out + ".bin", std::ios::binary | std::ios::trunc);
    nlohmann::json tensors = nlohmann::json::array();
    uint64_t offset = 0;
    for (const auto& c : ck.components()) {
      for (const auto& e : c.entries()) {
        const auto& t = c.info(e);
        const auto d = c.data(e);
        bin.write(reinterpret_cast<const char*>(d.data()), static_cast<std::streamsize>(d.size()));
        tensors.push_back({{"component", c.name()},
                           {"name", t.name},
                           {"dtype", std::string(qtool::dtype_name(t.dtype))},
                           {"shape", t.shape},
                           {"shard", c.shard_of(e).path().filename().string()},
                           {"offset", offset},
                           {"nbytes", d.size()}});
        offset += d.size();
      }
    }
    if (!bin.good()) {
      std::fprintf(stderr, "formats_dump: cannot write %s.bin\n", out.c_str());
      return 2;
    }
    qtool::write_json_file(out + ".json", {{"fingerprint", ck.fingerprint()}, {"tensors", tensors}});
    return 0;
  } catch (const qtool::Error& e) {
    std::fprintf(stderr, "formats_dump: %s\n", e.what());
    return 2;
  }
}
