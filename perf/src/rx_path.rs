//! `rx-path`: pages per second received and installed into guest memory
//! on one host, through each mcdist receive path, against three ceilings
//! measured in the same run (`--measure` picks some of the five, e.g. one
//! path alone to profile it).
//!
//! Two network-namespace hosts (a cluster whose daemons distribute by
//! unicast, so the mcdist port and the interface's XDP hook are free): an
//! mcdist sender on h1 serves a family of `pages` pages from memory; on h2 a
//! fault handler's region (a hollow clone's memory, a private view of the
//! family's host cache, without a vCPU) asks for every page at once
//! ([`FaultHandler::prefetch`]) and each arriving page is written into the
//! cache, which is the clone's memory. The rate is pages installed over the
//! time from the request to the last install.
//!
//! - `install_ceiling`: the same fault handler and install path, its pages
//!   delivered from memory on the requesting thread (one `pwritev` per
//!   request's run of pages), no network.
//! - `uffdio_copy_ceiling`: the kernel's bulk install rate, `UFFDIO_COPY` of
//!   256 KiB chunks from resident memory into a fresh registered region.
//! - `delivery_ceiling`: how fast the sender's pages reach the receiving host when that host
//!   does no receive work at all: the XDP program drops every fragment at the interface (the
//!   family's presence bits are all set) and counts it, and a requester keeps a deep window
//!   of requests open (`DELIVERY_WINDOW` pages). No receive path can install pages faster
//!   than this sender (with its `--send-threads`) delivers them, so this bounds both paths,
//!   and `delivery_to_sockets` bounds what AF_XDP (or any receive path) can gain over kernel
//!   sockets with it.
//! - `sockets`: kernel UDP sockets driven by io_uring.
//! - `af_xdp`: the XDP program and AF_XDP sockets (copy mode on veth).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use memmap2::{MmapOptions, MmapRaw};
use serde_json::{Map, Value, json};
use snowflock_control::daemon::memory::FamilySink;
use snowflock_dataplane::auth::{ClusterKey, KeyId};
use snowflock_dataplane::mcast::wire::{
    self, Fragmentation, Header, MAX_REQUEST_PAGES, McastKey, REQUEST_JOIN, REQUEST_LEAVE,
};
use snowflock_dataplane::mcast::{
    FamilyJoin, McastReceiver, McastServer, McastServerConfig, ReceiverConfig, XdpReceiveConfig,
};
use snowflock_dataplane::server::PageStore;
use snowflock_dataplane::xdp::XskConfig;
use snowflock_ebpf::{AttachConfig, McdistXdp, XdpMode};
use snowflock_fault_handler::{AvoidMap, Family, FaultHandler, FetchConfig, PageSource, ceiling};
use snowflock_testkit::{ClusterSpec, NetnsCluster, enter_netns};

use crate::record::Sink;
use crate::remote::{default_sfd, emit};
use crate::sync::lock;

const PORT: u16 = 7173;
const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 1);
const FAMILY: u64 = 0x5f_7278;
/// Every install finishes well within this, or the run failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Page `n` of the served image: its number in every 8 bytes.
struct PatternImage(u64);

impl PageStore for PatternImage {
    fn page_count(&self) -> u64 {
        self.0
    }

    fn read_page(&self, page: u64, buf: &mut [u8; 4096]) -> std::io::Result<()> {
        for word in buf.as_chunks_mut::<8>().0 {
            *word = page.to_le_bytes();
        }
        Ok(())
    }
}

/// Hands requests to the receiver.
struct ReceiverSource(Weak<McastReceiver>);

impl PageSource for ReceiverSource {
    fn request(&self, family: u64, pages: &[u64]) {
        if let Some(receiver) = self.0.upgrade() {
            receiver.request(family, pages);
        }
    }
}

/// Delivers from memory on the requesting thread: the install path alone.
struct MemorySource {
    family: std::sync::OnceLock<Weak<Family>>,
    image: PatternImage,
}

impl PageSource for MemorySource {
    fn request(&self, _family: u64, pages: &[u64]) {
        let Some(family) = self.family.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut data = vec![[0u8; 4096]; pages.len()];
        for (page, buf) in pages.iter().zip(&mut data) {
            let _ = self.image.read_page(*page, buf);
        }
        let batch: Vec<(u64, &[u8])> = pages
            .iter()
            .zip(&data)
            .map(|(p, d)| (*p, d.as_slice()))
            .collect();
        family.deliver_batch(&batch);
    }
}

