#include "controller/probes/exit_reasons.h"

// SVM_EXIT_REASONS names exception exits by vector, using the kernel-internal
// <asm/trapnr.h> constants; they are architectural (SDM vol. 3, 6.3.1).
#define DE_VECTOR 0
#define DB_VECTOR 1
#define BP_VECTOR 3
#define OF_VECTOR 4
#define BR_VECTOR 5
#define UD_VECTOR 6
#define NM_VECTOR 7
#define DF_VECTOR 8
#define TS_VECTOR 10
#define NP_VECTOR 11
#define SS_VECTOR 12
#define GP_VECTOR 13
#define PF_VECTOR 14
#define MF_VECTOR 16
#define AC_VECTOR 17
#define MC_VECTOR 18
#define XM_VECTOR 19

#include <asm/svm.h>
#include <asm/vmx.h>

#include <string>

namespace vkick {
namespace {

struct Entry {
  long long code;  // SVM_EXIT_ERR is -1; the vmgexit codes exceed INT32_MAX
  const char* name;
};

// Straight from the uapi headers, so new kernels' reasons come with the
// Debian linux-libc-dev package, not with a hand-kept table.
constexpr Entry kVmx[] = {VMX_EXIT_REASONS};
constexpr Entry kSvm[] = {SVM_EXIT_REASONS};

template <size_t N>
const char* Find(const Entry (&table)[N], uint32_t reason) {
  for (const Entry& e : table) {
    if (static_cast<uint32_t>(e.code) == reason) return e.name;
  }
  return nullptr;
}

}  // namespace

std::string ExitReasonName(uint32_t isa, uint32_t reason) {
  if (isa == kKvmIsaVmx) {
    const uint32_t basic = reason & 0xffff;
    const char* name = Find(kVmx, basic);
    std::string out = (reason & VMX_EXIT_REASONS_FAILED_VMENTRY) ? "FAILED_VMENTRY_" : "";
    return out + (name ? std::string(name) : "unknown_" + std::to_string(basic));
  }
  if (isa == kKvmIsaSvm) {
    const char* name = Find(kSvm, reason);
    return name ? std::string(name) : "unknown_" + std::to_string(reason);
  }
  return "unknown_isa" + std::to_string(isa) + "_" + std::to_string(reason);
}

}  // namespace vkick
