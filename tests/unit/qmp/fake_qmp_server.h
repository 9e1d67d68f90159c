// A fake QMP server for tests: listens on a unix socket in a thread, greets
// like QEMU 7.2, and answers each command through a handler. The handler
// returns the whole reply object without "id" (added here), or a raw line
// (to send garbage), and may push events before the reply.
#pragma once

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"

namespace vkick::testing {

struct FakeReply {
  nlohmann::json reply;            // {"return": ...} or {"error": ...}; id added
  std::string raw;                 // if non-empty, sent verbatim instead
  std::vector<std::string> events_before;  // event lines sent first
  bool hang = false;               // never answer
};

class FakeQmpServer {
 public:
  using Handler = std::function<FakeReply(const std::string& command, const nlohmann::json& args)>;

  FakeQmpServer(std::string path, Handler handler)
      : path_(std::move(path)), handler_(std::move(handler)) {
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a = {};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
    ok_ = ::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
          ::listen(listener_, 4) == 0;
    thread_ = std::thread([this] { Run(); });
  }
  ~FakeQmpServer() {
    stop_ = true;
    ::shutdown(listener_, SHUT_RDWR);
    {
      std::lock_guard<std::mutex> l(mu_);
      if (conn_ >= 0) ::shutdown(conn_, SHUT_RDWR);
    }
    thread_.join();
    ::close(listener_);
    if (conn_ >= 0) ::close(conn_);
    ::unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  // Sends an event line now (from the test thread).
  void SendEvent(const std::string& line) {
    std::lock_guard<std::mutex> l(mu_);
    if (conn_ >= 0) SendLine(line);
  }
  // Closes the connection (the VM "went away").
  void Disconnect() {
    std::lock_guard<std::mutex> l(mu_);
    if (conn_ >= 0) ::shutdown(conn_, SHUT_RDWR);
  }
  std::vector<std::string> commands() {
    std::lock_guard<std::mutex> l(mu_);
    return commands_;
  }

 private:
  void SendLine(const std::string& s) {
    std::string line = s + "\r\n";
    (void)!::send(conn_, line.data(), line.size(), MSG_NOSIGNAL);
  }
  void Run() {
    int c = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) return;
    {
      std::lock_guard<std::mutex> l(mu_);
      conn_ = c;
      SendLine(R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}})");
    }
    std::string buf;
    while (!stop_) {
      char chunk[4096];
      ssize_t n = ::recv(c, chunk, sizeof(chunk), 0);
      if (n <= 0) return;
      buf.append(chunk, static_cast<size_t>(n));
      size_t nl;
      while ((nl = buf.find('\n')) != std::string::npos) {
        nlohmann::json req = nlohmann::json::parse(buf.substr(0, nl), nullptr, false);
        buf.erase(0, nl + 1);
        std::string cmd = req.value("execute", "");
        nlohmann::json args = req.contains("arguments") ? req["arguments"] : nlohmann::json();
        FakeReply r;
        if (cmd == "qmp_capabilities") {
          r.reply = {{"return", nlohmann::json::object()}};
        } else {
          r = handler_(cmd, args);
        }
        std::lock_guard<std::mutex> l(mu_);
        commands_.push_back(cmd);
        for (const std::string& e : r.events_before) SendLine(e);
        if (r.hang) continue;
        if (!r.raw.empty()) {
          SendLine(r.raw);
          continue;
        }
        r.reply["id"] = req["id"];
        SendLine(r.reply.dump());
      }
    }
  }

  std::string path_;
  Handler handler_;
  int listener_ = -1;
  int conn_ = -1;
  bool ok_ = false;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<std::string> commands_;
  std::thread thread_;
};

}  // namespace vkick::testing