/// A private view of the family's page cache standing in for a hollow clone's guest memory,
/// unmapped on drop. Raw pointers only: the fault handler installs its pages behind our back.
struct Region(MmapRaw);

impl Region {
    fn of(family: &Family) -> Result<Region> {
        let len = (family.cache().page_count() * 4096) as usize;
        // SAFETY: a fresh private mapping of the cache memfd where the kernel picks; no
        // existing memory is affected. The cache's memfd is sized once, when the family is
        // made, and never truncated, so every page of the mapping stays backed.
        let map = unsafe {
            MmapOptions::new()
                .len(len)
                .no_reserve_swap()
                .map_copy(&family.cache().memfd())
        };
        let map = map.map_err(|error| anyhow!("mmap: {error}"))?;
        Ok(Region(map.into()))
    }

    /// First byte of the region.
    fn addr(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }

    /// The first word of `page` (installed pages only: reading a missing one would fault).
    fn word(&self, page: u64) -> u64 {
        let offset = (page * 4096) as usize;
        assert!(offset + 8 <= self.0.len());
        let word = self.addr().wrapping_add(offset).cast::<u64>();
        // SAFETY: in bounds of the mapping (checked), aligned (a page start), and the page
        // is installed, so the read does not wait on the userfaultfd.
        unsafe { word.read_volatile() }
    }
}

