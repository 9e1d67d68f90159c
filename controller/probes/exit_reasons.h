// Decoding of kvm:kvm_exit's raw exit reasons to names, for VMX (Intel) and
// SVM (AMD). Pure and dependency-free: the names are the kernel's own
// (uapi <asm/vmx.h> VMX_EXIT_REASONS, <asm/svm.h> SVM_EXIT_REASONS), the same
// strings the tracepoint prints, so `perf kvm stat` and vkick agree.
#pragma once

#include <cstdint>
#include <string>

namespace vkick {

// The tracepoint's `isa` field (arch/x86/kvm/trace.h).
inline constexpr uint32_t kKvmIsaVmx = 1;
inline constexpr uint32_t kKvmIsaSvm = 2;

// VMX: the basic reason (low 16 bits) names the exit, like the tracepoint
// does; the "failed VM-entry" bit (31) adds a "FAILED_VMENTRY_" prefix.
// SVM: the full exit code ("npf", "io", "invalid_guest_state" for -1, ...).
// Anything else: "unknown_<n>" (n the decoded reason; for an unknown isa,
// "unknown_isa<isa>_<reason>"). The label set is bounded by the exit map's
// size (VKICK_MAX_EXIT_KEYS) and, for known ISAs, by 2^16 (VMX).
std::string ExitReasonName(uint32_t isa, uint32_t reason);

}  // namespace vkick
