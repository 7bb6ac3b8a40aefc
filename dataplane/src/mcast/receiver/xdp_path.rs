//! The AF_XDP receive path: the XDP program of `snowflock-ebpf` steers the
//! FRAGMENTs of joined families to one AF_XDP socket per RX queue, and a
//! thread per queue hands their UDP payloads, straight out of the UMEM
//! frames, to the same [`ReceiverCore`] the kernel socket path feeds. The
//! kernel socket stays: it holds the group memberships (IGMP, so switches
//! and bridges forward the groups), sends the requests, and receives what
//! the program passes (REJECTs, fragments of families not registered yet).
//!
//! Each page the host holds is marked in the program's presence bitmap, so
//! the kernel drops later fragments of it before they cost a copy.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snowflock_ebpf::{AttachConfig, FamilyBits, McdistXdp, XdpCounters, XdpMode};

use super::family::{FamilyJoin, HeldPages, JoinError};
use super::receiver_core::ReceiverCore;
use crate::mcast::wire::{MAX_FRAGMENT_MTU, XDP_COPY_HEADROOM};
use crate::netdev;
use crate::sync::lock;
use crate::xdp::{XskConfig, XskError, XskMode, XskSocket};

/// Packets one `receive_batch` call takes at most.
const BATCH: usize = 64;
/// How long a queue thread waits for packets before checking whether to stop.
const POLL_TIMEOUT: Duration = Duration::from_millis(20);
/// How long binding a queue retries while the kernel still frees a previous socket of it.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// Where and how to receive with AF_XDP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpReceiveConfig {
    /// The interface the groups arrive on.
    pub ifname: String,
    /// Native (driver) or generic XDP.
    pub mode: XdpMode,
    /// RX queues that get a socket; empty = every RX queue of the interface.
    pub queues: Vec<u32>,
    /// UMEM and ring sizes, busy polling and zero-copy choice of every socket.
    pub socket: XskConfig,
}

/// Why the AF_XDP path could not start.
#[derive(Debug, thiserror::Error)]
pub enum XdpPathError {
    /// The UMEM frames cannot hold the fragments the interface's MTU brings.
    #[error(
        "{frame_size}-byte AF_XDP frames on {ifname} cannot hold fragments sized for MTU {mtu} \
         (use 4096-byte frames)"
    )]
    FrameTooSmall {
        /// The interface.
        ifname: String,
        /// The configured frame size.
        frame_size: u32,
        /// The MTU fragments are sized for.
        mtu: u32,
    },
    /// The program could not be loaded or attached.
    #[error("attaching the XDP program to {ifname}")]
    Attach {
        /// The interface.
        ifname: String,
        /// What failed.
        source: Box<snowflock_ebpf::AttachError>,
    },
    /// The interface's queues could not be read.
    #[error("reading the RX queues of {ifname}")]
    Queues {
        /// The interface.
        ifname: String,
        /// What failed.
        source: netdev::NetdevError,
    },
    /// An AF_XDP socket could not be bound.
    #[error("binding an AF_XDP socket to {ifname} queue {queue}")]
    Bind {
        /// The interface.
        ifname: String,
        /// The RX queue.
        queue: u32,
        /// What failed.
        source: XskError,
    },
    /// A socket could not be entered in the program's socket map.
    #[error("steering queue {queue} to its AF_XDP socket")]
    SocketMap {
        /// The RX queue.
        queue: u32,
        /// What failed.
        source: snowflock_ebpf::SocketMapError,
    },
    /// A queue thread could not be started.
    #[error("starting the receive thread of queue {queue}")]
    Thread {
        /// The RX queue.
        queue: u32,
        /// What failed.
        source: std::io::Error,
    },
}

