// libFuzzer target for the channel protocol's host side: StreamDecoder fed in
// fuzzer-chosen chunks, every frame through ConnectionGuard, and every
// accepted message re-encoded and decoded again (it must round-trip exactly).
// Any crash, sanitizer report or __builtin_trap() fails tests/fuzz/run.sh.
#include <cstddef>
#include <cstdint>
#include <span>

#include "protocol/codec.h"
#include "protocol/guard.h"

using namespace vkick::proto;

namespace {
void Check(bool ok) {
  if (!ok) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // The first byte picks the chunk size, so both whole frames and tiny pieces
  // get exercised.
  const size_t chunk = 1 + data[0] % 64;
  std::span<const uint8_t> in(data + 1, size - 1);

  std::vector<KnownDevice> known = {
      {.device_id = 1, .pci_address = "0000:00:04.0", .serial = "disk0", .num_queues = 2}};
  ConnectionGuard guard({.frames_per_s = 1000, .burst = 1000}, known, 0);
  StreamDecoder dec;
  int64_t now = 0;
  bool fatal_seen = false;
  auto sink = [&](DecodeResult&& r) {
    Check(!fatal_seen);  // nothing after a fatal rejection
    fatal_seen = IsFatal(r.error);
    Check(r.message.has_value() == (r.error == Rejection::kNone));
    now += 1'000'000;
    guard.Admit(r, now);
    // Whatever the announcements, the guest maps at most what discovery knows.
    Check(guard.mapped_queues() <= 2);
    if (!r.message) return;
    Check(Validate(*r.message) == Rejection::kNone);
#ifdef VKICK_FUZZ_CANARY
    // Self-test of run.sh: a planted bug that a seed reaches at once.
    Check(!std::holds_alternative<Hello>(*r.message));
#endif
    const EncodeResult enc = Encode(*r.message);
    Check(enc.error == Rejection::kNone && enc.bytes.size() <= kMaxFrame);
    StreamDecoder again;
    int n = 0;
    again.Feed(enc.bytes, [&](DecodeResult&& r2) {
      ++n;
      Check(r2.message.has_value() && *r2.message == *r.message);
    });
    Check(n == 1);
    if (const auto* s = std::get_if<Sample>(&*r.message)) {
      for (const QueueSample& q : s->queues) {
        if (auto hq = guard.Resolve(q.ref)) Check(hq->device_id == 1 && hq->queue < 2);
      }
    }
  };
  for (size_t i = 0; i < in.size(); i += chunk) {
    dec.Feed(in.subspan(i, std::min(chunk, in.size() - i)), sink);
    Check(dec.buffered() <= kMaxFrame);
  }
  dec.Finish(sink);
  return 0;
}
