//! The XDP program on a real veth link between two private namespaces: what it passes, drops
//! and counts, in native and generic mode, and that dropping the loader detaches it.

mod common;

use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd};
use std::thread;
use std::time::{Duration, Instant};

use common::{Datagrams, MCDIST_PORT, Testbed, WAIT};
use snowflock_ebpf::{
    AttachConfig, AttachError, FamilyError, McdistXdp, SocketMapError, XdpCounters, XdpMode, abi,
};

const FAMILY: u64 = 0x5f00_0000_0000_0001;
const GENERATION: u32 = 3;
const PAGES: u64 = 100;
const KIND_REQUEST: u8 = 2;
/// A port next to the mcdist port, which the program must ignore.
const OTHER_PORT: u16 = 7074;

/// Polls `condition` every 10 ms for at most [`WAIT`]; whether it became true.
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;

/// Sets the IPv4 options `socket` sends with (none if `options` is empty).
fn set_ip_options(socket: &UdpSocket, options: &[u8]) {
    let len = libc::socklen_t::try_from(options.len()).expect("short options");
    // SAFETY: the kernel reads `len` bytes from `options`, which is valid for that long and
    // outlives the call; the descriptor is open for as long as `socket` is borrowed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            options.as_ptr().cast(),
            len,
        )
    };
    assert_eq!(result, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
}

fn attach(bed: &Testbed, mode: XdpMode) -> McdistXdp {
    let config = AttachConfig {
        ifname: bed.receiver_if.clone(),
        mode,
        udp_port: MCDIST_PORT,
    };
    bed.in_receiver(move || McdistXdp::attach(&config))
        .unwrap_or_else(|e| panic!("attach in {mode:?} mode: {e:?}"))
}

