/* The clone API for Fortran: snowflock.h's inline calls as functions that
 * `bind(C)` interfaces can name (see pisum.f90). Link it with the program. */
#include <stdint.h>

#include "snowflock.h"

int64_t sf_f_request_ticket(int32_t n, int32_t *granted)
{
    uint32_t g = 0;
    int64_t ticket = sf_request_ticket((uint32_t)n, &g);
    *granted = (int32_t)g;
    return ticket;
}

int64_t sf_f_clone(int64_t ticket) { return sf_clone(ticket); }

int64_t sf_f_join(int64_t ticket) { return sf_join(ticket); }

void sf_f_child_exit_real(double value) { sf_child_exit(&value, sizeof value); }

/* The child's real result; returns its status (SF_CHILD_EXITED = 0). */
int64_t sf_f_child_result_real(int64_t ticket, int32_t child, double *value)
{
    uint64_t len = 0;
    int64_t status = sf_child_result(ticket, (uint32_t)child, value, sizeof *value, &len);
    return status == SF_CHILD_EXITED && len == sizeof *value ? 0 : (status ? status : -1);
}
