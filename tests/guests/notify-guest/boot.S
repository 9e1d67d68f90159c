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

/* wait_rx(): return once COM1 has a received byte, sleeping in hlt
 * instead of spinning (a spinning guest costs a whole host core under TCG).
 * IF is set only inside "sti; hlt": a byte that arrives between the LSR
 * check and hlt still wakes us (its IRQ is taken right after sti).
 *
 * The RX interrupt handler does not return with iret: this host's
 * paravirtual KVM fails to emulate a 32-bit iret (QEMU stops with
 * "internal-error"). It acknowledges the PIC, drops the interrupt frame by
 * reloading the stack pointer saved here and jumps back into the loop; the
 * interrupt gate already cleared IF. */
        .section .bss
        .align 4
wait_esp:
        .skip 4

        .section .text
        .globl wait_rx
wait_rx:
        push %ebx
        push %esi
        push %edi
        push %ebp
        mov %esp, wait_esp
wait_rx_loop:
        mov $0x3fd, %dx
        in %dx, %al
        test $1, %al
        jnz 2f
        sti
        hlt
        cli                 /* woken without our IRQ (NMI/SMI): look again */
        jmp wait_rx_loop
2:      pop %ebp
        pop %edi
        pop %esi
        pop %ebx
        ret

        /* IRQ4 (COM1, vector 0x0c with the BIOS's PIC base 0x08) and the
         * PIC's spurious IRQ7 (vector 0x0f) only ever arrive inside wait_rx. */
        .globl irq_stub
irq_stub:
        mov $0x20, %al
        out %al, $0x20      /* EOI to the master PIC */
        mov wait_esp, %esp
        jmp wait_rx_loop

        /* Any other vector is a guest bug (a CPU exception): exit QEMU with
         * status 5 through isa-debug-exit instead of hanging. */
        .globl fault_stub
fault_stub:
        mov $0xf4, %dx
        mov $2, %eax
        out %eax, %dx
3:      hlt
        jmp 3b

        .section .note.GNU-stack,"",@progbits
