// Opens, loads and attaches every program of a BPF object with libbpf; exit 0
// only if all of that worked (test_systemd_unit.py).
#include <bpf/libbpf.h>
#include <stdio.h>
int main(int argc, char **argv) {
  if (argc != 2) return 2;
  libbpf_set_print(NULL);
  struct bpf_object *o = bpf_object__open_file(argv[1], NULL);
  if (!o || libbpf_get_error(o)) { puts("open failed"); return 3; }
  int e = bpf_object__load(o);
  if (e) { printf("load failed: %d\n", e); return 4; }
  struct bpf_program *p;
  bpf_object__for_each_program(p, o) {
    struct bpf_link *l = bpf_program__attach(p);
    if (!l || libbpf_get_error(l)) { printf("attach %s failed\n", bpf_program__name(p)); return 5; }
  }
  puts("loaded and attached");
  return 0;
}