fn steers_fragments_and_passes_everything_else(mode: XdpMode) {
    let bed = Testbed::new();
    let xdp = attach(&bed, mode);
    let mut net = bed.endpoints();
    let mut other = bed.receiver(OTHER_PORT);
    let mut datagrams = Datagrams::default();

    let info = xdp.info();
    assert_eq!(info.ifname, bed.receiver_if);
    assert_eq!(info.mode, mode);
    assert_eq!(info.udp_port, MCDIST_PORT);
    assert_eq!(info.presence_capacity_pages, abi::PRESENCE_CAPACITY_PAGES);
    assert!(info.ifindex > 0);
    let expected_keyword = match mode {
        XdpMode::Native => "xdp",
        XdpMode::Generic => "xdpgeneric",
    };
    assert_eq!(
        bed.attached_program(),
        Some((info.program_id, expected_keyword.to_owned()))
    );

    // Another port: untouched and uncounted, even if it looks like a fragment.
    let elsewhere = datagrams.fragment(FAMILY, GENERATION, 1);
    net.send(OTHER_PORT, &elsewhere);
    assert!(other.wait_for(&elsewhere));
    assert_eq!(xdp.counters(), XdpCounters::default());

    // Other kinds, unknown families and malformed datagrams pass to the kernel socket.
    let request = datagrams.mcdist(KIND_REQUEST, FAMILY, GENERATION, 1);
    let unknown_family = datagrams.fragment(FAMILY, GENERATION, 1);
    let short =
        datagrams.fragment(FAMILY, GENERATION, 1)[..abi::MCDIST_FRAGMENT_MIN_LEN - 1].to_vec();
    let mut bad_version = datagrams.fragment(FAMILY, GENERATION, 1);
    bad_version[abi::MCDIST_OFFSET_VERSION] = abi::MCDIST_VERSION - 1;
    let tiny = b"SFM".to_vec();
    for datagram in [&request, &unknown_family, &short, &bad_version, &tiny] {
        net.send(MCDIST_PORT, datagram);
        assert!(net.mcdist.wait_for(datagram), "{datagram:?} did not arrive");
    }
    let mut expected = XdpCounters {
        received: 5,
        passed_not_ours: 2,
        malformed: 3,
        ..XdpCounters::default()
    };
    assert_eq!(xdp.counters(), expected);

    // A registered family without an AF_XDP socket: redirect falls back to the kernel.
    let bits = xdp
        .add_family(FAMILY, GENERATION, PAGES)
        .expect("add the family");
    assert_eq!(bits.pages(), PAGES);
    let page_5 = datagrams.fragment(FAMILY, GENERATION, 5);
    let stale = datagrams.fragment(FAMILY, GENERATION + 1, 5);
    let out_of_range = datagrams.fragment(FAMILY, GENERATION, PAGES);
    for datagram in [&page_5, &stale, &out_of_range] {
        net.send(MCDIST_PORT, datagram);
        assert!(net.mcdist.wait_for(datagram));
    }
    expected.received += 3;
    expected.passed += 1;
    expected.passed_not_ours += 2;
    assert_eq!(xdp.counters(), expected);

    // A page the host holds: its fragments are dropped, other pages still pass.
    assert!(!bits.contains(5));
    assert!(bits.mark(5));
    assert!(bits.contains(5));
    assert!(!bits.mark(PAGES));
    let duplicate = datagrams.fragment(FAMILY, GENERATION, 5);
    let page_6 = datagrams.fragment(FAMILY, GENERATION, 6);
    net.send(MCDIST_PORT, &duplicate);
    net.send(MCDIST_PORT, &page_6);
    assert!(net.mcdist.wait_for(&page_6));
    expected.received += 2;
    expected.duplicate_dropped += 1;
    expected.passed += 1;
    assert!(
        eventually(|| xdp.counters() == expected),
        "counters {:?}, expected {expected:?}",
        xdp.counters()
    );
    assert!(!net.mcdist.has_seen(&duplicate));

    // IP options move the UDP header; the program still finds it.
    set_ip_options(
        &net.sender,
        &[IPOPT_NOOP, IPOPT_NOOP, IPOPT_NOOP, IPOPT_END],
    );
    let duplicate_with_options = datagrams.fragment(FAMILY, GENERATION, 5);
    let page_9_with_options = datagrams.fragment(FAMILY, GENERATION, 9);
    net.send(MCDIST_PORT, &duplicate_with_options);
    net.send(MCDIST_PORT, &page_9_with_options);
    assert!(net.mcdist.wait_for(&page_9_with_options));
    expected.received += 2;
    expected.duplicate_dropped += 1;
    expected.passed += 1;
    assert!(eventually(|| xdp.counters() == expected));
    assert!(!net.mcdist.has_seen(&duplicate_with_options));
    set_ip_options(&net.sender, &[]);

    // A datagram longer than its first fragment (a UDP GSO batch of several fragments, as
    // generic XDP on a virtual link sees it) is left to the kernel's UDP stack, which cuts
    // it: even a held page arrives.
    let mut batch = datagrams.fragment(FAMILY, GENERATION, 5);
    batch.extend(datagrams.fragment(FAMILY, GENERATION, 6));
    net.send(MCDIST_PORT, &batch);
    assert!(net.mcdist.wait_for(&batch));
    expected.received += 1;
    expected.passed += 1;
    assert!(eventually(|| xdp.counters() == expected));

    // IP fragments are left to the kernel, which reassembles them: even a held page arrives.
    let mut oversized = datagrams.fragment(FAMILY, GENERATION, 5);
    oversized.resize(3000, 0);
    net.send(MCDIST_PORT, &oversized);
    assert!(net.mcdist.wait_for(&oversized));
    assert_eq!(xdp.counters(), expected);

    // Unregistered, the family's fragments pass again even for marked pages.
    xdp.remove_family(FAMILY).expect("remove the family");
    let after_removal = datagrams.fragment(FAMILY, GENERATION, 5);
    net.send(MCDIST_PORT, &after_removal);
    assert!(net.mcdist.wait_for(&after_removal));
    expected.received += 1;
    expected.passed_not_ours += 1;
    assert_eq!(xdp.counters(), expected);

    // Registered again with the page marked: dropped; then detached: delivered.
    let bits = xdp
        .add_family(FAMILY, GENERATION, PAGES)
        .expect("add the family again");
    bits.mark(7);
    let held = datagrams.fragment(FAMILY, GENERATION, 7);
    net.send(MCDIST_PORT, &held);
    expected.received += 1;
    expected.duplicate_dropped += 1;
    assert!(eventually(|| xdp.counters() == expected));
    drop(xdp);
    assert!(bed.wait_until_detached());
    assert!(bits.mark(8), "a handle outlives the loader");
    net.send(MCDIST_PORT, &held);
    assert!(net.mcdist.wait_for(&held));
}

