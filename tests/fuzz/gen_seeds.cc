// Writes the fuzzer's seed corpus: each valid message type as one frame, all
// of them as one stream, and a few near-misses. Usage: gen_seeds <dir>
#include <fstream>
#include <string>

#include "tests/unit/protocol/test_messages.h"

using namespace vkick::proto;

namespace {
void Write(const std::string& path, uint8_t chunk, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.put(static_cast<char>(chunk));
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  std::vector<uint8_t> all;
  int i = 0;
  for (const Message& m : testing::AllValidMessages()) {
    const auto b = testing::Frame(m);
    if (b.empty()) return 1;
    Write(dir + "/msg" + std::to_string(i++), 63, b);
    all.insert(all.end(), b.begin(), b.end());
  }
  Write(dir + "/stream_whole", 63, all);
  Write(dir + "/stream_bytes", 0, all);
  Write(dir + "/stream_odd", 6, all);
  // A hello then samples: the guard's accept path.
  std::vector<uint8_t> session = testing::Frame(testing::MakeHello());
  for (uint64_t seq = 1; seq < 4; ++seq) {
    const auto b = testing::Frame(testing::MakeSample(seq));
    session.insert(session.end(), b.begin(), b.end());
  }
  Write(dir + "/session", 31, session);
  // Re-announcement on one stream (virtio-serial): bye, a hello with other
  // devices, samples again from seq 1: the guard's remap path.
  std::vector<uint8_t> reannounce = session;
  Hello second = testing::MakeHello();
  second.devices.erase(second.devices.begin());
  for (const Message& m : std::vector<Message>{Bye{}, second, testing::MakeSample(1)}) {
    const auto b = testing::Frame(m);
    reannounce.insert(reannounce.end(), b.begin(), b.end());
  }
  Write(dir + "/reannounce", 31, reannounce);
  // A hello naming the last driver kind (vkick_virtio_blk): the edge of the
  // driver byte's range.
  Hello steered = testing::MakeHello();
  steered.devices[1].driver = DriverKind::kVkickVirtioBlk;
  Write(dir + "/hello_vkick_virtio_blk", 63, testing::Frame(steered));
  auto truncated = testing::Frame(testing::MakePolicy());
  truncated.resize(truncated.size() - 3);
  Write(dir + "/truncated", 63, truncated);
  return 0;
}