/// What `sf net show` reports of the AF_XDP path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpReceiveStatus {
    /// The kernel's id of the attached program.
    pub program_id: u32,
    /// Native or generic.
    pub mode: XdpMode,
    /// The RX queues with a socket.
    pub queues: Vec<u32>,
    /// Whether the sockets receive without copying.
    pub zero_copy: bool,
    /// UMEM frame size.
    pub frame_size: u32,
    /// The program's counters.
    pub counters: XdpCounters,
    /// Packets the kernel dropped for the sockets, summed.
    pub socket_dropped: u64,
    /// Of those, because an RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found a fill ring empty.
    pub fill_ring_empty: u64,
    /// Packets handed to the receiver core.
    pub packets: u64,
    /// Packets that were not IPv4/UDP datagrams (nothing else should be steered here).
    pub not_udp: u64,
}

/// Counters a queue thread publishes.
#[derive(Debug, Default)]
struct QueueCounters {
    packets: AtomicU64,
    not_udp: AtomicU64,
    socket_dropped: AtomicU64,
    rx_ring_full: AtomicU64,
    fill_ring_empty: AtomicU64,
}

/// Marks held pages in the program's presence bitmap.
struct PresenceHook(FamilyBits);

impl HeldPages for PresenceHook {
    fn held(&self, _family: u64, page: u64) {
        self.0.mark(page);
    }
}

/// The running AF_XDP path.
pub(crate) struct XdpPath {
    /// Taken out (and so detached) when the path stops.
    program: Mutex<Option<Arc<McdistXdp>>>,
    queues: Vec<u32>,
    zero_copy: bool,
    frame_size: u32,
    counters: Vec<Arc<QueueCounters>>,
    stopping: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    families: Mutex<HashMap<u64, FamilyBits>>,
}

