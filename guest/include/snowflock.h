/*
 * snowflock.h: the guest SDK for flock images written in C.
 *
 * The same ABI as the abi/ crate (docs/hypercalls.md is the prose): constants,
 * the boot information and panic report layouts, one inline wrapper per
 * hypercall, SnowFlock's clone API, argument parsing and a small printf.
 *
 * Build with gcc -ffreestanding (see docs/hypercalls.md, "Building a guest").
 * In exactly one source file, define SNOWFLOCK_IMPLEMENTATION before including
 * this header: that file then gets the entry point `_start` (which validates the
 * boot information and calls `int main(void)`, whose return value becomes the
 * EXIT code) and the memcpy/memmove/memset/memcmp that gcc may emit calls to.
 *
 * Hosted programs (a static Linux executable built with `gcc -static`, run as
 * a Linux-ABI guest) use the same header for the clone API: SNOWFLOCK_HOSTED,
 * which defaults to __STDC_HOSTED__ (1 unless -ffreestanding), leaves out
 * `_start` and the memory functions (libc has them), and makes sf_clone,
 * sf_checkpoint, sf_child_exit and sf_exit_vm flush stdio first, so that
 * output buffered before a clone point is printed once, and a clone's
 * output is not lost when it ends; sf_child_exit and sf_exit_vm also have
 * the personality write the program's /out to the host, as exit() does.
 */
#ifndef SNOWFLOCK_H
#define SNOWFLOCK_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#ifndef SNOWFLOCK_HOSTED
#define SNOWFLOCK_HOSTED __STDC_HOSTED__
#endif
/* The personality's private system call that flushes its output and
 * writes /out to the host (abi: linux::files::SYSCALL_FINISH). */
#define SF_SYSCALL_FINISH 511
#if SNOWFLOCK_HOSTED
#include <stdio.h>
#include <unistd.h>
#define SF_FLUSH_STDIO() fflush(NULL)
#define SF_FINISH() (fflush(NULL), (void)syscall(SF_SYSCALL_FINISH))
#else
#define SF_FLUSH_STDIO() ((void)0)
#define SF_FINISH() ((void)0)
#endif

/* ---- ABI constants (must match the abi/ crate) ---- */
#define SF_ABI_VERSION 2
#define SF_HYPERCALL_PORT 0x5f0
#define SF_EXCEPTION_PORT 0x5f1
#define SF_PAGE_SIZE 0x1000
#define SF_IMAGE_BASE 0x200000
#define SF_BOOT_INFO_ADDR 0x60000
#define SF_STACK_SIZE 0x800000
#define SF_STACK_GUARD_SIZE 0x200000
#define SF_MIN_MEM_SIZE 0x2000000
#define SF_BOOT_INFO_MAGIC 0x3130544f4f424653ULL /* "SFBOOT01" little-endian */
#define SF_MAX_CMDLINE 3072
#define SF_MAX_TRANSFER 0x1000000

/* Hypercall numbers (eax). Arguments in rdi, rsi, r8, r9; results in rax (rdx). */
#define SF_NR_CONSOLE_WRITE 1
#define SF_NR_EXIT 2
#define SF_NR_PANIC 3
#define SF_NR_REQUEST_TICKET 4
#define SF_NR_CLONE 5
#define SF_NR_CHECKPOINT 6
#define SF_NR_CREATE_CLONES 7
#define SF_NR_CHILD_EXIT 8
#define SF_NR_JOIN 9
#define SF_NR_CHILD_RESULT 10
#define SF_NR_KILL 11
#define SF_NR_TIME_NS 12
#define SF_NR_REPORT_PAGES 13

/* REPORT_PAGES: at most this many runs per call; the kinds of report. */
#define SF_MAX_REPORT_RUNS 4096
#define SF_PAGE_REPORT_FREE 0
#define SF_PAGE_REPORT_FRESH 1

/* REQUEST_TICKET flags: the children will write much of their state (local
 * clones then get memory of their own instead of a copy-on-write view). */
#define SF_TICKET_CHILDREN_WRITE 1

/* CHILD_RESULT status. */
#define SF_CHILD_EXITED 0
#define SF_CHILD_FAILED 1
#define SF_CHILD_KILLED 2
#define SF_CHILD_LOST 3

/* Errors come back as -errno in rax. */
#define SF_EPERM 1
#define SF_ENOENT 2
#define SF_EAGAIN 11
#define SF_EBUSY 16
#define SF_EINVAL 22

