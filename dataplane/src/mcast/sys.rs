//! The few system calls mcdist needs that std and socket2 do not offer: an eventfd, waiting for
//! either of two fds to become readable, and sending many datagrams with one `sendmmsg`.

use std::fs::File;
use std::io::{self, Write};
use std::mem::size_of;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A non-blocking eventfd: a counter another thread can make readable.
#[derive(Debug)]
pub(crate) struct EventFd(File);

impl EventFd {
    /// A new eventfd with counter 0.
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd(2) takes no pointers; the flags are valid.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd(2), is open and owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd(File::from(owned)))
    }

    /// Adds 1 to the counter, making the fd readable. A counter already near overflow (it
    /// cannot be, with 1 per call) would make the write fail; the fd is readable then anyway.
    pub(crate) fn signal(&self) {
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Blocks until `first` or `second` is readable (or has an error or hangup pending); returns
/// which of them are.
pub(crate) fn wait_readable(
    first: BorrowedFd<'_>,
    second: BorrowedFd<'_>,
) -> io::Result<(bool, bool)> {
    let mut fds = [first, second].map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call, and
        // both fds stay open for it (they are borrowed).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// How far [`send_batch`] got.
#[derive(Debug)]
pub(crate) struct BatchSent {
    /// Datagrams sent, from the start of the batch.
    pub(crate) sent: usize,
    /// Why the rest was not sent.
    pub(crate) error: Option<io::Error>,
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Sends each `(destination, payload)` as one datagram from `socket`, with as few `sendmmsg`
/// calls as the kernel allows. Stops at the first error.
pub(crate) fn send_batch(socket: &UdpSocket, datagrams: &[(SocketAddrV4, &[u8])]) -> BatchSent {
    let single: Vec<[&[u8]; 1]> = datagrams.iter().map(|&(_, payload)| [payload]).collect();
    let messages: Vec<(SocketAddrV4, &[&[u8]])> = datagrams
        .iter()
        .zip(&single)
        .map(|(&(to, _), payload)| (to, &payload[..]))
        .collect();
    send_segmented(socket, &messages)
}

/// One `UDP_SEGMENT` control message: a `cmsghdr` and the segment size, padded as
/// `CMSG_SPACE(2)`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SegmentControl {
    header: libc::cmsghdr,
    segment: u16,
    _pad: [u8; 6],
}

// The kernel's layout: the data follows the header at CMSG_ALIGN(sizeof(cmsghdr)) = 16.
const _: () = assert!(size_of::<libc::cmsghdr>() == 16);
const _: () = assert!(size_of::<SegmentControl>() == 24);
const _: () = assert!(std::mem::offset_of!(SegmentControl, segment) == 16);

/// Sends each `(destination, datagrams)` as one UDP GSO message (`UDP_SEGMENT`): the kernel
/// cuts it into the datagrams after one pass through the stack. All datagrams of a message
/// but the last must have the first one's length (as a page's fragments do); a message of
/// one datagram is sent plainly. Stops at the first error; `sent` counts datagrams of
/// messages sent whole.
pub(crate) fn send_segmented(
    socket: &UdpSocket,
    messages: &[(SocketAddrV4, &[&[u8]])],
) -> BatchSent {
    let mut names: Vec<libc::sockaddr_in> = messages.iter().map(|(to, _)| sockaddr(*to)).collect();
    let mut iovecs: Vec<Vec<libc::iovec>> = messages
        .iter()
        .map(|(_, datagrams)| {
            datagrams
                .iter()
                .map(|d| libc::iovec {
                    iov_base: d.as_ptr().cast_mut().cast(),
                    iov_len: d.len(),
                })
                .collect()
        })
        .collect();
    let mut controls: Vec<SegmentControl> = messages
        .iter()
        .map(|(_, datagrams)| SegmentControl {
            header: libc::cmsghdr {
                cmsg_len: size_of::<libc::cmsghdr>() + size_of::<u16>(),
                cmsg_level: libc::SOL_UDP,
                cmsg_type: libc::UDP_SEGMENT,
            },
            segment: datagrams
                .first()
                .map_or(0, |d| u16::try_from(d.len()).unwrap_or(u16::MAX)),
            _pad: [0; 6],
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = Vec::with_capacity(messages.len());
    for (((name, iovec), control), (_, datagrams)) in names
        .iter_mut()
        .zip(iovecs.iter_mut())
        .zip(controls.iter_mut())
        .zip(messages)
    {
        // SAFETY: msghdr is plain old data; all zeroes is a valid value.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_name = (name as *mut libc::sockaddr_in).cast();
        header.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        header.msg_iov = iovec.as_mut_ptr();
        header.msg_iovlen = iovec.len();
        if datagrams.len() > 1 {
            header.msg_control = (control as *mut SegmentControl).cast();
            header.msg_controllen = size_of::<SegmentControl>();
        }
        headers.push(libc::mmsghdr {
            msg_hdr: header,
            msg_len: 0,
        });
    }
    let mut done_messages = 0;
    let mut sent = 0;
    while done_messages < headers.len() {
        let rest = &mut headers[done_messages..];
        let count = rest.len().min(libc::c_uint::MAX as usize) as libc::c_uint;
        // SAFETY: `rest` points to `count` initialised mmsghdr structs whose name, iovec,
        // control and payload pointers refer to `names`, `iovecs`, `controls` and `messages`,
        // all alive and unmoved for the whole call; the socket fd is open.
        let done = unsafe { libc::sendmmsg(socket.as_raw_fd(), rest.as_mut_ptr(), count, 0) };
        if done < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return BatchSent {
                sent,
                error: Some(error),
            };
        }
        let done = done as usize;
        sent += messages[done_messages..done_messages + done]
            .iter()
            .map(|(_, d)| d.len())
            .sum::<usize>();
        done_messages += done;
    }
    BatchSent { sent, error: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    /// A UDP socket on loopback that gives up reading after 5 s, and its address.
    fn loopback_receiver() -> (UdpSocket, SocketAddrV4) {
        let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let std::net::SocketAddr::V4(to) = receiver.local_addr().unwrap() else {
            panic!("bound an IPv4 address");
        };
        (receiver, to)
    }

    #[test]
    fn eventfd_wakes_a_wait_and_batches_arrive_in_order() {
        let (receiver, to) = loopback_receiver();
        let wake = EventFd::new().unwrap();
        wake.signal();
        assert_eq!(
            wait_readable(receiver.as_fd(), wake.as_fd()).unwrap(),
            (false, true)
        );
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let batch: Vec<(SocketAddrV4, &[u8])> =
            payloads.iter().map(|p| (to, p.as_slice())).collect();
        let outcome = send_batch(&sender, &batch);
        assert_eq!(outcome.sent, 5);
        assert!(outcome.error.is_none());
        let mut buf = [0u8; 256];
        for payload in &payloads {
            let (len, _) = receiver.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], payload.as_slice());
        }
    }

    #[test]
    fn segmented_messages_arrive_as_their_datagrams() {
        let (receiver, to) = loopback_receiver();
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let page: Vec<Vec<u8>> = [(1u8, 1424), (2, 1424), (3, 1416)]
            .iter()
            .map(|&(fill, len)| vec![fill; len])
            .collect();
        let single = vec![vec![9u8; 700]];
        let first: Vec<&[u8]> = page.iter().map(Vec::as_slice).collect();
        let second: Vec<&[u8]> = single.iter().map(Vec::as_slice).collect();
        let outcome = send_segmented(&sender, &[(to, &first), (to, &second)]);
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.sent, 4);
        let mut buf = [0u8; 4096];
        for expected in page.iter().chain(&single) {
            let (len, _) = receiver.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], expected.as_slice());
        }
    }
}
