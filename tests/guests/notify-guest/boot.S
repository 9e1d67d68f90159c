/* Multiboot (v1) entry. QEMU's multiboot loader (-kernel) enters here in
 * 32-bit protected mode, paging off, flat segments, EAX = 0x2BADB002 and
 * EBX = physical address of the multiboot info. We only need a stack. */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003          /* page-align modules, want mem info */
        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .bss
        .align 16
stack_bottom:
        .skip 16384
stack_top:

        .section .text
        .globl _start
_start:
        cli
        mov $stack_top, %esp
        push %ebx                          /* multiboot info */
        push %eax                          /* multiboot magic */
        call guest_main
        /* guest_main never returns (it exits QEMU); halt if it does. */
1:      hlt
        jmp 1b

        /* Every interrupt vector lands here: acknowledge the PIC and return.
         * The guest only takes interrupts to wake from hlt (COM1 RX). */
        .globl irq_stub
irq_stub:
        push %eax
        mov $0x20, %al
        out %al, $0x20
        pop %eax
        iret

        .section .note.GNU-stack,"",@progbits
