/* notify-guest: a tiny freestanding 32-bit multiboot guest that brings
 * virtio-pci devices (legacy or modern) to DRIVER_OK and writes an exact,
 * planned number of queue notifications ("kicks") per queue. It is the
 * ground truth for vkick's attribution tests: whatever the host counts must
 * equal the plan. See README.md for the command-line syntax.
 *
 * Kept deliberately small and branch-light: on this project's nested
 * paravirtual KVM, 32-bit guest code is emulated at ~1M instructions/s. */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* ---- port and MMIO access ---- */
static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0,%1" ::"a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0,%1" ::"a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0,%1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline u8 rd8(u32 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u32 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u32 a) { return *(volatile u32 *)a; }
static inline void wr8(u32 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u32 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u32 a, u32 v) { *(volatile u32 *)a = v; }

/* ---- serial console (COM1) and exit ---- */
#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4 /* -device isa-debug-exit,iobase=0xf4,iosize=0x04 */

static void putc(char c) {
  while (!(inb(COM1 + 5) & 0x20)) { /* wait for THR empty */ }
  outb(COM1, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void putdec(u32 v) {
  char b[11]; int i = 0;
  do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
  while (i) putc(b[--i]);
}
static void puthex(u32 v) {
  puts("0x");
  int started = 0;
  for (int s = 28; s >= 0; s -= 4) {
    u32 d = (v >> s) & 0xf;
    if (d || started || s == 0) { putc("0123456789abcdef"[d]); started = 1; }
  }
}
static void puthex2(u32 v) { putc("0123456789abcdef"[(v >> 4) & 0xf]); putc("0123456789abcdef"[v & 0xf]); }

/* QEMU exits with status (code << 1) | 1: 1 = success, 3 = guest error. */
static void __attribute__((noreturn)) qemu_exit(u32 code) {
  outl(DEBUG_EXIT_PORT, code);
  for (;;) __asm__ volatile("cli; hlt"); /* no isa-debug-exit device: just stop */
}
static void __attribute__((noreturn)) fail(const char *msg) {
  puts("ERROR: "); puts(msg); puts("\n");
  qemu_exit(1);
}

/* Waiting for the host: wait_rx (boot.S) sleeps in hlt until COM1's RX
 * interrupt. All vectors but IRQ4/IRQ7 go to fault_stub (exit status 5). */
extern void irq_stub(void), fault_stub(void), wait_rx(void);
static struct { u16 lo, sel; u8 zero, type; u16 hi; } __attribute__((packed)) idt[256];

static void irq_init(void) {
  u16 cs;
  __asm__ volatile("mov %%cs,%0" : "=r"(cs));
  for (int i = 0; i < 256; i++) {
    u32 a = (i == 0x0c || i == 0x0f) ? (u32)irq_stub : (u32)fault_stub;
    idt[i].lo = (u16)a; idt[i].sel = cs; idt[i].zero = 0;
    idt[i].type = 0x8e; /* present, ring 0, 32-bit interrupt gate (clears IF) */
    idt[i].hi = (u16)(a >> 16);
  }
  struct { u16 limit; u32 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u32)idt };
  __asm__ volatile("lidt %0" ::"m"(idtr));
  outb(0x21, (u8)~(1u << 4)); /* master PIC (vector base 0x08 from the BIOS): only IRQ4 */
  outb(0xa1, 0xff);           /* slave PIC: nothing */
  outb(COM1 + 1, 0x01);       /* IER: interrupt on received data */
  outb(COM1 + 4, 0x0b);       /* MCR: DTR, RTS, OUT2 (gates the IRQ line) */
}

/* Block until the host sends byte `want` on COM1. While waiting for 'g',
 * each 'c' writes one canary notify (see README.md). */
struct dev;
static struct dev *canary; /* canary=SLOT, see parse_cmdline */
static void notify(struct dev *d, u32 q);
static void wait_serial_byte(char want) {
  for (;;) {
    wait_rx();
    char c = (char)inb(COM1);
    if (c == want) return;
    if (c == 'c' && canary) { notify(canary, 0); puts("CANARY\n"); }
  }
}

/* ---- PCI configuration space (mechanism #1) ---- */
static u32 pci_addr(u32 dev, u32 reg) { return 0x80000000u | (dev << 11) | (reg & 0xfc); }
static u32 pci_rd32(u32 dev, u32 reg) { outl(0xcf8, pci_addr(dev, reg)); return inl(0xcfc); }
static u16 pci_rd16(u32 dev, u32 reg) { outl(0xcf8, pci_addr(dev, reg)); return inw(0xcfc + (reg & 2)); }
static u8 pci_rd8(u32 dev, u32 reg) { outl(0xcf8, pci_addr(dev, reg)); return inb(0xcfc + (reg & 3)); }
static void pci_wr16(u32 dev, u32 reg, u16 v) { outl(0xcf8, pci_addr(dev, reg)); outw(0xcfc + (reg & 2), v); }

/* ---- the plan (from the multiboot command line) ---- */
#define MAX_DEVS 8
#define MAX_QUEUES 8    /* per device */
#define MAX_RINGS 24    /* queues set up across all devices */
#define RING_BYTES (3 * 4096) /* legacy layout for queue size <= 256 */

struct dev {
  u32 slot;              /* PCI device number on bus 0 */
  u32 nplanned;          /* queues with a planned count */
  u32 plan[MAX_QUEUES];  /* notifies to write per queue */
  u32 sent[MAX_QUEUES];
  int found, legacy;
  u32 nqueues;           /* queues set up */
  u16 io;                /* legacy: I/O BAR0 base */
  u32 common, notify, mult; /* modern: addresses of the capabilities */
  u32 qaddr[MAX_QUEUES]; /* modern: per-queue notify address */
};

static struct dev devs[MAX_DEVS];
static u32 ndevs;
static int go_serial, end_serial;
static u8 rings[MAX_RINGS][RING_BYTES] __attribute__((aligned(4096)));
static u32 nrings;

static int is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
static u32 hexval(char c) { return c <= '9' ? (u32)(c - '0') : (u32)((c | 0x20) - 'a' + 10); }
static int prefix(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }

/* Tokens (space separated; unknown tokens, like the kernel path QEMU puts
 * first, are ignored):
 *   dev=SLOT:N0,N1,...   device at PCI 00:SLOT.0 (hex), N_i notifies to queue i
 *   go=serial            after DRIVER_OK print READY, wait for 'g' on COM1
 *   end=serial           after DONE wait for 'q' on COM1 before exiting
 *   canary=SLOT          set up that device too; while waiting for 'g', each
 *                        'c' on COM1 writes one notify to its queue 0 */
static void parse_cmdline(const char *s) {
  while (*s) {
    while (*s == ' ') s++;
    if (prefix(s, "dev=")) {
      if (ndevs == MAX_DEVS) fail("too many dev= entries");
      struct dev *d = &devs[ndevs++];
      s += 4;
      if (!is_hex(*s)) fail("dev=: expected a hex PCI slot");
      while (is_hex(*s)) d->slot = d->slot * 16 + hexval(*s++);
      if (d->slot > 31) fail("dev=: slot > 0x1f");
      if (*s == ':') {
        s++;
        for (;;) {
          if (d->nplanned == MAX_QUEUES) fail("dev=: too many queues");
          if (*s < '0' || *s > '9') fail("dev=: expected a decimal count");
          u32 n = 0;
          while (*s >= '0' && *s <= '9') n = n * 10 + (u32)(*s++ - '0');
          d->plan[d->nplanned++] = n;
          if (*s != ',') break;
          s++;
        }
      }
    } else if (prefix(s, "canary=")) {
      if (ndevs == MAX_DEVS) fail("too many devices");
      canary = &devs[ndevs++];
      s += 7;
      if (!is_hex(*s)) fail("canary=: expected a hex PCI slot");
      while (is_hex(*s)) canary->slot = canary->slot * 16 + hexval(*s++);
      if (canary->slot > 31) fail("canary=: slot > 0x1f");
    } else if (prefix(s, "go=serial")) {
      go_serial = 1; s += 9;
    } else if (prefix(s, "end=serial")) {
      end_serial = 1; s += 10;
    }
    while (*s && *s != ' ') s++;
  }
  if (!ndevs) fail("no dev= in the command line (see README.md)");
}

/* ---- virtio common ---- */
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_FAILED = 0x80 };