#[test]
fn native_mode_steers_fragments_and_passes_everything_else() {
    steers_fragments_and_passes_everything_else(XdpMode::Native);
}

#[test]
fn generic_mode_steers_fragments_and_passes_everything_else() {
    steers_fragments_and_passes_everything_else(XdpMode::Generic);
}

#[test]
fn family_and_socket_updates_are_checked() {
    let bed = Testbed::new();
    let xdp = attach(&bed, XdpMode::Generic);

    assert!(matches!(
        xdp.add_family(1, 1, 0),
        Err(FamilyError::NoPages { family: 1 })
    ));
    assert!(matches!(
        xdp.add_family(1, 1, abi::PRESENCE_CAPACITY_PAGES + 1),
        Err(FamilyError::NoSpace { family: 1, .. })
    ));
    assert!(matches!(
        xdp.remove_family(1),
        Err(FamilyError::NotRegistered { family: 1 })
    ));

    let first = xdp.add_family(1, 1, 64).expect("add family 1");
    assert!(matches!(
        xdp.add_family(1, 2, 64),
        Err(FamilyError::AlreadyRegistered { family: 1 })
    ));
    assert!(first.mark(0));
    assert!(first.mark(63));
    assert!(!first.contains(1));

    // A range stays reserved while a handle lives: the next family gets other bits.
    xdp.remove_family(1).expect("remove family 1");
    let second = xdp.add_family(2, 1, 64).expect("add family 2");
    assert!(!second.contains(0) && !second.contains(63));
    assert!(first.mark(1));
    assert!(!second.contains(1));

    // Once the last handle is gone the range is reused, cleared.
    let first_copy = first.clone();
    drop(first);
    assert!(first_copy.contains(63));
    drop(first_copy);
    let third = xdp.add_family(3, 1, 64).expect("add family 3");
    assert!((0..64).all(|page| !third.contains(page)));
    assert!(third.mark(0) && !second.contains(0));

    // The whole bitmap can be handed out, and no more.
    let rest = abi::PRESENCE_CAPACITY_PAGES - 128;
    let big = xdp.add_family(4, 1, rest).expect("fill the bitmap");
    assert!(big.mark(rest - 1) && !big.mark(rest));
    assert!(matches!(
        xdp.add_family(5, 1, 1),
        Err(FamilyError::NoSpace {
            family: 5,
            pages: 1
        })
    ));

    // Sockets: only AF_XDP sockets, only queues the map has.
    let udp = bed.in_receiver(|| UdpSocket::bind("10.77.0.2:0").expect("bind"));
    assert!(matches!(
        xdp.set_socket(abi::XSKS_MAX, udp.as_fd()),
        Err(SocketMapError::QueueOutOfRange { .. })
    ));
    assert!(matches!(
        xdp.set_socket(0, udp.as_fd()),
        Err(SocketMapError::Map { queue: 0, .. })
    ));
    xdp.clear_socket(0).expect("clearing an empty queue");
    assert!(matches!(
        xdp.clear_socket(abi::XSKS_MAX),
        Err(SocketMapError::QueueOutOfRange { .. })
    ));
}

#[test]
fn attach_fails_cleanly() {
    let bed = Testbed::new();
    let missing = AttachConfig {
        ifname: "sfe-no-such-if".to_owned(),
        mode: XdpMode::Generic,
        udp_port: MCDIST_PORT,
    };
    let result = bed.in_receiver(move || McdistXdp::attach(&missing));
    assert!(matches!(result, Err(AttachError::UnknownInterface { .. })));

    // One program per interface: a second attach fails and leaves the first in place.
    let first = attach(&bed, XdpMode::Native);
    let second = AttachConfig {
        ifname: bed.receiver_if.clone(),
        mode: XdpMode::Native,
        udp_port: MCDIST_PORT,
    };
    let result = bed.in_receiver(move || McdistXdp::attach(&second));
    assert!(
        matches!(result, Err(AttachError::Attach { .. })),
        "{result:?}"
    );
    assert_eq!(
        bed.attached_program().map(|(id, _)| id),
        Some(first.info().program_id)
    );
    drop(first);
    assert!(bed.wait_until_detached());
}