typedef struct sf_boot_info {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t reserved;
    uint64_t mem_size;
    uint64_t heap_start;
    uint64_t heap_end;
    uint64_t stack_top;
    uint64_t tsc_khz;
    uint64_t cmdline_ptr;
    uint64_t cmdline_len;
} sf_boot_info;
_Static_assert(sizeof(sf_boot_info) == 72, "sf_boot_info layout");

typedef struct sf_panic_report {
    uint64_t message_ptr;
    uint64_t message_len;
    uint64_t file_ptr;
    uint64_t file_len;
    uint32_t line;
    uint32_t column;
} sf_panic_report;
_Static_assert(sizeof(sf_panic_report) == 40, "sf_panic_report layout");

/* One run of whole heap pages for REPORT_PAGES: start page aligned, len a
 * non-zero multiple of SF_PAGE_SIZE. */
typedef struct sf_page_run {
    uint64_t start;
    uint64_t len;
} sf_page_run;
_Static_assert(sizeof(sf_page_run) == 16, "sf_page_run layout");

/* ---- Raw hypercalls ---- */

/* Issues hypercall `nr`; returns rax and stores rdx in *rdx_out (if not NULL).
 * The VMM preserves every other register and may access memory through
 * pointer arguments, hence the "memory" clobber. */
static inline uint64_t sf_hypercall(uint32_t nr, uint64_t a0, uint64_t a1, uint64_t a2,
                                    uint64_t a3, uint64_t *rdx_out)
{
    register uint64_t r8 __asm__("r8") = a2;
    register uint64_t r9 __asm__("r9") = a3;
    uint64_t rax = nr;
    uint64_t rdx = SF_HYPERCALL_PORT;
    __asm__ volatile("outl %%eax, %%dx"
                     : "+a"(rax), "+d"(rdx)
                     : "D"(a0), "S"(a1), "r"(r8), "r"(r9)
                     : "memory");
    if (rdx_out)
        *rdx_out = rdx;
    return rax;
}

/* For EXIT and PANIC: should the VMM resume the guest anyway, ud2 ends it. */
__attribute__((noreturn)) static inline void sf_hypercall_noreturn(uint32_t nr, uint64_t a0)
{
    __asm__ volatile("outl %%eax, %%dx\n\tud2" : : "a"(nr), "d"(SF_HYPERCALL_PORT), "D"(a0) : "memory");
    __builtin_unreachable();
}

/* rax as a signed result: negative values are -errno. */
static inline int64_t sf_result(uint64_t rax)
{
    return rax > (uint64_t)-4096 ? (int64_t)rax : (int64_t)(rax & INT64_MAX);
}

static inline const sf_boot_info *sf_boot(void)
{
    return (const sf_boot_info *)(uintptr_t)SF_BOOT_INFO_ADDR;
}

static inline uint64_t sf_console_write(const void *buf, uint64_t len)
{
    return sf_hypercall(SF_NR_CONSOLE_WRITE, (uintptr_t)buf, len, 0, 0, NULL);
}

/* Ends this VM (a child that calls it counts as failed). */
__attribute__((noreturn)) static inline void sf_exit_vm(int code)
{
    SF_FINISH();
    sf_hypercall_noreturn(SF_NR_EXIT, (uint32_t)code);
}

static inline uint64_t sf_strlen(const char *s)
{
    uint64_t n = 0;
    while (s[n])
        n++;
    return n;
}

__attribute__((noreturn)) static inline void sf_panic_at(const char *msg, const char *file,
                                                         uint32_t line)
{
    sf_panic_report r = {(uintptr_t)msg, sf_strlen(msg), (uintptr_t)file, sf_strlen(file), line, 0};
    sf_hypercall_noreturn(SF_NR_PANIC, (uintptr_t)&r);
}
#define SF_PANIC(msg) sf_panic_at((msg), __FILE__, __LINE__)

static inline uint64_t sf_time_ns(void)
{
    return sf_hypercall(SF_NR_TIME_NS, 0, 0, 0, 0, NULL);
}

/* Tells the VMM that these heap pages hold nothing worth copying to a clone:
 * SF_PAGE_REPORT_FREE (free right now; used by a CLONE or CHECKPOINT that is
 * the next hypercall) or SF_PAGE_REPORT_FRESH (just handed out in a clone).
 * 0, or -SF_EINVAL for bad runs, count or kind. */
