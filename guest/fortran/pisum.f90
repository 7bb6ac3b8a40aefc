! A Fortran Linux-ABI example that clones: sums 1/i^2 for i = 1..n (pi^2/6)
! over clones, each summing its share, through the C header's clone API
! (snowflock_f.c, bind(C)). The parent checks the merged sum against its
! own serial pass. Usage: pisum_f [n [clones]] (defaults 10000000 and 2).
program pisum_f
  use, intrinsic :: iso_c_binding
  implicit none
  interface
    function sf_f_request_ticket(n, granted) bind(C)
      import :: c_int32_t, c_int64_t
      integer(c_int32_t), value :: n
      integer(c_int32_t) :: granted
      integer(c_int64_t) :: sf_f_request_ticket
    end function
    function sf_f_clone(ticket) bind(C)
      import :: c_int64_t
      integer(c_int64_t), value :: ticket
      integer(c_int64_t) :: sf_f_clone
    end function
    function sf_f_join(ticket) bind(C)
      import :: c_int64_t
      integer(c_int64_t), value :: ticket
      integer(c_int64_t) :: sf_f_join
    end function
    subroutine sf_f_child_exit_real(value) bind(C)
      import :: c_double
      real(c_double), value :: value
    end subroutine
    function sf_f_child_result_real(ticket, child, value) bind(C)
      import :: c_int64_t, c_int32_t, c_double
      integer(c_int64_t), value :: ticket
      integer(c_int32_t), value :: child
      real(c_double) :: value
      integer(c_int64_t) :: sf_f_child_result_real
    end function
  end interface
  integer(c_int64_t) :: n, ticket, id, per, first, last, joined
  integer(c_int32_t) :: clones, granted, child
  real(c_double) :: part, merged, serial
  character(len=32) :: arg

  n = 10000000
  clones = 2
  if (command_argument_count() > 0) then
    call get_command_argument(1, arg)
    read(arg, *) n
  end if
  if (command_argument_count() > 1) then
    call get_command_argument(2, arg)
    read(arg, *) clones
  end if

  ticket = sf_f_request_ticket(clones, granted)
  if (ticket < 0 .or. granted < 1) stop 3
  per = (n + granted - 1) / granted
  id = sf_f_clone(ticket)
  if (id < 0) stop 3
  if (id > 0) then
    first = (id - 1) * per + 1
    last = min(n, id * per)
    call sf_f_child_exit_real(share(first, last))
    stop 4
  end if

  joined = sf_f_join(ticket)
  merged = 0
  do child = 1, granted
    if (sf_f_child_result_real(ticket, child, part) /= 0) stop 5
    merged = merged + part
  end do
  serial = 0
  do child = 1, granted
    serial = serial + share((child - 1) * per + 1, min(n, child * per))
  end do
  write(*, '(a,i0,a,f12.9,a,l1)') 'clones=', granted, ' pi=', sqrt(6 * merged), &
    ' match=', merged == serial
  if (merged /= serial) stop 1

contains

  real(c_double) function share(lo, hi)
    integer(c_int64_t), intent(in) :: lo, hi
    integer(c_int64_t) :: i
    share = 0
    do i = hi, lo, -1
      share = share + 1d0 / (real(i, c_double) * real(i, c_double))
    end do
  end function share

end program pisum_f
