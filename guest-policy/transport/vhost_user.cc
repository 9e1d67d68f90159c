#include "guest-policy/transport/vhost_user.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "guest-policy/transport/vhost_user_msg.h"

namespace vkick {

namespace vu = vhost_user;

namespace {
absl::Status Errno(int e, absl::string_view what) { return ErrnoStatus(e, what); }
}  // namespace

absl::StatusOr<std::unique_ptr<VhostUserBlk>> VhostUserBlk::Connect(const VhostUserOptions& o) {
  std::unique_ptr<VhostUserBlk> d(new VhostUserBlk(o));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (o.socket_path.empty() || o.socket_path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("bad socket path '", o.socket_path, "'"));
  }
  std::memcpy(addr.sun_path, o.socket_path.c_str(), o.socket_path.size() + 1);
  d->sock_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (d->sock_ < 0) return Errno(errno, "socket");
  timeval tv{o.timeout_ms / 1000, (o.timeout_ms % 1000) * 1000};
  setsockopt(d->sock_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(d->sock_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (connect(d->sock_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int e = errno;
    return Errno(e, absl::StrCat("connect to vhost-user socket ", o.socket_path));
  }
  absl::Status st = d->Handshake();
  if (!st.ok()) return st;
  return d;
}

VhostUserBlk::~VhostUserBlk() {
  if (sock_ >= 0) close(sock_);
  for (int fd : kick_fds_) if (fd >= 0) close(fd);
  for (int fd : call_fds_) if (fd >= 0) close(fd);
}

absl::Status VhostUserBlk::Send(const std::vector<uint8_t>& msg, int fd) {
  iovec iov{const_cast<uint8_t*>(msg.data()), msg.size()};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int))];
  if (fd >= 0) {
    // One fd per message in an SCM_RIGHTS cmsg: what QEMU does, and what the
    // host probes decode to label kick fds (docs/probes.md).
    std::memset(ctl, 0, sizeof(ctl));
    mh.msg_control = ctl;
    mh.msg_controllen = sizeof(ctl);
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  ssize_t n;
  do {
    n = sendmsg(sock_, &mh, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    dead_ = true;
    return absl::UnavailableError(absl::StrCat("vhost-user backend gone (send: ", strerror(errno), ")"));
  }
  if (static_cast<size_t>(n) != msg.size()) return absl::DataLossError("vhost-user: short send");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> VhostUserBlk::Receive(uint32_t request, uint32_t min, uint32_t max) {
  auto read_all = [&](void* buf, size_t len) -> absl::Status {
    size_t got = 0;
    while (got < len) {
      ssize_t n = recv(sock_, static_cast<uint8_t*>(buf) + got, len - got, 0);
      if (n == 0) {
        dead_ = true;
        return absl::UnavailableError(absl::StrCat("vhost-user backend closed the connection during ",
                                                   vu::RequestName(request)));
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          return absl::DeadlineExceededError(absl::StrCat("vhost-user backend did not answer ",
                                                          vu::RequestName(request), " within ", opts_.timeout_ms, " ms"));
        }
        dead_ = true;
        return Errno(errno, "vhost-user recv");
      }
      got += static_cast<size_t>(n);
    }
    return absl::OkStatus();
  };
  vu::Header h;
  absl::Status st = read_all(&h, sizeof(h));
  if (!st.ok()) return st;
  if (h.size > vu::kMaxPayload) return absl::DataLossError(absl::StrCat("vhost-user: reply of ", h.size, " bytes"));
  std::vector<uint8_t> payload(h.size);
  st = read_all(payload.data(), payload.size());
  if (!st.ok()) return st;
  st = vu::CheckReplyHeader(h, request, min, max);
  if (!st.ok()) return st;
  return payload;
}

absl::StatusOr<uint64_t> VhostUserBlk::GetU64(uint32_t request) {
  absl::Status st = Send(vu::Encode(request, 0, {}));
  if (!st.ok()) return st;
  auto p = Receive(request, 8, 8);
  if (!p.ok()) return p.status();
  return vu::DecodeU64(*p);
}

absl::Status VhostUserBlk::SendAcked(uint32_t request, std::vector<uint8_t> msg, int fd) {
  const bool ack = protocol_features_ & vu::kPfReplyAck;
  if (ack) {
    uint32_t flags;
    std::memcpy(&flags, msg.data() + 4, 4);
    flags |= vu::kFlagNeedReply;
    std::memcpy(msg.data() + 4, &flags, 4);
  }
  absl::Status st = Send(msg, fd);
  if (!st.ok() || !ack) return st;
  auto p = Receive(request, 8, 8);
  if (!p.ok()) return p.status();
  auto v = vu::DecodeU64(*p);
  if (!v.ok()) return v.status();
  if (*v != 0) {
    return absl::FailedPreconditionError(absl::StrCat("vhost-user backend rejected ", vu::RequestName(request),
                                                      " (reply ", *v, ")"));
  }
  return absl::OkStatus();
}

absl::Status VhostUserBlk::Handshake() {
  // The order QEMU's vhost_dev_init/vhost_user_blk uses.
  absl::Status st = Send(vu::Encode(vu::kSetOwner, 0, {}));
  if (!st.ok()) return st;
  auto offered = GetU64(vu::kGetFeatures);
  if (!offered.ok()) return offered.status();
  if (!(*offered & kVirtioFVersion1)) return absl::FailedPreconditionError("backend does not offer VIRTIO_F_VERSION_1");
  if (*offered & vu::kFProtocolFeatures) {
    auto pf = GetU64(vu::kGetProtocolFeatures);
    if (!pf.ok()) return pf.status();
    protocol_features_ = *pf & (vu::kPfMq | vu::kPfConfig | vu::kPfReplyAck);
    st = Send(vu::EncodeU64(vu::kSetProtocolFeatures, 0, protocol_features_));
    if (!st.ok()) return st;
  }
  if (protocol_features_ & vu::kPfMq) {
    auto n = GetU64(vu::kGetQueueNum);
    if (!n.ok()) return n.status();
    max_queues_ = static_cast<uint16_t>(std::min<uint64_t>(*n, 1024));
  }
  uint64_t want = kVirtioFVersion1 | kVirtioBlkFFlush | kVirtioBlkFSegMax | kVirtioBlkFSizeMax |
                  kVirtioBlkFBlkSize | kVirtioBlkFMq | kVirtioBlkFRo;
  if (opts_.event_idx) want |= kVirtioFRingEventIdx;
  if (opts_.indirect) want |= kVirtioFRingIndirectDesc;
  features_ = *offered & want;
  uint64_t set = features_ | (*offered & vu::kFProtocolFeatures);
  st = SendAcked(vu::kSetFeatures, vu::EncodeU64(vu::kSetFeatures, 0, set));
  if (!st.ok()) return st;
  if (protocol_features_ & vu::kPfConfig) {
    st = Send(vu::EncodeGetConfig(0, kBlkConfigBytes));
    if (!st.ok()) return st;
    auto p = Receive(vu::kGetConfig, 12, 12 + 256);
    if (!p.ok()) return p.status();
    auto bytes = vu::DecodeConfig(*p, kBlkConfigBytes);
    if (!bytes.ok()) return bytes.status();
    auto cfg = ParseBlkConfig(*bytes, features_);
    if (!cfg.ok()) return cfg.status();
    config_ = *cfg;
  } else {
    return absl::FailedPreconditionError("backend lacks VHOST_USER_PROTOCOL_F_CONFIG: cannot read the capacity");
  }
  if (features_ & kVirtioBlkFMq) max_queues_ = std::min<uint16_t>(max_queues_, config_.num_queues);
  if (opts_.num_queues > max_queues_) {
    return absl::InvalidArgumentError(absl::StrCat(opts_.num_queues, " queues requested, backend offers ", max_queues_,
                                                   " (qemu-storage-daemon: --export ...,num-queues=N)"));
  }
  kick_fds_.assign(opts_.num_queues, -1);
  call_fds_.assign(opts_.num_queues, -1);
  return absl::OkStatus();
}

absl::StatusOr<uint8_t*> VhostUserBlk::AllocateDma(size_t bytes) {
  if (mem_) return absl::FailedPreconditionError("DMA memory already allocated");
  auto m = MemfdMemory::Create(bytes, "vkick-blk");
  if (!m.ok()) return m.status();
  mem_.emplace(*std::move(m));
  // One region; guest "physical" address = our virtual address, so the
  // descriptors and the vring addresses both carry plain pointers.
  vu::MemRegion r{reinterpret_cast<uint64_t>(mem_->data()), mem_->size(), reinterpret_cast<uint64_t>(mem_->data()), 0};
  absl::Status st = SendAcked(vu::kSetMemTable, vu::EncodeMemTable(0, {&r, 1}), mem_->fd());
  if (!st.ok()) return st;
  return mem_->data();
}

absl::Status VhostUserBlk::StartQueue(uint16_t q, const QueueAddresses& a) {
  if (q >= opts_.num_queues) return absl::InvalidArgumentError("queue index out of range");
  absl::Status st = SendAcked(vu::kSetVringNum, vu::EncodeVringState(vu::kSetVringNum, 0, q, a.size));
  if (st.ok()) st = SendAcked(vu::kSetVringBase, vu::EncodeVringState(vu::kSetVringBase, 0, q, 0));
  if (st.ok()) {
    vu::VringAddr addr{q, 0, a.desc_iova, a.used_iova, a.avail_iova, 0};
    st = SendAcked(vu::kSetVringAddr, vu::EncodeVringAddr(0, addr));
  }
  if (!st.ok()) return st;
  kick_fds_[q] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (kick_fds_[q] < 0) return Errno(errno, "eventfd (kick)");
  st = SendAcked(vu::kSetVringKick, vu::EncodeU64(vu::kSetVringKick, 0, q), kick_fds_[q]);
  if (!st.ok()) return st;
  // Always give the backend a call eventfd, also when we poll: libvhost-user
  // signals the first completion unconditionally (signalled_used_valid) and
  // panics on a missing fd. In poll mode used_event keeps it quiet after that
  // and nobody waits on the fd.
  call_fds_[q] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (call_fds_[q] < 0) return Errno(errno, "eventfd (call)");
  st = SendAcked(vu::kSetVringCall, vu::EncodeU64(vu::kSetVringCall, 0, q), call_fds_[q]);
  if (!st.ok()) return st;
  if (protocol_features_ != 0) {
    // With PROTOCOL_FEATURES negotiated rings start disabled ("Ring states").
    st = SendAcked(vu::kSetVringEnable, vu::EncodeVringState(vu::kSetVringEnable, 0, q, 1));
  }
  return st;
}

bool VhostUserBlk::Notify(uint16_t q) {
  // The kick: an 8-byte eventfd write (the syscall that stands in for a VM
  // exit, and what the host probes count on sys_enter_write).
  const uint64_t one = 1;
  ssize_t n;
  do {
    n = write(kick_fds_[q], &one, sizeof(one));
  } while (n < 0 && errno == EINTR);
  // EAGAIN: the counter is saturated, i.e. the backend already has a pending
  // kick — the device will look, nothing is lost.
  return n == sizeof(one) || (n < 0 && errno == EAGAIN);
}

void VhostUserBlk::AckInterrupt(uint16_t q) {
  uint64_t v;
  if (call_fds_[q] >= 0) (void)!read(call_fds_[q], &v, sizeof(v));
}

absl::Status VhostUserBlk::Health() {
  if (dead_) return absl::UnavailableError("vhost-user backend disconnected");
  pollfd p{sock_, POLLIN | POLLRDHUP, 0};
  int r = poll(&p, 1, 0);
  if (r > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLIN))) {
    // A backend never sends unsolicited data on this channel (no slave
    // channel negotiated): readable means EOF or garbage. Either way: gone.
    dead_ = true;
    return absl::UnavailableError(absl::StrCat("vhost-user backend disconnected (socket ", opts_.socket_path, ")"));
  }
  return absl::OkStatus();
}

}  // namespace vkick