static inline int64_t sf_report_pages(const sf_page_run *runs, uint64_t count, uint64_t kind)
{
    return sf_result(sf_hypercall(SF_NR_REPORT_PAGES, (uintptr_t)runs, count, kind, 0, NULL));
}

/* ---- The clone API. Every int64_t result is the value, or -errno. ---- */

/* Reserves up to n clones, with SF_TICKET_* flags (0: none): the ticket id;
 * *granted = m <= n (may be 0). */
static inline int64_t sf_request_ticket_with(uint32_t n, uint64_t flags, uint32_t *granted)
{
    uint64_t m;
    int64_t ticket = sf_result(sf_hypercall(SF_NR_REQUEST_TICKET, n, flags, 0, 0, &m));
    *granted = ticket < 0 ? 0 : (uint32_t)m;
    return ticket;
}

/* Reserves up to n clones: the ticket id; *granted = m <= n (may be 0). */
static inline int64_t sf_request_ticket(uint32_t n, uint32_t *granted)
{
    return sf_request_ticket_with(n, 0, granted);
}

/* 0 in the parent, 1..=m in each child (like fork()). */
static inline int64_t sf_clone(int64_t ticket)
{
    SF_FLUSH_STDIO();
    return sf_result(sf_hypercall(SF_NR_CLONE, (uint64_t)ticket, 0, 0, 0, NULL));
}

/* 0 in the parent (*checkpoint = its id), 1..=m in children created from it. */
static inline int64_t sf_checkpoint(uint64_t *checkpoint)
{
    SF_FLUSH_STDIO();
    return sf_result(sf_hypercall(SF_NR_CHECKPOINT, 0, 0, 0, 0, checkpoint));
}

static inline int64_t sf_create_clones(uint64_t checkpoint, int64_t ticket)
{
    return sf_result(sf_hypercall(SF_NR_CREATE_CLONES, checkpoint, (uint64_t)ticket, 0, 0, NULL));
}

/* Ends this child with `len` result bytes; returns -errno only if not a clone. */
static inline int64_t sf_child_exit(const void *result, uint64_t len)
{
    SF_FINISH();
    return sf_result(sf_hypercall(SF_NR_CHILD_EXIT, (uintptr_t)result, len, 0, 0, NULL));
}

/* Waits for every child of the ticket: m. */
static inline int64_t sf_join(int64_t ticket)
{
    return sf_result(sf_hypercall(SF_NR_JOIN, (uint64_t)ticket, 0, 0, 0, NULL));
}

/* After sf_join: child's SF_CHILD_* status; copies min(*len, cap) payload
 * bytes to buf and sets *len to the full payload length. */
static inline int64_t sf_child_result(int64_t ticket, uint32_t child, void *buf, uint64_t cap,
                                      uint64_t *len)
{
    return sf_result(
        sf_hypercall(SF_NR_CHILD_RESULT, (uint64_t)ticket, child, (uintptr_t)buf, cap, len));
}

/* Kills the ticket's running children: how many. */
static inline int64_t sf_kill(int64_t ticket)
{
    return sf_result(sf_hypercall(SF_NR_KILL, (uint64_t)ticket, 0, 0, 0, NULL));
}

/* ---- Arguments: space-separated key=value pairs, last one wins ---- */

/* The value of `key` (not NUL-terminated: *len bytes), or NULL. */
static inline const char *sf_arg(const char *key, uint64_t *len)
{
    const sf_boot_info *info = sf_boot();
    const char *s = (const char *)(uintptr_t)info->cmdline_ptr;
    const char *end = s + info->cmdline_len;
    const char *found = NULL;
    uint64_t klen = sf_strlen(key);
    while (s < end) {
        while (s < end && *s == ' ')
            s++;
        const char *word = s;
        while (s < end && *s != ' ')
            s++;
        if ((uint64_t)(s - word) > klen && word[klen] == '=') {
            uint64_t i = 0;
            while (i < klen && word[i] == key[i])
                i++;
            if (i == klen) {
                found = word + klen + 1;
                *len = (uint64_t)(s - found);
            }
        }
    }
    return found;
}

