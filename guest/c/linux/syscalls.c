/* Times system calls from inside the program, the same way natively and as a
 * snowflock guest: for each call, `rounds` calls, reporting the median over
 * `runs` of the mean cost per call in nanoseconds, one line per call:
 *   syscall=<name> ns=<median> first_ns=<first call of the site>
 * `getpid_unpatched` makes its call from a site in writable memory, which
 * the personality never patches: as a guest, every call exits to the VMM.
 * With a FILE, it also reads the file whole `runs` times in 1 MiB reads and
 * prints the median rate: read_mib_s=<MiB/s> bytes=<file size>.
 * Usage: syscalls [rounds [runs [FILE]]] (defaults 20000 and 7). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int compare(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Each call is its own function, so each has its own `syscall` site(s). */
static void call_getpid(void) { syscall(SYS_getpid); }
static void call_clock(void)
{
    struct timespec t;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t);
}
static void call_brk(void) { syscall(SYS_brk, 0); }
static char byte = 'x';
static void call_write0(void) { syscall(SYS_write, 2, &byte, 0); }
/* One byte to standard error: as a guest, it goes to the personality's buffer. */
static void call_write1(void) { syscall(SYS_write, 2, &byte, 1); }

/* mov eax, 39 (getpid); syscall; ret: copied into writable memory. */
static const unsigned char getpid_code[] = {0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3};
static void (*unpatched_getpid)(void);
static void call_unpatched(void) { unpatched_getpid(); }

struct bench {
    const char *name;
    void (*call)(void);
};

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    int runs = argc > 2 ? atoi(argv[2]) : 7;
    if (rounds < 1 || runs < 1 || runs > 99)
        return 2;
    void *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (code == MAP_FAILED)
        return 2;
    memcpy(code, getpid_code, sizeof getpid_code);
    unpatched_getpid = (void (*)(void))code;
    struct bench benches[] = {
        {"getpid", call_getpid},
        {"clock_gettime", call_clock},
        {"brk", call_brk},
        {"write0", call_write0},
        {"write1", call_write1},
        {"getpid_unpatched", call_unpatched},
    };
    for (size_t b = 0; b < sizeof benches / sizeof benches[0]; b++) {
        /* Every call of the unpatched site exits: fewer rounds keep it short. */
        long n = b == 5 ? (rounds + 99) / 100 : rounds;
        uint64_t start = now_ns();
        benches[b].call();
        uint64_t first = now_ns() - start;
        uint64_t per_call[99];
        for (int r = 0; r < runs; r++) {
            start = now_ns();
            for (long i = 0; i < n; i++)
                benches[b].call();
            per_call[r] = (now_ns() - start) / (uint64_t)n;
        }
        qsort(per_call, (size_t)runs, sizeof per_call[0], compare);
        fprintf(stderr, "\n");
        printf("syscall=%s ns=%llu first_ns=%llu\n", benches[b].name,
               (unsigned long long)per_call[runs / 2], (unsigned long long)first);
    }
    if (argc > 3) {
        size_t chunk = 1 << 20;
        char *buf = malloc(chunk);
        uint64_t rate[99], bytes = 0;
        for (int r = 0; r < runs; r++) {
            int fd = open(argv[3], O_RDONLY);
            if (fd < 0 || buf == NULL)
                return 3;
            uint64_t start = now_ns();
            ssize_t n;
            bytes = 0;
            while ((n = read(fd, buf, chunk)) > 0)
                bytes += (uint64_t)n;
            uint64_t ns = now_ns() - start;
            close(fd);
            rate[r] = ns ? bytes * 1000000000u / ns / (1 << 20) : 0;
        }
        qsort(rate, (size_t)runs, sizeof rate[0], compare);
        printf("read_mib_s=%llu bytes=%llu\n", (unsigned long long)rate[runs / 2],
               (unsigned long long)bytes);
    }
    return 0;
}
