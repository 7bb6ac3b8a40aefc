/* A Linux-ABI example with files: reads numbers (one per line) from a file,
 * typically on a host mount, clones itself, lets each clone sum its share
 * and write it to /out/part-<id>, and merges the clones' results, checked
 * against its own pass. Files the program writes live in guest memory: a
 * clone sees its parent's files as they were at the clone point, and its
 * own writes stay its own (the parent's /tmp/state is checked after the
 * clones overwrote theirs). With `sf run --out DIR`, the parent's /out
 * lands in DIR/ and each clone's in DIR/clone-<generation>-<id>/.
 * Usage: partsum FILE [clones] (default 2). Exit status 0 when all holds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "snowflock.h"

static int read_state(char *buf, size_t cap)
{
    FILE *f = fopen("/tmp/state", "r");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = 0;
    fclose(f);
    return 0;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        perror(path);
        exit(2);
    }
    fputs(text, f);
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: partsum FILE [clones]\n");
        return 2;
    }
    uint32_t clones = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 2;
    FILE *in = fopen(argv[1], "r");
    if (in == NULL) {
        perror(argv[1]);
        return 2;
    }
    size_t n = 0, cap = 1024;
    int64_t *values = malloc(cap * sizeof *values);
    long long v;
    while (values != NULL && fscanf(in, "%lld", &v) == 1) {
        if (n == cap) {
            cap *= 2;
            values = realloc(values, cap * sizeof *values);
            if (values == NULL)
                break;
        }
        values[n++] = v;
    }
    fclose(in);
    if (values == NULL || n == 0) {
        fprintf(stderr, "no numbers in %s\n", argv[1]);
        return 2;
    }
    write_text("/tmp/state", "parent");
    printf("read %zu numbers\n", n);

    uint32_t granted = 0;
    int64_t ticket = sf_request_ticket(clones, &granted);
    if (ticket < 0 || granted == 0)
        return 3;
    int64_t id = sf_clone(ticket);
    if (id < 0)
        return 3;
    size_t per = (n + granted - 1) / granted;
    if (id > 0) {
        char state[64];
        int inherited = read_state(state, sizeof state) == 0 && strcmp(state, "parent") == 0;
        char mine[32];
        snprintf(mine, sizeof mine, "clone %lld", (long long)id);
        write_text("/tmp/state", mine);
        size_t from = (size_t)(id - 1) * per;
        size_t to = from + per < n ? from + per : n;
        int64_t sum = 0;
        for (size_t i = from; i < to; i++)
            sum += values[i];
        char path[64], text[64];
        snprintf(path, sizeof path, "/out/part-%lld", (long long)id);
        snprintf(text, sizeof text, "%lld\n", (long long)sum);
        write_text(path, text);
        struct {
            int64_t sum;
            int64_t inherited;
        } result = {sum, inherited};
        sf_child_exit(&result, sizeof result);
        return 4;
    }
    sf_join(ticket);
    int64_t merged = 0;
    int inherited = 1;
    for (uint32_t child = 1; child <= granted; child++) {
        struct {
            int64_t sum;
            int64_t inherited;
        } result;
        uint64_t len = 0;
        if (sf_child_result(ticket, child, &result, sizeof result, &len) != SF_CHILD_EXITED ||
            len != sizeof result)
            return 5;
        merged += result.sum;
        inherited &= result.inherited != 0;
    }
    int64_t serial = 0;
    for (size_t i = 0; i < n; i++)
        serial += values[i];
    char state[64];
    int kept = read_state(state, sizeof state) == 0 && strcmp(state, "parent") == 0;
    char total[64];
    snprintf(total, sizeof total, "%lld\n", (long long)merged);
    write_text("/out/total", total);
    int ok = merged == serial && inherited && kept;
    printf("clones=%u total=%lld match=%d inherited=%d kept=%d\n", granted, (long long)merged,
           merged == serial, inherited, kept);
    return ok ? 0 : 1;
}
