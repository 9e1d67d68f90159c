// Encoder, validator and incremental decoder of the channel protocol
// (docs/protocol.md). Pure: no I/O, no clock, no allocation beyond one frame.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "protocol/messages.h"

namespace vkick::proto {

// Every range and consistency rule of docs/protocol.md. The decoder runs it on
// everything it parses and the encoder on everything it sends, so both ends
// agree on what is valid by construction.
Rejection Validate(const Message& m);

struct EncodeResult {
  std::vector<uint8_t> bytes;  // one complete frame; empty when rejected
  Rejection error = Rejection::kNone;
};
// Validates, then frames. A message that would not pass the peer's decoder is
// never put on the wire.
EncodeResult Encode(const Message& m);

// Decodes one payload of a known type (header already checked).
struct DecodeResult {
  std::optional<Message> message;  // set iff error == kNone
  Rejection error = Rejection::kNone;
};
DecodeResult DecodePayload(MsgType type, std::span<const uint8_t> payload);

// Incremental decoder for a byte stream. Feed it chunks of any size (a single
// byte included); it calls `sink` once per complete frame with a message or a
// rejection. It buffers at most one frame (kMaxFrame bytes) whatever the
// input. After a fatal rejection (IsFatal: the framing is lost) it ignores all
// further input: the caller should drop the connection.
class StreamDecoder {
 public:
  using Sink = std::function<void(DecodeResult&&)>;

  void Feed(std::span<const uint8_t> data, const Sink& sink);
  // The stream ended: a partial frame is reported as kTruncated (once).
  void Finish(const Sink& sink);

  bool failed() const { return state_ == State::kFailed; }
  size_t buffered() const { return buf_.size(); }

 private:
  enum class State { kHeader, kPayload, kSkip, kFailed };
  void Fail(Rejection r, const Sink& sink);
  void OnHeader(const Sink& sink);

  State state_ = State::kHeader;
  std::vector<uint8_t> buf_;  // header bytes, then payload bytes
  MsgType type_ = MsgType::kHello;
  uint32_t length_ = 0;       // payload length of the current frame
  uint32_t skip_left_ = 0;    // payload bytes of an unknown-type frame to skip
};

}  // namespace vkick::proto