/* `key` as a decimal number, or `def` if absent; panics if malformed. */
static inline uint64_t sf_arg_u64(const char *key, uint64_t def)
{
    uint64_t len, v = 0;
    const char *s = sf_arg(key, &len);
    if (!s)
        return def;
    if (len == 0)
        SF_PANIC("numeric argument without a value");
    for (uint64_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            SF_PANIC("numeric argument is not a decimal number");
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    return v;
}

/* ---- Console: printf with %s %c %d %i %u %x %p %%, modifiers l ll z ---- */

typedef struct sf_out {
    char buf[512];
    uint64_t len;
} sf_out;

static inline void sf_out_flush(sf_out *o)
{
    if (o->len)
        sf_console_write(o->buf, o->len);
    o->len = 0;
}

static inline void sf_out_char(sf_out *o, char c)
{
    if (o->len == sizeof o->buf)
        sf_out_flush(o);
    o->buf[o->len++] = c;
}

static inline void sf_out_u64(sf_out *o, uint64_t v, unsigned base)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n)
        sf_out_char(o, digits[--n]);
}

/* Formats into a buffer and writes it with one CONSOLE_WRITE per 512 bytes. */
__attribute__((format(printf, 1, 2))) static inline void sf_printf(const char *fmt, ...)
{
    sf_out o;
    va_list ap;
    o.len = 0;
    va_start(ap, fmt);
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            sf_out_char(&o, *p);
            continue;
        }
        int longs = 0;
        while (*++p == 'l' || *p == 'z')
            longs++;
        uint64_t u;
        int64_t i;
        switch (*p) {
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                sf_out_char(&o, *s);
            break;
        case 'c':
            sf_out_char(&o, (char)va_arg(ap, int));
            break;
        case 'd':
        case 'i':
            i = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (i < 0)
                sf_out_char(&o, '-');
            sf_out_u64(&o, i < 0 ? -(uint64_t)i : (uint64_t)i, 10);
            break;
        case 'u':
        case 'x':
            u = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            sf_out_u64(&o, u, *p == 'u' ? 10 : 16);
            break;
        case 'p':
            sf_out_char(&o, '0');
            sf_out_char(&o, 'x');
            sf_out_u64(&o, (uintptr_t)va_arg(ap, void *), 16);
            break;
        case '%':
            sf_out_char(&o, '%');
            break;
        default: /* unknown conversion (or the end of fmt): stop */
            va_end(ap);
            sf_out_flush(&o);
            return;
        }
    }
    va_end(ap);
    sf_out_flush(&o);
}

/* ---- Entry point and C memory functions (one translation unit) ---- */
#if defined(SNOWFLOCK_IMPLEMENTATION) && !SNOWFLOCK_HOSTED

int main(void);

/* Called by _start with the boot information pointer (rdi). */
__attribute__((noreturn, used)) void sf_c_start(const sf_boot_info *boot)
{
    if (boot != sf_boot() || boot->magic != SF_BOOT_INFO_MAGIC)
        SF_PANIC("bad boot information: not started by a snowflock VMM?");
    if (boot->abi_version != SF_ABI_VERSION)
        SF_PANIC("the VMM speaks another ABI version");
    sf_exit_vm(main());
}

/* A zero frame pointer ends stack walks; the call keeps the ABI's alignment. */
__asm__(".section .text._start,\"ax\",@progbits\n"
        ".globl _start\n"
        ".type _start,@function\n"
        "_start:\n"
        "    xor %ebp, %ebp\n"
        "    and $-16, %rsp\n"
        "    call sf_c_start\n"
        "    ud2\n"
        ".size _start, .-_start\n"
        ".previous\n");

/* String instructions, so gcc cannot turn these back into calls to themselves. */
void *memcpy(void *dest, const void *src, size_t n)
{
    void *d = dest;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dest;
}

void *memmove(void *dest, const void *src, size_t n)
{
    if ((uintptr_t)dest - (uintptr_t)src >= n)
        return memcpy(dest, src, n);
    void *d = (char *)dest + n - 1;
    const void *s = (const char *)src + n - 1;
    __asm__ volatile("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return dest;
}

void *memset(void *dest, int c, size_t n)
{
    void *d = dest;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dest;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    if (n == 0)
        return 0;
    __asm__ volatile("repe cmpsb" : "+S"(x), "+D"(y), "+c"(n) : : "memory", "cc");
    return (int)x[-1] - (int)y[-1];
}

#endif /* SNOWFLOCK_IMPLEMENTATION && !SNOWFLOCK_HOSTED */
#endif /* SNOWFLOCK_H */