/// Installs every page of `family` into a fresh region; returns pages/s.
fn install_all(family: Arc<Family>, pages: u64) -> Result<f64> {
    let region = Region::of(&family)?;
    let failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let noted = failure.clone();
    // SAFETY: `region` is a private view of the family's whole cache that nothing has
    // touched, and it outlives the handler: the handler is closed below before `region` is
    // dropped.
    let handler = unsafe {
        FaultHandler::start(
            family,
            region.addr(),
            pages * 4096,
            AvoidMap::none(pages).context("an empty avoidance map")?,
            Arc::new(move |e| {
                *lock(&noted) = Some(e.to_string());
            }),
        )
    }
    .context("starting the fault handler")?;
    let all: Vec<u64> = (0..pages).collect();
    let start = Instant::now();
    handler.prefetch(&all);
    let mut spins = 0u64;
    let elapsed = loop {
        if handler.stats().pages_fetched >= pages {
            break start.elapsed();
        }
        if let Some(why) = lock(&failure).clone() {
            handler.close();
            bail!("installing failed: {why}");
        }
        if start.elapsed() > RUN_TIMEOUT {
            handler.close();
            bail!(
                "{} of {pages} pages installed after {RUN_TIMEOUT:?}",
                handler.stats().pages_fetched
            );
        }
        spins += 1;
        if spins > 1000 {
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    for page in (0..pages).step_by(97) {
        let word = region.word(page);
        if word != page {
            handler.close();
            bail!("page {page} holds {word:#x}");
        }
    }
    handler.close();
    drop(region);
    Ok(pages as f64 / elapsed.as_secs_f64())
}

fn fetch_config() -> FetchConfig {
    FetchConfig {
        fetch_timeout: Duration::from_secs(60),
        prefetch_pages: 0,
        fault_around_pages: 0,
        huge_blocks: false,
    }
}

/// Pages the delivery-ceiling requester keeps requested and not yet arrived: deep enough that
/// the sender never waits for requests.
const DELIVERY_WINDOW: u64 = 4096;
/// The rate the delivery-ceiling requester reports (the sender's `max_rate` caps it).
const DELIVERY_REPORTED_RATE: u32 = 2_000_000;
/// With everything requested, arrivals that stop for this long mean the rest was lost.
const DELIVERY_SETTLE: Duration = Duration::from_millis(200);
/// Without an arrival for this long, the requester sends more anyway (the window's pages
/// were lost: the sender's queue or the bridge dropped them).
const DELIVERY_STALL: Duration = Duration::from_millis(20);
/// The receiver id of the delivery-ceiling requester.
const DELIVERY_REQUESTER: u32 = 0xce11;

/// Pages per second that reach the receiving host's interface when it does no receive work:
/// the XDP program counts and drops every fragment of the family (all its presence bits are
/// set), while a requester on the same host asks for every page with a deep window. Pages
/// whose fragments did not all arrive are not counted; the time runs to the last arrival.
fn delivery_ceiling(
    key: &ClusterKey,
    local: Ipv4Addr,
    server: SocketAddrV4,
    generation: u32,
    pages: u64,
    mtu: u32,
) -> Result<f64> {
    let xdp = McdistXdp::attach(&AttachConfig {
        ifname: "eth0".into(),
        mode: XdpMode::Native,
        udp_port: PORT,
    })
    .context("attaching the XDP program")?;
    let bits = xdp
        .add_family(FAMILY, generation, pages)
        .context("registering the family with the XDP program")?;
    for page in 0..pages {
        bits.mark(page);
    }
    let socket = std::net::UdpSocket::bind(SocketAddrV4::new(local, PORT))
        .context("binding the requester")?;
    let key = McastKey::new(key);
    let per_page = u64::from(Fragmentation::for_mtu(mtu).count);
    let arrived = |xdp: &McdistXdp| xdp.counters().duplicate_dropped / per_page;
    let mut datagram = Vec::new();
    let mut send = |flags: u16, list: &[u64]| -> Result<()> {
        let header = Header {
            flags,
            family: FAMILY,
            generation,
            sender: DELIVERY_REQUESTER,
        };
        wire::encode_request(&key, &mut datagram, &header, DELIVERY_REPORTED_RATE, list)
            .context("encoding a request")?;
        socket
            .send_to(&datagram, server)
            .context("sending a request")?;
        Ok(())
    };
    let start = Instant::now();
    send(REQUEST_JOIN, &[])?;
    let mut requested = 0u64;
    let mut last_count = 0u64;
    let mut last_arrival = start;
    loop {
        let now = Instant::now();
        let count = arrived(&xdp);
        if count != last_count {
            last_count = count;
            last_arrival = now;
        }
        if count >= pages || (requested == pages && now - last_arrival >= DELIVERY_SETTLE) {
            break;
        }
        if now - start > RUN_TIMEOUT {
            bail!("{count} of {pages} pages arrived after {RUN_TIMEOUT:?}");
        }
        let stalled = now - last_arrival >= DELIVERY_STALL;
        let mut in_flight = requested.saturating_sub(count);
        while requested < pages && (in_flight < DELIVERY_WINDOW || stalled) {
            let chunk = (pages - requested).min(MAX_REQUEST_PAGES as u64);
            let list: Vec<u64> = (requested..requested + chunk).collect();
            send(0, &list)?;
            requested += chunk;
            in_flight += chunk;
            if stalled {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let count = arrived(&xdp);
    send(REQUEST_LEAVE, &[])?;
    if count == 0 {
        bail!("no page reached the receiving host");
    }
    let took = last_arrival.saturating_duration_since(start);
    eprintln!(
        "rx-path: delivery: {count} of {pages} pages whole at the interface in {took:?}; program: {:?}",
        xdp.counters()
    );
    Ok(count as f64 / took.as_secs_f64().max(f64::MIN_POSITIVE))
}

/// Pages per `UFFDIO_COPY` of the bulk ceiling (256 KiB).
const BULK_CHUNK_PAGES: u64 = 64;

/// The kernel's bulk install rate: `UFFDIO_COPY` of 256 KiB chunks into a fresh region.
fn bulk_copy_rate(pages: u64) -> Result<f64> {
    let took =
        ceiling::bulk_copy(pages, BULK_CHUNK_PAGES).context("the bulk UFFDIO_COPY ceiling")?;
    Ok(pages as f64 / took.as_secs_f64())
}

fn ceiling(pages: u64) -> Result<f64> {
    let source = Arc::new(MemorySource {
        family: std::sync::OnceLock::new(),
        image: PatternImage(pages),
    });
    let family = Family::new(FAMILY, pages * 4096, source.clone(), fetch_config())?;
    let _ = source.family.set(Arc::downgrade(&family));
    install_all(family, pages)
}

fn receiver_config(local: Ipv4Addr) -> ReceiverConfig {
    ReceiverConfig {
        local_addr: local,
        port: PORT,
        rto_min: Duration::from_millis(10),
        rto_max: Duration::from_millis(500),
        unicast_after: 3,
        initial_rate: 200_000,
        max_rate: 2_000_000,
        report_interval: Duration::from_millis(50),
        ..ReceiverConfig::default()
    }
}

fn over_network(
    receiver: &Arc<McastReceiver>,
    server: SocketAddrV4,
    key: KeyId,
    generation: u32,
    pages: u64,
) -> Result<f64> {
    let source = Arc::new(ReceiverSource(Arc::downgrade(receiver)));
    let family = Family::new(FAMILY, pages * 4096, source, fetch_config())?;
    receiver
        .join(
            FamilyJoin {
                family: FAMILY,
                generation,
                key,
                group: GROUP,
                server,
                pages,
                holding: false,
            },
            Arc::new(FamilySink(family.clone())),
        )
        .context("joining the family")?;
    let rate = install_all(family, pages);
    if let Some(stats) = receiver.family_stats(FAMILY) {
        eprintln!(
            "rx-path: {}: {} fragments, {} duplicate, {} re-requests, {} rate cuts, {} partial pages dropped, rate {} pages/s",
            if receiver.uses_xdp() {
                "af_xdp"
            } else {
                "sockets"
            },
            stats.fragments,
            stats.duplicate_fragments,
            stats.re_requests,
            stats.rate_cuts,
            stats.partials_dropped,
            stats.rate
        );
    }
    if let Some(xdp) = receiver.xdp_status() {
        eprintln!(
            "rx-path: af_xdp sockets: {} dropped ({} with the RX ring full), fill ring empty {} times; program: {:?}",
            xdp.socket_dropped, xdp.rx_ring_full, xdp.fill_ring_empty, xdp.counters
        );
    }
    receiver.leave(FAMILY);
    rate
}

/// One rate `rx-path` measures; each run measures the chosen ones in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Measure {
    /// `uffdio_copy_ceiling`.
    UffdioCopy,
    /// `install_ceiling`.
    Install,
    /// `delivery_ceiling`.
    Delivery,
    /// `sockets`.
    Sockets,
    /// `af_xdp`.
    AfXdp,
}

impl Measure {
    /// Every measure, in run order.
    pub const ALL: [Measure; 5] = [
        Measure::UffdioCopy,
        Measure::Install,
        Measure::Delivery,
        Measure::Sockets,
        Measure::AfXdp,
    ];

    fn metric(self) -> &'static str {
        match self {
            Measure::UffdioCopy => "uffdio_copy_ceiling",
            Measure::Install => "install_ceiling",
            Measure::Delivery => "delivery_ceiling",
            Measure::Sockets => "sockets",
            Measure::AfXdp => "af_xdp",
        }
    }
}

/// Each measure's rate per run.
type Rates = std::collections::BTreeMap<Measure, Vec<f64>>;

/// What the sender thread is asked to do.
enum ToServer {
    /// Register the family anew; answer its generation.
    Register(mpsc::Sender<u32>),
    Stop,
}

/// `rx-path`.
pub fn run(
    runs: u32,
    pages: u32,
    mtu: u32,
    send_threads: usize,
    measures: &[Measure],
    sink: &mut dyn Sink,
) -> Result<()> {
    let mut measures = measures.to_vec();
    measures.sort_unstable();
    measures.dedup();
    if measures.is_empty() {
        bail!("nothing to measure");
    }
    let pages = u64::from(pages);
    if !pages.is_multiple_of(BULK_CHUNK_PAGES) {
        bail!("--pages must be a multiple of {BULK_CHUNK_PAGES}");
    }
    let dir = tempfile::tempdir().context("creating a cluster directory")?;
    let mut spec = ClusterSpec::new(2, dir.path(), default_sfd()?);
    spec.log_filter = "warn".into();
    spec.mcdist
        .insert("distribution".into(), toml::Value::String("unicast".into()));
    let cluster = NetnsCluster::up(spec).context("starting two netns hosts")?;
    if mtu != 1500 {
        cluster.set_mtu(mtu).context("setting the MTU")?;
    }
    let h1 = cluster.host(0)?.clone();
    let h2 = cluster.host(1)?.clone();
    let key = ClusterKey::generate();
    let server_addr = SocketAddrV4::new(h1.address, PORT);

    let (to_server, orders) = mpsc::channel::<ToServer>();
    let (ready_tx, ready) = mpsc::channel::<Result<(), String>>();
    let server_key = key.clone();
    let server_ns = h1.netns.clone();
    let server_thread = std::thread::spawn(move || {
        let bound = enter_netns(&server_ns)
            .map_err(|e| format!("entering {server_ns}: {e}"))
            .and_then(|()| {
                McastServer::bind(
                    McastServerConfig {
                        bind: server_addr,
                        group_port: PORT,
                        mtu,
                        suppression: Duration::from_millis(5),
                        initial_rate: 200_000,
                        max_rate: 2_000_000,
                        receiver_idle: Duration::from_millis(200),
                        push: false,
                        send_threads,
                        repair_percent: 0,
                    },
                    &server_key,
                )
                .map_err(|e| format!("binding the sender: {e}"))
            });
        let server = match bound {
            Ok(server) => {
                let _ = ready_tx.send(Ok(()));
                server
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        while let Ok(order) = orders.recv() {
            match order {
                ToServer::Register(reply) => {
                    server.unregister(FAMILY);
                    let generation = server.register(FAMILY, GROUP, Arc::new(PatternImage(pages)));
                    let _ = reply.send(generation);
                }
                ToServer::Stop => break,
            }
        }
        server.shutdown();
    });
    ready
        .recv_timeout(Duration::from_secs(30))
        .context("the sender thread did not start")?
        .map_err(anyhow::Error::msg)?;

    let register = || -> Result<u32> {
        let (tx, rx) = mpsc::channel();
        to_server
            .send(ToServer::Register(tx))
            .context("the sender thread ended")?;
        rx.recv_timeout(Duration::from_secs(10))
            .context("no generation from the sender")
    };

    let params: Map<String, Value> = [
        ("pages".to_string(), json!(pages)),
        ("mtu".to_string(), json!(mtu)),
        ("send_threads".to_string(), json!(send_threads)),
    ]
    .into_iter()
    .collect();
    let key_for_receiver = key.clone();
    let local = h2.address;
    let netns = h2.netns.clone();
    let measured = std::thread::scope(|s| {
        s.spawn(|| -> Result<Rates> {
            enter_netns(&netns).with_context(|| format!("entering {netns}"))?;
            let mut rates = Rates::default();
            for run in 0..runs {
                eprintln!("rx-path: run {}/{runs}", run + 1);
                for &measure in &measures {
                    let rate = match measure {
                        Measure::UffdioCopy => bulk_copy_rate(pages)?,
                        Measure::Install => ceiling(pages)?,
                        Measure::Delivery => delivery_ceiling(
                            &key_for_receiver,
                            local,
                            server_addr,
                            register()?,
                            pages,
                            mtu,
                        )?,
                        Measure::Sockets => {
                            let sockets = Arc::new(McastReceiver::start(
                                receiver_config(local),
                                &key_for_receiver,
                            )?);
                            let rate = over_network(
                                &sockets,
                                server_addr,
                                key_for_receiver.id(),
                                register()?,
                                pages,
                            );
                            sockets.shutdown();
                            rate?
                        }
                        Measure::AfXdp => {
                            let xdp = Arc::new(
                                McastReceiver::start_xdp(
                                    receiver_config(local),
                                    &key_for_receiver,
                                    &XdpReceiveConfig {
                                        ifname: "eth0".into(),
                                        mode: XdpMode::Native,
                                        queues: Vec::new(),
                                        socket: XskConfig::default(),
                                    },
                                )
                                .context("on the receiving host")?,
                            );
                            let rate = over_network(
                                &xdp,
                                server_addr,
                                key_for_receiver.id(),
                                register()?,
                                pages,
                            );
                            xdp.shutdown();
                            rate?
                        }
                    };
                    rates.entry(measure).or_default().push(rate);
                }
            }
            Ok(rates)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the receiving thread panicked"))?
    });
    let _ = to_server.send(ToServer::Stop);
    let _ = server_thread.join();
    cluster.down()?;
    let rates = measured?;
    for (measure, list) in &rates {
        emit(sink, "rx-path", measure.metric(), list, "pages/s", &params)?;
    }
    let per_run = |a: &[f64], b: &[f64]| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(x, y)| x / y.max(f64::MIN_POSITIVE))
            .collect()
    };
    use Measure::{AfXdp, Delivery, Install, Sockets, UffdioCopy};
    for (metric, of, to) in [
        ("af_xdp_to_sockets", AfXdp, Sockets),
        ("af_xdp_to_ceiling", AfXdp, Install),
        ("sockets_to_ceiling", Sockets, Install),
        ("af_xdp_to_uffdio_copy", AfXdp, UffdioCopy),
        ("sockets_to_uffdio_copy", Sockets, UffdioCopy),
        ("delivery_to_sockets", Delivery, Sockets),
        ("delivery_to_uffdio_copy", Delivery, UffdioCopy),
        ("af_xdp_to_delivery", AfXdp, Delivery),
        ("sockets_to_delivery", Sockets, Delivery),
    ] {
        if let (Some(a), Some(b)) = (rates.get(&of), rates.get(&to)) {
            emit(sink, "rx-path", metric, &per_run(a, b), "ratio", &params)?;
        }
    }
    Ok(())
}
