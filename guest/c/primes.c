/*
 * primes: the C example guest. Counts the primes below `limit` (default
 * 2000000) across clones: child i of m counts range i and exits with its
 * count (u64 LE); the parent joins, sums, recounts serially and compares.
 * Args: limit, clones (default 4). Prints
 * `primes: limit=.. clones=.. granted=.. count=.. serial=.. check=ok`;
 * returns 0 iff the counts match and every child exited normally.
 */
#define SNOWFLOCK_IMPLEMENTATION
#include "snowflock.h"

/* Trial division: slow on purpose, so there is work to share. */
static uint64_t count_primes(uint64_t lo, uint64_t hi)
{
    uint64_t count = 0;
    for (uint64_t n = lo < 2 ? 2 : lo; n < hi; n++) {
        int prime = n == 2 || n % 2;
        for (uint64_t d = 3; prime && d * d <= n; d += 2)
            prime = n % d != 0;
        count += (uint64_t)prime;
    }
    return count;
}

/* limit * i / shards without overflow (and without libgcc's 128-bit division). */
static uint64_t range_start(uint64_t limit, uint64_t shards, uint64_t i)
{
    return limit / shards * i + limit % shards * i / shards;
}

int main(void)
{
    uint64_t limit = sf_arg_u64("limit", 2000000);
    uint32_t clones = (uint32_t)sf_arg_u64("clones", 4);
    uint32_t granted;
    int64_t ticket = sf_request_ticket(clones, &granted);
    if (ticket < 0) {
        sf_printf("primes: request_ticket failed: errno %ld\n", -ticket);
        return 1;
    }
    int64_t me = sf_clone(ticket);
    if (me < 0) {
        sf_printf("primes: clone failed: errno %ld\n", -me);
        return 1;
    }
    if (me > 0) {
        uint64_t count = count_primes(range_start(limit, granted, (uint64_t)me - 1),
                                      range_start(limit, granted, (uint64_t)me));
        sf_child_exit(&count, sizeof count);
        SF_PANIC("sf_child_exit returned");
    }

    int ok = 1;
    uint64_t total = 0;
    if (granted == 0) {
        total = count_primes(0, limit);
    } else {
        int64_t m = sf_join(ticket);
        if (m != (int64_t)granted) {
            sf_printf("primes: join returned %ld, expected %u\n", m, granted);
            ok = 0;
        }
        for (uint32_t child = 1; child <= granted; child++) {
            uint64_t count = 0, len = 0;
            int64_t status = sf_child_result(ticket, child, &count, sizeof count, &len);
            if (status != SF_CHILD_EXITED || len != sizeof count) {
                sf_printf("primes: child %u: status %ld, %lu result bytes\n", child, status,
                          len);
                ok = 0;
            }
            total += count;
        }
    }
    uint64_t serial = count_primes(0, limit);
    ok = ok && total == serial;
    sf_printf("primes: limit=%lu clones=%u granted=%u count=%lu serial=%lu check=%s\n", limit,
              clones, granted, total, serial, ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
