// A minimal tracepoint program like the host probes (libbpf SEC("tracepoint/..."),
// a map), loaded by test_systemd_unit.py with the unit's capabilities.
#include <linux/bpf.h>
#define SEC(n) __attribute__((section(n), used))
struct {
  int (*type)[BPF_MAP_TYPE_ARRAY];
  int (*max_entries)[1];
  __u32 *key;
  __u64 *value;
} counts SEC(".maps");
static void *(*bpf_map_lookup_elem_)(void *, const void *) = (void *)BPF_FUNC_map_lookup_elem;
SEC("tracepoint/kvm/kvm_mmio")
int on_mmio(void *ctx) {
  __u32 k = 0;
  __u64 *v = bpf_map_lookup_elem_(&counts, &k);
  if (v) __sync_fetch_and_add(v, 1);
  return 0;
}
char LICENSE[] SEC("license") = "GPL";
