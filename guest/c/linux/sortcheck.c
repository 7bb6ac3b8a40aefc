/* A Linux-ABI example: an ordinary static C program (glibc, stdio, malloc,
 * qsort, the clocks, getrandom, uname) that runs as a snowflock guest
 * without a line written for it. It sorts N pseudo-random numbers (N from
 * argv[1], default 100000), checks the order, and prints what it saw.
 * Exit status 0 when every check held. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static int compare(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 100000;
    int failures = 0;

    struct utsname name;
    if (uname(&name) != 0 || strcmp(name.sysname, "Linux") != 0) {
        fprintf(stderr, "uname failed\n");
        failures++;
    }
    printf("argc=%d argv0=%s machine=%s\n", argc, argv[0], name.machine);

    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);

    uint64_t seed = 0;
    if (getrandom(&seed, sizeof seed, 0) != sizeof seed) {
        fprintf(stderr, "getrandom failed\n");
        failures++;
    }
    uint64_t *values = malloc(n * sizeof *values);
    if (values == NULL) {
        fprintf(stderr, "malloc of %zu values failed\n", n);
        return 2;
    }
    uint64_t x = seed | 1, sum = 0;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values[i] = x % 1000000;
        sum += values[i];
    }
    qsort(values, n, sizeof *values, compare);
    uint64_t sorted_sum = 0;
    for (size_t i = 0; i < n; i++) {
        sorted_sum += values[i];
        if (i > 0 && values[i - 1] > values[i]) {
            failures++;
            break;
        }
    }
    if (sorted_sum != sum)
        failures++;
    free(values);

    /* A large anonymous mapping reads as zeros, can be written, and goes back. */
    size_t map_len = 64 << 20;
    unsigned char *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED || map[0] != 0 || map[map_len - 1] != 0) {
        failures++;
    } else {
        memset(map, 0xab, 4096);
        if (munmap(map, map_len) != 0)
            failures++;
    }

    clock_gettime(CLOCK_MONOTONIC, &end);
    long elapsed_us = (end.tv_sec - start.tv_sec) * 1000000L + (end.tv_nsec - start.tv_nsec) / 1000;
    if (elapsed_us < 0)
        failures++;
    printf("sorted n=%zu sum=%llu pid=%d failures=%d\n", n,
           (unsigned long long)sum, (int)getpid(), failures);
    fprintf(stderr, "sortcheck took %ld us\n", elapsed_us);
    return failures == 0 ? 0 : 1;
}