static u32 alloc_ring(void) {
  if (nrings == MAX_RINGS) fail("out of ring memory (MAX_RINGS)");
  return (u32)rings[nrings++];
}

/* Split-ring layout with 4 KiB alignment of the used ring (legacy rule; also
 * satisfies the modern alignment rules). Empty rings: we never post buffers,
 * the device just sees avail->idx == 0 on every kick. */
static u32 avail_off(u32 qsz) { return 16 * qsz; }
static u32 used_off(u32 qsz) { return (16 * qsz + 6 + 2 * qsz + 4095) & ~4095u; }

/* ---- legacy virtio-pci (I/O BAR0) ---- */
enum { L_HOST_FEATURES = 0, L_GUEST_FEATURES = 4, L_QUEUE_PFN = 8, L_QUEUE_SIZE = 12,
       L_QUEUE_SEL = 14, L_QUEUE_NOTIFY = 16, L_STATUS = 18 };

static void setup_legacy(struct dev *d, u32 bar0) {
  if (!(bar0 & 1)) fail("legacy device: BAR0 is not an I/O BAR");
  d->legacy = 1;
  d->io = (u16)(bar0 & ~3u);
  if (!d->io) fail("legacy device: BAR0 not assigned by firmware");
  u16 io = d->io;
  outb(io + L_STATUS, 0); /* reset */
  outb(io + L_STATUS, S_ACK);
  outb(io + L_STATUS, S_ACK | S_DRIVER);
  (void)inl(io + L_HOST_FEATURES);
  outl(io + L_GUEST_FEATURES, 0); /* nothing negotiated: we post no requests */
  for (u32 q = 0; q < MAX_QUEUES; q++) {
    outw(io + L_QUEUE_SEL, (u16)q);
    u32 qsz = inw(io + L_QUEUE_SIZE);
    if (!qsz) break; /* no such queue */
    if (qsz > 256) fail("legacy queue size > 256");
    u32 ring = alloc_ring();
    outl(io + L_QUEUE_PFN, ring >> 12);
    d->nqueues = q + 1;
  }
  outb(io + L_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
}

/* ---- modern virtio-pci (vendor capabilities, memory BAR) ---- */
enum { C_DFSEL = 0, C_DF = 4, C_GFSEL = 8, C_GF = 12, C_NUMQ = 18, C_STATUS = 20,
       C_QSEL = 22, C_QSIZE = 24, C_QMSIX = 26, C_QENABLE = 28, C_QNOFF = 30,
       C_QDESC = 32, C_QDRIVER = 40, C_QDEVICE = 48 };
enum { CAP_COMMON = 1, CAP_NOTIFY = 2 };

static u32 bar_address(u32 slot, u32 bar) {
  u32 lo = pci_rd32(slot, 0x10 + 4 * bar);
  if (lo & 1) fail("modern capability points at an I/O BAR");
  if (((lo >> 1) & 3) == 2 && pci_rd32(slot, 0x14 + 4 * bar) != 0)
    fail("64-bit BAR above 4 GiB: unreachable for a 32-bit guest");
  u32 a = lo & ~0xfu;
  if (!a) fail("modern BAR not assigned by firmware");
  return a;
}

static int find_modern_caps(struct dev *d) {
  if (!(pci_rd16(d->slot, 0x06) & 0x10)) return 0; /* no capability list */
  u32 p = pci_rd8(d->slot, 0x34) & 0xfc;
  for (int guard = 0; p && guard < 48; guard++) {
    u8 id = pci_rd8(d->slot, p);
    if (id == 0x09) { /* vendor-specific: a virtio_pci_cap */
      u8 type = pci_rd8(d->slot, p + 3);
      u8 bar = pci_rd8(d->slot, p + 4);
      u32 off = pci_rd32(d->slot, p + 8);
      if (bar <= 5 && type == CAP_COMMON && !d->common)
        d->common = bar_address(d->slot, bar) + off;
      if (bar <= 5 && type == CAP_NOTIFY && !d->notify) {
        d->notify = bar_address(d->slot, bar) + off;
        d->mult = pci_rd32(d->slot, p + 16);
      }
    }
    p = pci_rd8(d->slot, p + 1) & 0xfc;
  }
  return d->common && d->notify;
}

static void setup_modern(struct dev *d) {
  u32 c = d->common;
  wr8(c + C_STATUS, 0); /* reset, and wait until the device says it is done */
  for (int i = 0; rd8(c + C_STATUS) != 0; i++)
    if (i > 100000) fail("modern device does not reset");
  wr8(c + C_STATUS, S_ACK);
  wr8(c + C_STATUS, S_ACK | S_DRIVER);
  wr32(c + C_DFSEL, 1);
  if (!(rd32(c + C_DF) & 1)) fail("modern device without VIRTIO_F_VERSION_1");
  wr32(c + C_GFSEL, 0);
  wr32(c + C_GF, 0);
  wr32(c + C_GFSEL, 1);
  wr32(c + C_GF, 1); /* VERSION_1 only */
  wr8(c + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
  if (!(rd8(c + C_STATUS) & S_FEATURES_OK)) fail("device refused FEATURES_OK");
  u32 nq = rd16(c + C_NUMQ);
  if (nq > MAX_QUEUES) nq = MAX_QUEUES;
  for (u32 q = 0; q < nq; q++) {
    wr16(c + C_QSEL, (u16)q);
    u32 qsz = rd16(c + C_QSIZE);
    if (!qsz) continue;
    if (qsz > 256) { qsz = 256; wr16(c + C_QSIZE, 256); }
    u32 ring = alloc_ring();
    wr32(c + C_QDESC, ring);          wr32(c + C_QDESC + 4, 0);
    wr32(c + C_QDRIVER, ring + avail_off(qsz)); wr32(c + C_QDRIVER + 4, 0);
    wr32(c + C_QDEVICE, ring + used_off(qsz));  wr32(c + C_QDEVICE + 4, 0);
    wr16(c + C_QENABLE, 1);
    d->qaddr[q] = d->notify + rd16(c + C_QNOFF) * d->mult;
    d->nqueues = q + 1;
  }
  wr8(c + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  if (rd8(c + C_STATUS) & S_FAILED) fail("device set FAILED after DRIVER_OK");
}

static void notify(struct dev *d, u32 q) {
  if (d->legacy) outw(d->io + L_QUEUE_NOTIFY, (u16)q);
  else wr16(d->qaddr[q], (u16)q);
}

/* ---- main ---- */
struct multiboot_info { u32 flags, mem_lower, mem_upper, boot_device, cmdline; };

void guest_main(u32 magic, const struct multiboot_info *mbi) {
  puts("notify-guest: start\n");
  if (magic != 0x2BADB002) fail("not booted by a multiboot loader");
  if (!(mbi->flags & 4) || !mbi->cmdline) fail("no command line");
  parse_cmdline((const char *)mbi->cmdline);
  irq_init();

  for (u32 i = 0; i < ndevs; i++) {
    struct dev *d = &devs[i];
    u32 id = pci_rd32(d->slot, 0);
    u16 vendor = (u16)id, device = (u16)(id >> 16);
    if (vendor != 0x1af4 || device < 0x1000 || device > 0x107f) {
      puts("no virtio device at slot "); puthex2(d->slot); puts("\n");
      fail("planned device not found");
    }
    /* I/O + memory decoding + bus mastering: QEMU stops a virtio device's
     * ioeventfds while bus mastering is off. */
    pci_wr16(d->slot, 0x04, pci_rd16(d->slot, 0x04) | 0x7);
    if (device >= 0x1040 || find_modern_caps(d)) {
      if (!find_modern_caps(d)) fail("modern device without common/notify capabilities");
      setup_modern(d);
    } else {
      setup_legacy(d, pci_rd32(d->slot, 0x10));
    }
    if (d->nplanned > d->nqueues) fail("plan names more queues than the device has");
    d->found = 1;
    puts("virtio dev="); puthex2(d->slot);
    puts(d->legacy ? " mode=legacy" : " mode=modern");
    puts(" pci_id="); puthex(device);
    puts(" queues="); putdec(d->nqueues);
    if (d->legacy) { puts(" notify=pio:"); puthex(d->io + L_QUEUE_NOTIFY); }
    else { puts(" notify=mmio:"); puthex(d->notify); puts(" mult="); putdec(d->mult); }
    puts("\n");
  }

  if (go_serial) {
    puts("READY\n");
    wait_serial_byte('g');
  }

  /* Round-robin over every (device, queue) with notifies left, so that
   * writes to different queues interleave: attribution cannot get them right
   * by luck of ordering. */
  for (int more = 1; more;) {
    more = 0;
    for (u32 i = 0; i < ndevs; i++) {
      struct dev *d = &devs[i];
      for (u32 q = 0; q < d->nplanned; q++) {
        if (d->sent[q] == d->plan[q]) continue;
        notify(d, q);
        d->sent[q]++;
        more = 1;
      }
    }
  }

  u32 total = 0;
  for (u32 i = 0; i < ndevs; i++) {
    struct dev *d = &devs[i];
    for (u32 q = 0; q < d->nplanned; q++) {
      puts("sent dev="); puthex2(d->slot); puts(" q="); putdec(q);
      puts(" n="); putdec(d->sent[q]);
      if (d->legacy) { puts(" at=pio:"); puthex(d->io + L_QUEUE_NOTIFY); }
      else { puts(" at=mmio:"); puthex(d->qaddr[q]); }
      puts("\n");
      total += d->sent[q];
    }
  }
  puts("DONE total="); putdec(total); puts("\n");
  if (end_serial) wait_serial_byte('q');
  qemu_exit(0);
}
