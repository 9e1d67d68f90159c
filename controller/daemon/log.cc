#include "controller/daemon/log.h"

#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace vkick {

void LogToStderr(absl::string_view line) {
  std::string out =
      absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E3S%Ez", absl::Now(),
                                    absl::LocalTimeZone()),
                   " vkickd: ", line, "\n");
  // One write(2) per line: atomic enough for stderr lines from several
  // attachment threads. A short write to a broken stderr is not worth
  // retrying.
  ssize_t unused = ::write(STDERR_FILENO, out.data(), out.size());
  (void)unused;
}

}  // namespace vkick
