# bpf_object(<name> <source.bpf.c> [<header dependency>...] [CFLAGS <flag>...])
#
# The libbpf-bootstrap pattern: compile <source> with clang for the BPF target
# against a vmlinux.h dumped from this kernel's BTF, then generate
# <name>.skel.h with `bpftool gen skeleton`. Everything lands in the build tree.
# Creates an INTERFACE target <name>_skel that adds the include directory and
# links libbpf, so C++ code just does #include "<name>.skel.h".
# CFLAGS: extra clang flags for this object only (e.g. -mcpu=v3 for atomics
# that return a value, which clang 14's default BPF cpu v1 cannot emit).

find_program(BPF_CLANG NAMES clang clang-14 REQUIRED)
find_program(BPFTOOL NAMES bpftool PATHS /usr/sbin /sbin REQUIRED)

set(VKICK_BTF_SOURCE "/sys/kernel/btf/vmlinux" CACHE FILEPATH
    "Kernel BTF used to generate vmlinux.h for the BPF programs")
set(VKICK_VMLINUX_H ${VKICK_GEN_DIR}/vmlinux/vmlinux.h)

add_custom_command(
  OUTPUT ${VKICK_VMLINUX_H}
  COMMAND ${CMAKE_COMMAND} -E make_directory ${VKICK_GEN_DIR}/vmlinux
  COMMAND ${BPFTOOL} btf dump file ${VKICK_BTF_SOURCE} format c > ${VKICK_VMLINUX_H}
  COMMENT "Generating vmlinux.h from ${VKICK_BTF_SOURCE}"
  VERBATIM)
add_custom_target(vmlinux_h DEPENDS ${VKICK_VMLINUX_H})

function(bpf_object name src)
  cmake_parse_arguments(B "" "" "CFLAGS" ${ARGN})
  set(obj ${VKICK_GEN_DIR}/${name}.bpf.o)
  set(skel ${VKICK_GEN_DIR}/${name}.skel.h)
  get_filename_component(src_abs ${src} ABSOLUTE)
  add_custom_command(
    OUTPUT ${obj}
    COMMAND ${BPF_CLANG} -g -O2 -target bpf -D__TARGET_ARCH_x86 -Wall
            -Wno-unused-function -Wno-compare-distinct-pointer-types
            -I${VKICK_GEN_DIR}/vmlinux -I${CMAKE_SOURCE_DIR}
            # <asm/...> for libbpf's usdt.bpf.h (linux/errno.h), as libbpf-bootstrap does.
            -idirafter /usr/include/${CMAKE_LIBRARY_ARCHITECTURE}
            ${B_CFLAGS}
            -c ${src_abs} -o ${obj}
    DEPENDS ${src_abs} ${VKICK_VMLINUX_H} ${B_UNPARSED_ARGUMENTS}
    IMPLICIT_DEPENDS C ${src_abs}
    COMMENT "BPF ${name}.bpf.o"
    VERBATIM)
  add_custom_command(
    OUTPUT ${skel}
    COMMAND ${BPFTOOL} gen skeleton ${obj} name ${name} > ${skel}
    DEPENDS ${obj}
    COMMENT "Skeleton ${name}.skel.h"
    VERBATIM)
  add_custom_target(${name}_skel_gen DEPENDS ${skel})
  add_library(${name}_skel INTERFACE)
  add_dependencies(${name}_skel ${name}_skel_gen)
  target_include_directories(${name}_skel INTERFACE ${VKICK_GEN_DIR})
  target_link_libraries(${name}_skel INTERFACE PkgConfig::LIBBPF)
endfunction()
