/* A Linux-ABI example that clones: an ordinary static C program (glibc,
 * malloc, qsort, stdio) that builds a table, clones itself with the
 * snowflock API from snowflock.h, lets each clone sort and sum its share,
 * and merges the clones' results, checked against its own serial pass.
 * It times the cloned job (clone to the last result merged) and its own
 * serial pass over the same shares: `clonesum: job_ms=.. serial_ms=..`.
 * Usage: clonesum [values [clones]] (defaults 1000000 and 2).
 * Exit status 0 when the merged result matches. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "snowflock.h"

static int compare(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* What one share gives: its sum and a checksum of its sorted order. */
struct share {
    uint64_t sum;
    uint64_t ordered;
};

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static struct share process(uint32_t *values, size_t n)
{
    qsort(values, n, sizeof *values, compare);
    struct share s = {0, 0};
    for (size_t i = 0; i < n; i++) {
        s.sum += values[i];
        s.ordered = s.ordered * 31 + values[i];
    }
    return s;
}

int main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 1000000;
    uint32_t clones = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 2;
    if (n == 0 || clones == 0 || clones > 64)
        return 2;
    uint32_t *values = malloc(n * sizeof *values);
    if (values == NULL)
        return 2;
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values[i] = (uint32_t)x;
    }
    printf("table of %zu values built\n", n);

    uint32_t granted = 0;
    int64_t ticket = sf_request_ticket(clones, &granted);
    if (ticket < 0 || granted == 0) {
        fprintf(stderr, "no clones granted (%lld)\n", (long long)ticket);
        return 3;
    }
    double job_start = now_ms();
    int64_t id = sf_clone(ticket);
    if (id < 0) {
        fprintf(stderr, "clone failed (%lld)\n", (long long)id);
        return 3;
    }
    size_t per = (n + granted - 1) / granted;
    if (id > 0) {
        size_t from = (size_t)(id - 1) * per;
        size_t to = from + per < n ? from + per : n;
        struct share s = process(values + from, to - from);
        printf("clone %lld sorted %zu values\n", (long long)id, to - from);
        sf_child_exit(&s, sizeof s);
        return 4;
    }
    sf_join(ticket);
    struct share merged = {0, 0};
    for (uint32_t child = 1; child <= granted; child++) {
        struct share s;
        uint64_t len = 0;
        int64_t status = sf_child_result(ticket, child, &s, sizeof s, &len);
        if (status != SF_CHILD_EXITED || len != sizeof s) {
            fprintf(stderr, "clone %u failed (status %lld)\n", child, (long long)status);
            return 5;
        }
        merged.sum += s.sum;
        merged.ordered ^= s.ordered;
    }
    double job_ms = now_ms() - job_start;
    /* The serial pass sorts fresh copies: the clones sorted theirs, not the parent's. */
    double serial_start = now_ms();
    struct share serial = {0, 0};
    for (uint32_t child = 0; child < granted; child++) {
        size_t from = child * per;
        size_t to = from + per < n ? from + per : n;
        struct share s = process(values + from, to - from);
        serial.sum += s.sum;
        serial.ordered ^= s.ordered;
    }
    double serial_ms = now_ms() - serial_start;
    int ok = merged.sum == serial.sum && merged.ordered == serial.ordered;
    printf("clonesum: job_ms=%.3f serial_ms=%.3f\n", job_ms, serial_ms);
    printf("clones=%u sum=%llu match=%d\n", granted, (unsigned long long)merged.sum, ok);
    free(values);
    return ok ? 0 : 1;
}
