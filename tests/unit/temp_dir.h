// A temporary directory for one test, removed with everything in it when the
// object goes. One copy for every unit test that needs files on disk.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace vkick::testing {

class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "vkick-test") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    const char* d = ::mkdtemp(tmpl.data());
    path_ = d != nullptr ? d : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  // Empty when mkdtemp failed (the tests that use it then fail on their files).
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace vkick::testing
