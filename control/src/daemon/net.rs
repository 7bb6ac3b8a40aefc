//! The host's side of mcdist: the multicast sender for the clone points it
//! serves, the receiver for the ones its hollow clones run from, the choice
//! of receive path (AF_XDP or kernel sockets, with a logged fallback), and
//! the operator's view of all of it (`sf net show|tune`).

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use snowflock_dataplane::keyring::KeyRing;
use snowflock_dataplane::mcast::{
    McastReceiver, McastServer, McastServerConfig, McastServerStats, ReceiverConfig, ReceiverStats,
    XdpReceiveConfig,
};
use snowflock_dataplane::netdev;
use snowflock_dataplane::xdp::{BusyPoll, XskConfig, ZeroCopy};
use snowflock_ebpf::XdpMode;

use crate::config::{
    ConfigProblem, DaemonConfig, Distribution, McdistSection, RxPath, XdpAttachMode,
};
use crate::error_chain;
use crate::protocol::{NetDevice, NetStatus, NetTune, XdpStatus};
use crate::sync::{lock, read, write};

/// A failure to start the host's page transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("mcdist needs an IPv4 pages address, not {0}")]
    NotIpv4(IpAddr),
    #[error("finding the interface of {addr} failed")]
    Interface {
        addr: Ipv4Addr,
        #[source]
        source: netdev::NetdevError,
    },
    #[error("starting the mcdist sender failed")]
    Server(#[source] snowflock_dataplane::mcast::McastBindError),
    #[error("starting the mcdist receiver on kernel sockets failed")]
    Receiver(#[source] snowflock_dataplane::mcast::ReceiverError),
    #[error("starting the AF_XDP receive path failed (rx_path = \"xdp\" allows no fallback)")]
    Xdp(#[source] snowflock_dataplane::mcast::ReceiverError),
}

/// Why `sf net tune` refused.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("this host distributes by unicast; there is no mcdist receive path to tune")]
    Unicast,
    #[error("{0} families are receiving pages; receive path settings change only while none is")]
    Busy(usize),
    #[error("invalid setting: {0}")]
    Invalid(ConfigProblem),
    #[error("changing the NIC's {what} failed")]
    Nic {
        what: &'static str,
        #[source]
        source: netdev::NetdevError,
    },
    #[error(transparent)]
    Start(#[from] NetError),
}

/// "xdp", "sockets" or "none": the receive path of `active`.
fn path_name(active: Option<&ActiveReceiver>) -> &'static str {
    match active {
        Some(active) if active.receiver.uses_xdp() => "xdp",
        Some(_) => "sockets",
        None => "none",
    }
}

/// The receiver in use and how it came to be.
struct ActiveReceiver {
    receiver: Arc<McastReceiver>,
    /// Why AF_XDP is not in use although it was asked for.
    fallback: Option<String>,
}

/// The mcdist endpoints of this host.
pub struct NetPlane {
    host: String,
    interface: String,
    local: Ipv4Addr,
    key: KeyRing,
    settings: Mutex<McdistSection>,
    /// The fault-around block of this host's clones (`[limits] fault_around_pages`), whose
    /// pages one REQUEST asks for in ascending runs: the receiver reads loss from them.
    request_block_pages: u64,
    server: Option<Arc<McastServer>>,
    receiver: RwLock<Option<ActiveReceiver>>,
}

impl std::fmt::Debug for NetPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPlane")
            .field("interface", &self.interface)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// What the receive path reports.
struct Receiving {
    rx: ReceiverStats,
    xdp: Option<XdpStatus>,
    fallback: Option<String>,
    families: u32,
}

impl NetPlane {
    /// Starts the sender and the receiver of this host (none by unicast).
    pub fn start(config: &DaemonConfig, key: &KeyRing) -> Result<NetPlane, NetError> {
        let settings = config.mcdist.clone();
        let local = match config.listen.pages.ip() {
            IpAddr::V4(ip) => ip,
            other => return Err(NetError::NotIpv4(other)),
        };
        let mut plane = NetPlane {
            host: config.host.name.clone(),
            interface: String::new(),
            local,
            key: key.clone(),
            settings: Mutex::new(settings.clone()),
            request_block_pages: u64::from(config.limits.fault_around_pages),
            server: None,
            receiver: RwLock::new(None),
        };
        if settings.distribution == Distribution::Unicast {
            return Ok(plane);
        }
        plane.interface = if settings.interface.is_empty() {
            netdev::interface_for_addr(local).map_err(|source| NetError::Interface {
                addr: local,
                source,
            })?
        } else {
            settings.interface.clone()
        };
        let mtu = match settings.mtu {
            0 => netdev::query(&plane.interface).map_or(1500, |d| d.mtu),
            mtu => mtu,
        };
        let server = McastServer::bind(
            McastServerConfig {
                bind: SocketAddrV4::new(local, settings.port),
                group_port: settings.rx_port,
                mtu,
                suppression: Duration::from_millis(settings.suppression_ms),
                initial_rate: settings.initial_rate,
                max_rate: settings.max_rate,
                receiver_idle: Duration::from_millis(200),
                push: settings.push,
                send_threads: settings.send_threads as usize,
                repair_percent: settings.repair_percent,
            },
            key,
        )
        .map_err(NetError::Server)?;
        plane.server = Some(Arc::new(server));
        let active = plane.start_receiver(&settings)?;
        *write(&plane.receiver) = Some(active);
        tracing::info!(
            interface = %plane.interface,
            mtu,
            port = settings.port,
            rx_port = settings.rx_port,
            rx_path = plane.rx_path_name(),
            "mcdist ready"
        );
        Ok(plane)
    }

    fn receiver_config(&self, settings: &McdistSection) -> ReceiverConfig {
        ReceiverConfig {
            local_addr: self.local,
            port: settings.rx_port,
            rto_max: Duration::from_millis(200),
            unicast_after: 3,
            initial_rate: settings.initial_rate,
            max_rate: settings.max_rate,
            report_interval: Duration::from_millis(50),
            request_block_pages: self.request_block_pages,
            max_in_flight: settings.max_in_flight as usize,
            // The copies of completed pages are only of use with REPAIRs to decode.
            repair_cache_pages: if settings.repair_percent == 0 {
                0
            } else {
                ReceiverConfig::default().repair_cache_pages
            },
            ..ReceiverConfig::default()
        }
    }

    fn xdp_config(&self, settings: &McdistSection) -> XdpReceiveConfig {
        XdpReceiveConfig {
            ifname: self.interface.clone(),
            mode: match settings.xdp_mode {
                XdpAttachMode::Native => XdpMode::Native,
                XdpAttachMode::Generic => XdpMode::Generic,
            },
            queues: settings.queues.clone(),
            socket: XskConfig {
                frame_count: settings.umem_frames,
                fill_ring: settings.fill_ring,
                rx_ring: settings.rx_ring,
                busy_poll: (settings.busy_poll_us > 0).then_some(BusyPoll {
                    timeout_us: settings.busy_poll_us,
                    budget: 64,
                }),
                zero_copy: ZeroCopy::Auto,
                ..XskConfig::default()
            },
        }
    }

    fn start_receiver(&self, settings: &McdistSection) -> Result<ActiveReceiver, NetError> {
        let config = self.receiver_config(settings);
        let sockets = |fallback: Option<String>| {
            McastReceiver::start(config.clone(), &self.key)
                .map(|receiver| ActiveReceiver {
                    receiver: Arc::new(receiver),
                    fallback,
                })
                .map_err(NetError::Receiver)
        };
        match settings.rx_path {
            RxPath::Sockets => sockets(None),
            RxPath::Xdp => {
                McastReceiver::start_xdp(config.clone(), &self.key, &self.xdp_config(settings))
                    .map(|receiver| ActiveReceiver {
                        receiver: Arc::new(receiver),
                        fallback: None,
                    })
                    .map_err(NetError::Xdp)
            }
            RxPath::Auto => {
                match McastReceiver::start_xdp(
                    config.clone(),
                    &self.key,
                    &self.xdp_config(settings),
                ) {
                    Ok(receiver) => Ok(ActiveReceiver {
                        receiver: Arc::new(receiver),
                        fallback: None,
                    }),
                    Err(e) => {
                        let why = error_chain(&e);
                        tracing::warn!(
                            interface = %self.interface,
                            "AF_XDP receive path unavailable, using kernel sockets: {why}"
                        );
                        sockets(Some(why))
                    }
                }
            }
        }
    }

    /// The sender, when this host distributes by mcdist.
    pub fn server(&self) -> Option<&Arc<McastServer>> {
        self.server.as_ref()
    }

    /// The receiver new families join, when this host distributes by mcdist.
    pub fn receiver(&self) -> Option<Arc<McastReceiver>> {
        read(&self.receiver).as_ref().map(|a| a.receiver.clone())
    }

    fn rx_path_name(&self) -> &'static str {
        path_name(read(&self.receiver).as_ref())
    }

    /// Stops receiving: detaches the XDP program and closes the sockets.
    pub fn shutdown(&self) {
        if let Some(active) = write(&self.receiver).take() {
            active.receiver.shutdown();
        }
        if let Some(server) = &self.server {
            server.shutdown();
        }
    }

    /// What `sf net show` prints.
    pub fn status(&self, families_serving: u32) -> NetStatus {
        let settings = lock(&self.settings).clone();
        let device = (!self.interface.is_empty())
            .then(|| netdev::query(&self.interface).ok())
            .flatten()
            .map(|d| NetDevice {
                ifindex: d.ifindex,
                mtu: d.mtu,
                rx_queues: d.rx_queues,
                tx_queues: d.tx_queues,
                channels: d
                    .channels
                    .map(|c| (c.rx + c.combined, c.max_rx.max(c.max_combined))),
                rings: d.rings.map(|r| (r.rx, r.tx, r.rx_max, r.tx_max)),
                xdp: match d.xdp {
                    netdev::XdpAttachment::None => "none".into(),
                    netdev::XdpAttachment::Driver { prog_id } => {
                        format!("driver, program {prog_id}")
                    }
                    netdev::XdpAttachment::Generic { prog_id } => {
                        format!("generic, program {prog_id}")
                    }
                    netdev::XdpAttachment::Offload { prog_id } => {
                        format!("offload, program {prog_id}")
                    }
                    netdev::XdpAttachment::Multiple => "several programs".into(),
                    netdev::XdpAttachment::Unrecognized => "attached, mode unknown".into(),
                },
            });
        let rx_path = self.rx_path_name();
        let Receiving {
            rx,
            xdp,
            fallback,
            families,
        } = self.receiving(&settings);
        let tx = self.server_stats();
        NetStatus {
            host: self.host.clone(),
            distribution: settings.distribution,
            interface: self.interface.clone(),
            device,
            rx_path: rx_path.into(),
            fallback,
            xdp,
            rx,
            tx,
            families_receiving: families,
            families_serving,
        }
    }

    /// What this host's server did (all families since it started).
    pub fn server_stats(&self) -> McastServerStats {
        self.server
            .as_ref()
            .map(|server| server.stats())
            .unwrap_or_default()
    }

    /// What this host's receiver and its XDP program saw: cheap enough for every scrape,
    /// unlike [`NetPlane::status`], which asks the kernel about the device.
    pub fn receiving_counters(&self) -> (ReceiverStats, Option<XdpStatus>) {
        let settings = lock(&self.settings).clone();
        let receiving = self.receiving(&settings);
        (receiving.rx, receiving.xdp)
    }

    fn receiving(&self, settings: &McdistSection) -> Receiving {
        let guard = read(&self.receiver);
        let Some(active) = guard.as_ref() else {
            return Receiving {
                rx: ReceiverStats::default(),
                xdp: None,
                fallback: None,
                families: 0,
            };
        };
        let xdp = active.receiver.xdp_status().map(|x| XdpStatus {
            mode: match x.mode {
                XdpMode::Native => XdpAttachMode::Native,
                XdpMode::Generic => XdpAttachMode::Generic,
            },
            program_id: x.program_id,
            queues: x.queues.clone(),
            zero_copy: x.zero_copy,
            umem_frames: settings.umem_frames,
            frame_size: x.frame_size,
            fill_ring: settings.fill_ring,
            rx_ring: settings.rx_ring,
            busy_poll_us: settings.busy_poll_us,
            received: x.counters.received,
            redirected: x.counters.redirected,
            duplicate_dropped: x.counters.duplicate_dropped,
            passed: x.counters.passed,
            malformed: x.counters.malformed,
            socket_dropped: x.socket_dropped,
            rx_ring_full: x.rx_ring_full,
            fill_ring_empty: x.fill_ring_empty,
        });
        Receiving {
            rx: active.receiver.stats(),
            xdp,
            fallback: active.fallback.clone(),
            families: active.receiver.family_count() as u32,
        }
    }

    /// Applies `sf net tune`. NIC settings apply at once; receive path
    /// settings restart the receiver, which only happens while no family is
    /// receiving (their clones hold the current one).
    pub fn tune(&self, tune: &NetTune) -> Result<(), TuneError> {
        let mut settings = lock(&self.settings);
        if settings.distribution == Distribution::Unicast {
            return Err(TuneError::Unicast);
        }
        if tune.nic_rx_ring.is_some() || tune.nic_tx_ring.is_some() {
            netdev::set_rings(&self.interface, tune.nic_rx_ring, tune.nic_tx_ring).map_err(
                |source| TuneError::Nic {
                    what: "rings",
                    source,
                },
            )?;
        }
        if let Some(combined) = tune.nic_channels {
            netdev::set_channels(&self.interface, None, None, Some(combined)).map_err(
                |source| TuneError::Nic {
                    what: "channels",
                    source,
                },
            )?;
        }
        let mut next = settings.clone();
        if let Some(path) = tune.rx_path {
            next.rx_path = path;
        }
        if let Some(mode) = tune.xdp_mode {
            next.xdp_mode = mode;
        }
        if let Some(queues) = &tune.queues {
            next.queues = queues.clone();
        }
        if let Some(frames) = tune.umem_frames {
            next.umem_frames = frames;
        }
        if let Some(size) = tune.fill_ring {
            next.fill_ring = size;
        }
        if let Some(size) = tune.rx_ring {
            next.rx_ring = size;
        }
        if let Some(usecs) = tune.busy_poll_us {
            next.busy_poll_us = usecs;
        }
        let receive_changed = next.rx_path != settings.rx_path
            || next.xdp_mode != settings.xdp_mode
            || next.queues != settings.queues
            || next.umem_frames != settings.umem_frames
            || next.fill_ring != settings.fill_ring
            || next.rx_ring != settings.rx_ring
            || next.busy_poll_us != settings.busy_poll_us
            // A fallback is retried on request: the cause may be gone.
            || tune.rx_path.is_some();
        if !receive_changed {
            return Ok(());
        }
        next.check_receive().map_err(TuneError::Invalid)?;
        let mut slot = write(&self.receiver);
        if let Some(active) = slot.as_ref() {
            let families = active.receiver.family_count();
            if families > 0 {
                return Err(TuneError::Busy(families));
            }
        }
        if let Some(old) = slot.take() {
            old.receiver.shutdown();
        }
        let started = self.start_receiver(&next);
        match started {
            Ok(active) => {
                *slot = Some(active);
                *settings = next;
                tracing::info!(rx_path = ?settings.rx_path, "receive path retuned");
                Ok(())
            }
            Err(e) => {
                // Keep receiving with the settings that worked.
                if let Ok(active) = self.start_receiver(&settings) {
                    *slot = Some(active);
                }
                Err(e.into())
            }
        }
    }
}