impl std::fmt::Debug for XdpPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpPath")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// Where the UDP payload of an Ethernet frame carrying IPv4/UDP lies, or `None`.
fn udp_payload(frame: &[u8]) -> Option<Range<usize>> {
    const ETHERTYPE_IPV4: u16 = 0x0800;
    const ETHERNET_HEADER_LEN: usize = 14;
    const UDP: u8 = 17;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETHERNET_HEADER_LEN..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || header_len < 20 || *ip.get(9)? != UDP {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let udp = ip.get(header_len..total.min(ip.len()))?;
    let udp_len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    let payload_len = udp_len.min(udp.len()).checked_sub(8)?;
    let start = ETHERNET_HEADER_LEN + header_len + 8;
    Some(start..start + payload_len)
}

fn bind_with_retry(ifindex: u32, queue: u32, config: &XskConfig) -> Result<XskSocket, XskError> {
    let deadline = Instant::now() + BIND_RETRY;
    loop {
        match XskSocket::bind(ifindex, queue, config) {
            Err(XskError::Bind { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn queue_thread(
    mut socket: XskSocket,
    core: Arc<ReceiverCore>,
    counters: Arc<QueueCounters>,
    stopping: Arc<AtomicBool>,
) {
    let mut last_stats = Instant::now();
    while !stopping.load(Ordering::Relaxed) {
        // Ready or timed out, the receive below finds out.
        if let Err(error) = socket.wait(POLL_TIMEOUT) {
            tracing::warn!(%error, queue = socket.queue_id(), "waiting on the AF_XDP socket failed");
            std::thread::sleep(POLL_TIMEOUT);
        }
        loop {
            let mut not_udp = 0u64;
            let received = socket.receive_batch(BATCH, |frames| {
                let payloads = frames.iter_mut().filter_map(|frame| {
                    let payload = udp_payload(frame).map(|range| &mut frame[range]);
                    not_udp += u64::from(payload.is_none());
                    payload
                });
                core.on_datagrams(payloads);
            });
            counters
                .packets
                .fetch_add(received as u64 - not_udp, Ordering::Relaxed);
            counters.not_udp.fetch_add(not_udp, Ordering::Relaxed);
            if received < BATCH {
                break;
            }
        }
        if last_stats.elapsed() >= Duration::from_millis(100) {
            last_stats = Instant::now();
            if let Ok(stats) = socket.stats() {
                counters
                    .socket_dropped
                    .store(stats.rx_dropped, Ordering::Relaxed);
                counters
                    .rx_ring_full
                    .store(stats.rx_ring_full, Ordering::Relaxed);
                counters
                    .fill_ring_empty
                    .store(stats.rx_fill_ring_empty_descs, Ordering::Relaxed);
            }
        }
    }
}

/// The RX queues that get a socket: the configured ones, or every channel in use.
fn receive_queues(config: &XdpReceiveConfig, device: &netdev::DeviceInfo) -> Vec<u32> {
    if config.queues.is_empty() {
        // The channels in use, not the queues allocated (veth allocates one per CPU
        // but runs one).
        let active = device
            .channels
            .map(|c| c.rx + c.combined)
            .filter(|&n| n > 0)
            .unwrap_or(device.rx_queues);
        (0..active.max(1)).collect()
    } else {
        config.queues.clone()
    }
}

/// Binds a socket to each of `queues` and steers the queue's fragments to it.
fn bind_queues(
    program: &McdistXdp,
    ifindex: u32,
    queues: &[u32],
    config: &XdpReceiveConfig,
) -> Result<Vec<XskSocket>, XdpPathError> {
    let mut sockets = Vec::with_capacity(queues.len());
    for &queue in queues {
        let socket = bind_with_retry(ifindex, queue, &config.socket).map_err(|source| {
            XdpPathError::Bind {
                ifname: config.ifname.clone(),
                queue,
                source,
            }
        })?;
        program
            .set_socket(queue, socket.as_fd())
            .map_err(|source| XdpPathError::SocketMap { queue, source })?;
        sockets.push(socket);
    }
    Ok(sockets)
}

impl XdpPath {
    /// Attaches the program to `config.ifname` (in the calling thread's network namespace),
    /// binds a socket per queue and starts their threads, which feed `core`.
    pub(crate) fn start(
        core: &Arc<ReceiverCore>,
        port: u16,
        config: &XdpReceiveConfig,
    ) -> Result<XdpPath, XdpPathError> {
        let device = netdev::query(&config.ifname).map_err(|source| XdpPathError::Queues {
            ifname: config.ifname.clone(),
            source,
        })?;
        // Fragments are sized for the path MTU (at most MAX_FRAGMENT_MTU); a frame that
        // cannot hold one would drop every page.
        let frame_mtu = device.mtu.min(MAX_FRAGMENT_MTU);
        if config.socket.frame_size < frame_mtu + 14 + XDP_COPY_HEADROOM {
            return Err(XdpPathError::FrameTooSmall {
                ifname: config.ifname.clone(),
                frame_size: config.socket.frame_size,
                mtu: frame_mtu,
            });
        }
        let program = McdistXdp::attach(&AttachConfig {
            ifname: config.ifname.clone(),
            mode: config.mode,
            udp_port: port,
        })
        .map_err(|source| XdpPathError::Attach {
            ifname: config.ifname.clone(),
            source: Box::new(source),
        })?;
        let info = program.info();
        let queues = receive_queues(config, &device);
        let sockets = bind_queues(&program, info.ifindex, &queues, config)?;
        let zero_copy = sockets.iter().all(|s| s.mode() == XskMode::ZeroCopy);
        let mut path = XdpPath {
            program: Mutex::new(Some(Arc::new(program))),
            queues: queues.clone(),
            zero_copy,
            frame_size: config.socket.frame_size,
            counters: Vec::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            families: Mutex::new(HashMap::new()),
        };
        for socket in sockets {
            let queue = socket.queue_id();
            let counters = Arc::new(QueueCounters::default());
            path.counters.push(counters.clone());
            let core = Arc::clone(core);
            let stopping = path.stopping.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sf-xdp-q{queue}"))
                .spawn(move || queue_thread(socket, core, counters, stopping))
                .map_err(|source| XdpPathError::Thread { queue, source })?;
            lock(&path.threads).push(thread);
        }
        tracing::info!(
            ifname = %config.ifname,
            program_id = info.program_id,
            mode = ?config.mode,
            queues = ?queues,
            zero_copy,
            "AF_XDP receive path ready"
        );
        Ok(path)
    }

    /// Registers `join`'s family with the program; the hook marks its held pages.
    pub(crate) fn register(&self, join: &FamilyJoin) -> Result<Arc<dyn HeldPages>, JoinError> {
        let program = lock(&self.program).clone().ok_or(JoinError::Stopped)?;
        let bits = program
            .add_family(join.family, join.generation, join.pages)
            .map_err(|source| JoinError::Xdp {
                family: join.family,
                source,
            })?;
        lock(&self.families).insert(join.family, bits.clone());
        Ok(Arc::new(PresenceHook(bits)))
    }

    /// Unregisters a family: its fragments pass to the kernel again.
    pub(crate) fn unregister(&self, family: u64) {
        let program = lock(&self.program).clone();
        if lock(&self.families).remove(&family).is_some()
            && let Some(program) = program
            && let Err(error) = program.remove_family(family)
        {
            tracing::warn!(%error, family = format_args!("{family:#x}"), "unregistering a family from the XDP program failed");
        }
    }

    /// `None` once stopped.
    pub(crate) fn status(&self) -> Option<XdpReceiveStatus> {
        let program = lock(&self.program).clone()?;
        let sum = |f: fn(&QueueCounters) -> &AtomicU64| -> u64 {
            self.counters
                .iter()
                .map(|c| f(c).load(Ordering::Relaxed))
                .sum()
        };
        let info = program.info();
        Some(XdpReceiveStatus {
            program_id: info.program_id,
            mode: info.mode,
            queues: self.queues.clone(),
            zero_copy: self.zero_copy,
            frame_size: self.frame_size,
            counters: program.counters(),
            socket_dropped: sum(|c| &c.socket_dropped),
            rx_ring_full: sum(|c| &c.rx_ring_full),
            fill_ring_empty: sum(|c| &c.fill_ring_empty),
            packets: sum(|c| &c.packets),
            not_udp: sum(|c| &c.not_udp),
        })
    }

    /// Stops the queue threads (bounded by their poll timeout), closes the sockets and
    /// detaches the program when the last reference to it goes.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let threads: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("an AF_XDP queue thread panicked");
            }
        }
        lock(&self.families).clear();
        // Dropping the program detaches it; pages' bit handles keep only the bitmap mapping.
        lock(&self.program).take();
    }
}

impl Drop for XdpPath {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    /// The payload [`super::udp_payload`] finds in `frame`.
    fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
        super::udp_payload(frame).map(|range| &frame[range])
    }

    fn frame(payload: &[u8], ihl: u8, protocol: u8) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let ip_len = usize::from(ihl) * 4;
        let total = ip_len + 8 + payload.len();
        let mut ip = vec![0u8; ip_len];
        ip[0] = 0x40 | ihl;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[9] = protocol;
        f.extend_from_slice(&ip);
        let mut udp = vec![0u8; 8];
        udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&udp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn finds_the_udp_payload_with_and_without_ip_options() {
        assert_eq!(udp_payload(&frame(b"hello", 5, 17)), Some(&b"hello"[..]));
        assert_eq!(udp_payload(&frame(b"hello", 6, 17)), Some(&b"hello"[..]));
        let mut padded = frame(b"hi", 5, 17);
        padded.extend_from_slice(&[0; 20]);
        assert_eq!(udp_payload(&padded), Some(&b"hi"[..]));
    }

    #[test]
    fn refuses_what_is_not_ipv4_udp() {
        assert_eq!(udp_payload(&frame(b"x", 5, 6)), None);
        assert_eq!(udp_payload(&frame(b"x", 4, 17)), None);
        let mut v6 = frame(b"x", 5, 17);
        v6[12] = 0x86;
        v6[13] = 0xdd;
        assert_eq!(udp_payload(&v6), None);
        let whole = frame(b"payload", 5, 17);
        for len in 0..whole.len() - 7 {
            assert!(udp_payload(&whole[..len]).is_none_or(|p| p.len() < 7));
        }
        assert_eq!(udp_payload(&[]), None);
    }
}
