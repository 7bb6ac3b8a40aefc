//! NIC inspection and tuning for `sf net show` / `sf net tune`.
//!
//! [`query`] reads what decides how the page transport should use an interface: its MTU (the
//! fragment size), its RX/TX queue counts and ethtool channel counts (how many queues an XDP
//! program and AF_XDP sockets can spread over), its ring sizes, and which XDP program is
//! attached in which mode. [`set_channels`] and [`set_rings`] change the counts and sizes;
//! [`interface_for_addr`] finds the interface that carries a local address.
//!
//! Everything acts in the network namespace of the calling thread, and every function blocks.
//! Link and address attributes come from rtnetlink, channels and ring sizes from the ethtool
//! generic-netlink family. Those crates are async: each call runs its own current-thread tokio
//! runtime on a short-lived helper thread (which inherits the caller's network namespace), so
//! the functions work from sync code and from inside a tokio runtime alike; async callers
//! should still use `spawn_blocking` to keep a worker free while the kernel answers. Ring
//! sizes are changed through the `SIOCETHTOOL` ioctl, since the `ethtool` crate can read them
//! but offers no request to change them.
//!
//! Devices without ring or channel support (veth has no rings) report `None` from [`query`]
//! and [`NetdevError::NotSupported`] from the setters.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::thread;
use std::time::Duration;

use ethtool::{EthtoolAttr, EthtoolChannelAttr, EthtoolError, EthtoolHandle, EthtoolRingAttr};
use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};
use serde::Serialize;

/// Upper bound of one operation's exchange with the kernel. The kernel answers in
/// microseconds unless another task holds the RTNL lock for long.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest interface name the kernel accepts (`IFNAMSIZ` less the terminating NUL).
const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// What [`query`] found out about one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Interface name, as the kernel reports it.
    pub name: String,
    /// Interface index in its network namespace.
    pub ifindex: u32,
    /// MTU in bytes.
    pub mtu: u32,
    /// Number of RX queues the device was created with (`IFLA_NUM_RX_QUEUES`).
    pub rx_queues: u32,
    /// Number of TX queues the device was created with (`IFLA_NUM_TX_QUEUES`).
    pub tx_queues: u32,
    /// ethtool channel counts, `None` when the driver does not report them.
    pub channels: Option<Channels>,
    /// ethtool ring sizes, `None` when the driver does not report them.
    pub rings: Option<Rings>,
    /// The XDP program attached to the interface, if any.
    pub xdp: XdpAttachment,
}

/// ethtool channel counts (`ethtool -l`): current counts and the driver's maxima. A kind of
/// channel the driver does not have counts 0 with maximum 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Channels {
    /// RX-only channels.
    pub rx: u32,
    /// TX-only channels.
    pub tx: u32,
    /// Channels with both an RX and a TX queue.
    pub combined: u32,
    /// Maximum RX-only channels.
    pub max_rx: u32,
    /// Maximum TX-only channels.
    pub max_tx: u32,
    /// Maximum combined channels.
    pub max_combined: u32,
}

/// ethtool ring sizes in descriptors (`ethtool -g`): current sizes and the driver's maxima.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rings {
    /// RX ring size.
    pub rx: u32,
    /// TX ring size.
    pub tx: u32,
    /// Maximum RX ring size.
    pub rx_max: u32,
    /// Maximum TX ring size.
    pub tx_max: u32,
}

/// The XDP program attached to an interface (`IFLA_XDP`), serialized as
/// `{"mode": "driver", "prog_id": 42}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum XdpAttachment {
    /// No XDP program.
    None,
    /// Native mode, run by the driver.
    Driver {
        /// Kernel id of the program (`bpftool prog show id N`).
        prog_id: u32,
    },
    /// Generic (SKB) mode, run by the kernel after the driver built an skb.
    Generic {
        /// Kernel id of the program.
        prog_id: u32,
    },
    /// Offloaded to the NIC.
    Offload {
        /// Kernel id of the program.
        prog_id: u32,
    },
    /// Programs in more than one mode at once.
    Multiple,
    /// An attach mode this build does not know (from a newer kernel).
    Unrecognized,
}

/// A device setting that a driver may not support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunable {
    /// ethtool ring sizes (`ethtool -g/-G`).
    Rings,
    /// ethtool channel counts (`ethtool -l/-L`).
    Channels,
}

impl std::fmt::Display for Tunable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tunable::Rings => "ring sizes",
            Tunable::Channels => "channel counts",
        })
    }
}

/// Why a query or a change of an interface failed.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    /// The name cannot be an interface name.
    #[error("invalid interface name {ifname:?}: {reason}")]
    InvalidName {
        /// The name given.
        ifname: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No interface of that name in the calling thread's network namespace.
    #[error("no interface named {ifname:?} in this network namespace")]
    NoSuchInterface {
        /// The name given.
        ifname: String,
    },
    /// No interface in the calling thread's network namespace carries the address.
    #[error("no interface in this network namespace carries the address {addr}")]
    AddressNotFound {
        /// The address given.
        addr: Ipv4Addr,
    },
    /// The driver does not support reading or changing this setting.
    #[error("{ifname}: the driver does not support {what}")]
    NotSupported {
        /// The setting.
        what: Tunable,
        /// The interface.
        ifname: String,
    },
    /// A requested count or size is above the driver's maximum.
    #[error("{ifname}: requested {what} {requested} exceeds the driver's maximum {max}")]
    ExceedsMaximum {
        /// The setting, e.g. `"rx channels"`.
        what: &'static str,
        /// The interface.
        ifname: String,
        /// The value asked for.
        requested: u32,
        /// The driver's maximum.
        max: u32,
    },
    /// The kernel answered with an error (the request was refused, or is not permitted).
    #[error("{ifname}: failed to {action}")]
    Kernel {
        /// What was attempted, e.g. `"set channel counts"`.
        action: &'static str,
        /// The interface (or the address looked up).
        ifname: String,
        /// The kernel's error number.
        #[source]
        source: io::Error,
    },
    /// The netlink exchange itself failed (socket, family lookup, unexpected message).
    #[error("{ifname}: netlink request to {action} failed")]
    Netlink {
        /// What was attempted.
        action: &'static str,
        /// The interface (or the address looked up).
        ifname: String,
        /// The netlink library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The kernel's reply lacked something it always carries.
    #[error("{ifname}: malformed kernel reply: {detail}")]
    MalformedReply {
        /// The interface (or the address looked up).
        ifname: String,
        /// What was missing.
        detail: &'static str,
    },
    /// The kernel did not answer within the operation's time limit.
    #[error("{action} did not complete within {timeout:?}")]
    TimedOut {
        /// What was attempted.
        action: &'static str,
        /// The time limit.
        timeout: Duration,
    },
    /// A thread, runtime or socket for talking to the kernel could not be created.
    #[error("failed to create the {what} for talking to the kernel")]
    Setup {
        /// What could not be created.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Reads the link attributes, channel counts, ring sizes and XDP attachment of `ifname`.
///
/// Fails with [`NetdevError::NoSuchInterface`] when the calling thread's namespace has no
/// such interface; a driver without channels or rings gives `None` for them, not an error.
pub fn query(ifname: &str) -> Result<DeviceInfo, NetdevError> {
    validate_name(ifname)?;
    run_on_helper_thread("query interface", || query_async(ifname))
}

/// Changes the RX and/or TX ring sizes of `ifname` (`ethtool -G`); `None` keeps a size.
///
/// Fails with [`NetdevError::NotSupported`] when the driver has no ring settings,
/// [`NetdevError::ExceedsMaximum`] above the driver's maximum, and [`NetdevError::Kernel`]
/// when the driver refuses the sizes.
pub fn set_rings(ifname: &str, rx: Option<u32>, tx: Option<u32>) -> Result<(), NetdevError> {
    validate_name(ifname)?;
    let socket = ring_ioctl::EthtoolSocket::open().map_err(|source| NetdevError::Setup {
        what: "ethtool ioctl socket",
        source,
    })?;
    let mut params = socket
        .ring_params(ifname)
        .map_err(|source| os_error(source, "read ring sizes", ifname, Tunable::Rings))?;
    check_maximum("rx ring size", ifname, rx, params.rx_max_pending)?;
    check_maximum("tx ring size", ifname, tx, params.tx_max_pending)?;
    let old = (params.rx_pending, params.tx_pending);
    params.rx_pending = rx.unwrap_or(params.rx_pending);
    params.tx_pending = tx.unwrap_or(params.tx_pending);
    if (params.rx_pending, params.tx_pending) == old {
        return Ok(());
    }
    socket
        .set_ring_params(ifname, &params)
        .map_err(|source| os_error(source, "set ring sizes", ifname, Tunable::Rings))?;
    tracing::info!(
        ifname,
        rx = params.rx_pending,
        tx = params.tx_pending,
        "changed ring sizes"
    );
    Ok(())
}

/// Changes the RX, TX and/or combined channel counts of `ifname` (`ethtool -L`); `None` keeps
/// a count.
///
/// Fails with [`NetdevError::NotSupported`] when the driver has no channel settings,
/// [`NetdevError::ExceedsMaximum`] above the driver's maximum (0 for a kind of channel the
/// driver lacks), and [`NetdevError::Kernel`] when the kernel refuses the counts (for
/// example no RX or no TX channel left).
pub fn set_channels(
    ifname: &str,
    rx: Option<u32>,
    tx: Option<u32>,
    combined: Option<u32>,
) -> Result<(), NetdevError> {
    validate_name(ifname)?;
    run_on_helper_thread("set channel counts", || async move {
        let mut handle = ethtool_handle()?;
        let current = channels(&mut handle, ifname).await?;
        check_maximum("rx channels", ifname, rx, current.max_rx)?;
        check_maximum("tx channels", ifname, tx, current.max_tx)?;
        check_maximum("combined channels", ifname, combined, current.max_combined)?;
        let mut request = handle.channel().set(ifname);
        if let Some(count) = rx {
            request = request.rx_count(count);
        }
        if let Some(count) = tx {
            request = request.tx_count(count);
        }
        if let Some(count) = combined {
            request = request.combined_count(count);
        }
        request.execute().await.map_err(|error| {
            ethtool_error(error, "set channel counts", ifname, Tunable::Channels)
        })?;
        tracing::info!(ifname, ?rx, ?tx, ?combined, "changed channel counts");
        Ok(())
    })
}

/// Names the interface that carries the local IPv4 address `addr`: where to attach XDP for
/// traffic to that address, and whose MTU bounds its packets.
pub fn interface_for_addr(addr: Ipv4Addr) -> Result<String, NetdevError> {
    run_on_helper_thread("find interface for address", || async move {
        let handle = route_handle()?;
        let label = addr.to_string();
        let mut request = handle.address().get();
        request.message_mut().header.family = AddressFamily::Inet;
        let mut replies = request.execute();
        let mut carrier = None;
        while let Some(message) = replies
            .try_next()
            .await
            .map_err(|error| route_error(error, "list IPv4 addresses", &label))?
        {
            if carrier.is_none() && local_ipv4(&message.attributes) == Some(addr) {
                carrier = Some(message.header.index);
            }
        }
        let ifindex = carrier.ok_or(NetdevError::AddressNotFound { addr })?;
        let link = handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_next()
            .await
            .map_err(|error| route_error(error, "read link attributes", &label))?
            .ok_or(NetdevError::AddressNotFound { addr })?;
        link.attributes
            .into_iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
            .ok_or(NetdevError::MalformedReply {
                ifname: label,
                detail: "link without IFLA_IFNAME",
            })
    })
}

/// The local address of an IPv4 address message: `IFA_LOCAL`, which differs from
/// `IFA_ADDRESS` (the peer) on point-to-point links, or `IFA_ADDRESS` when there is no
/// `IFA_LOCAL`.
fn local_ipv4(attributes: &[AddressAttribute]) -> Option<Ipv4Addr> {
    let v4 = |ip: &IpAddr| match ip {
        IpAddr::V4(ip) => Some(*ip),
        IpAddr::V6(_) => None,
    };
    let local = attributes.iter().find_map(|attribute| match attribute {
        AddressAttribute::Local(ip) => v4(ip),
        _ => None,
    });
    local.or_else(|| {
        attributes.iter().find_map(|attribute| match attribute {
            AddressAttribute::Address(ip) => v4(ip),
            _ => None,
        })
    })
}

async fn query_async(ifname: &str) -> Result<DeviceInfo, NetdevError> {
    let route = route_handle()?;
    let link = route
        .link()
        .get()
        .match_name(ifname)
        .execute()
        .try_next()
        .await
        .map_err(|error| route_error(error, "read link attributes", ifname))?
        .ok_or_else(|| NetdevError::NoSuchInterface {
            ifname: ifname.to_owned(),
        })?;
    let mut ethtool = ethtool_handle()?;
    let channels = unless_not_supported(channels(&mut ethtool, ifname).await)?;
    let rings = unless_not_supported(rings(&mut ethtool, ifname).await)?;
    device_info(link, ifname, channels, rings)
}

fn device_info(
    link: LinkMessage,
    ifname: &str,
    channels: Option<Channels>,
    rings: Option<Rings>,
) -> Result<DeviceInfo, NetdevError> {
    let malformed = |detail| NetdevError::MalformedReply {
        ifname: ifname.to_owned(),
        detail,
    };
    let (mut name, mut mtu, mut rx_queues, mut tx_queues) = (None, None, None, None);
    let mut xdp = XdpAttachment::None;
    for attribute in link.attributes {
        match attribute {
            LinkAttribute::IfName(value) => name = Some(value),
            LinkAttribute::Mtu(value) => mtu = Some(value),
            LinkAttribute::NumRxQueues(value) => rx_queues = Some(value),
            LinkAttribute::NumTxQueues(value) => tx_queues = Some(value),
            LinkAttribute::Xdp(attributes) => {
                xdp = xdp_attachment(&attributes).map_err(malformed)?
            }
            _ => {}
        }
    }
    Ok(DeviceInfo {
        name: name.ok_or_else(|| malformed("link without IFLA_IFNAME"))?,
        ifindex: link.header.index,
        mtu: mtu.ok_or_else(|| malformed("link without IFLA_MTU"))?,
        rx_queues: rx_queues.ok_or_else(|| malformed("link without IFLA_NUM_RX_QUEUES"))?,
        tx_queues: tx_queues.ok_or_else(|| malformed("link without IFLA_NUM_TX_QUEUES"))?,
        channels,
        rings,
        xdp,
    })
}

/// Decodes `IFLA_XDP`. The kernel names the program in `IFLA_XDP_PROG_ID` when one mode is
/// attached, and per mode (`IFLA_XDP_DRV_PROG_ID`, ...) always; either is accepted.
fn xdp_attachment(attributes: &[LinkXdp]) -> Result<XdpAttachment, &'static str> {
    let (mut mode, mut prog, mut driver, mut generic, mut offload) = (None, None, None, None, None);
    for attribute in attributes {
        match *attribute {
            LinkXdp::Attached(value) => mode = Some(value),
            LinkXdp::ProgId(id) => prog = Some(id),
            LinkXdp::DrvProgId(id) => driver = Some(id),
            LinkXdp::SkbProgId(id) => generic = Some(id),
            LinkXdp::HwProgId(id) => offload = Some(id),
            _ => {}
        }
    }
    let prog_id = |per_mode: Option<u32>| {
        prog.or(per_mode)
            .ok_or("XDP program attached without a program id")
    };
    Ok(match mode {
        None | Some(XdpAttached::None) => XdpAttachment::None,
        Some(XdpAttached::Driver) => XdpAttachment::Driver {
            prog_id: prog_id(driver)?,
        },
        Some(XdpAttached::SocketBuffer) => XdpAttachment::Generic {
            prog_id: prog_id(generic)?,
        },
        Some(XdpAttached::Hardware) => XdpAttachment::Offload {
            prog_id: prog_id(offload)?,
        },
        Some(XdpAttached::Multiple) => XdpAttachment::Multiple,
        Some(other) => {
            tracing::warn!(mode = ?other, "unrecognized XDP attach mode");
            XdpAttachment::Unrecognized
        }
    })
}

async fn channels(handle: &mut EthtoolHandle, ifname: &str) -> Result<Channels, NetdevError> {
    const ACTION: &str = "read channel counts";
    let failed = |error| ethtool_error(error, ACTION, ifname, Tunable::Channels);
    let reply = handle
        .channel()
        .get(Some(ifname))
        .execute()
        .await
        .map_err(failed)?
        .try_next()
        .await
        .map_err(failed)?
        .ok_or_else(|| NetdevError::MalformedReply {
            ifname: ifname.to_owned(),
            detail: "no reply to the channels request",
        })?;
    // The kernel leaves out the attributes of kinds of channel the driver does not have.
    let mut channels = Channels::default();
    for attribute in reply.payload.nlas {
        let EthtoolAttr::Channel(attribute) = attribute else {
            continue;
        };
        match attribute {
            EthtoolChannelAttr::RxCount(count) => channels.rx = count,
            EthtoolChannelAttr::TxCount(count) => channels.tx = count,
            EthtoolChannelAttr::CombinedCount(count) => channels.combined = count,
            EthtoolChannelAttr::RxMax(max) => channels.max_rx = max,
            EthtoolChannelAttr::TxMax(max) => channels.max_tx = max,
            EthtoolChannelAttr::CombinedMax(max) => channels.max_combined = max,
            _ => {}
        }
    }
    Ok(channels)
}

async fn rings(handle: &mut EthtoolHandle, ifname: &str) -> Result<Rings, NetdevError> {
    const ACTION: &str = "read ring sizes";
    let failed = |error| ethtool_error(error, ACTION, ifname, Tunable::Rings);
    let reply = handle
        .ring()
        .get(Some(ifname))
        .execute()
        .await
        .map_err(failed)?
        .try_next()
        .await
        .map_err(failed)?
        .ok_or_else(|| NetdevError::MalformedReply {
            ifname: ifname.to_owned(),
            detail: "no reply to the rings request",
        })?;
    let mut rings = Rings::default();
    for attribute in reply.payload.nlas {
        let EthtoolAttr::Ring(attribute) = attribute else {
            continue;
        };
        match attribute {
            EthtoolRingAttr::Rx(size) => rings.rx = size,
            EthtoolRingAttr::Tx(size) => rings.tx = size,
            EthtoolRingAttr::RxMax(max) => rings.rx_max = max,
            EthtoolRingAttr::TxMax(max) => rings.tx_max = max,
            _ => {}
        }
    }
    Ok(rings)
}

fn unless_not_supported<T>(result: Result<T, NetdevError>) -> Result<Option<T>, NetdevError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(NetdevError::NotSupported { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

fn check_maximum(
    what: &'static str,
    ifname: &str,
    requested: Option<u32>,
    max: u32,
) -> Result<(), NetdevError> {
    match requested {
        Some(requested) if requested > max => Err(NetdevError::ExceedsMaximum {
            what,
            ifname: ifname.to_owned(),
            requested,
            max,
        }),
        _ => Ok(()),
    }
}

/// Rejects names the kernel would never accept (its `dev_valid_name`), so that they get a
/// clear error instead of an `EINVAL` from deep inside a request.
fn validate_name(ifname: &str) -> Result<(), NetdevError> {
    let reason = if ifname.is_empty() {
        "empty"
    } else if ifname.len() > MAX_IFNAME_LEN {
        "longer than 15 bytes"
    } else if ifname == "." || ifname == ".." {
        "reserved"
    } else if ifname
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        "contains '/', ':', NUL or whitespace"
    } else {
        return Ok(());
    };
    Err(NetdevError::InvalidName {
        ifname: ifname.to_owned(),
        reason,
    })
}

/// Runs the future `make` builds on a new thread with its own current-thread runtime.
///
/// A fresh thread starts in the network namespace of the thread that creates it, so the
/// netlink sockets the future opens see the caller's namespace; and it is never inside a
/// runtime, so `block_on` cannot collide with a runtime of the caller's.
fn run_on_helper_thread<T, F>(
    action: &'static str,
    make: impl FnOnce() -> F + Send,
) -> Result<T, NetdevError>
where
    T: Send,
    F: Future<Output = Result<T, NetdevError>>,
{
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name("sf-netdev".to_owned())
            .spawn_scoped(scope, || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(|source| NetdevError::Setup {
                        what: "tokio runtime",
                        source,
                    })?;
                runtime.block_on(async {
                    tokio::time::timeout(OPERATION_TIMEOUT, make())
                        .await
                        .map_err(|_| NetdevError::TimedOut {
                            action,
                            timeout: OPERATION_TIMEOUT,
                        })?
                })
            })
            .map_err(|source| NetdevError::Setup {
                what: "helper thread",
                source,
            })?;
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Opens an rtnetlink connection; must run inside the helper thread's runtime.
fn route_handle() -> Result<rtnetlink::Handle, NetdevError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetdevError::Setup {
            what: "rtnetlink socket",
            source,
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Opens an ethtool generic-netlink connection; must run inside the helper thread's runtime.
fn ethtool_handle() -> Result<EthtoolHandle, NetdevError> {
    let (connection, handle, _) =
        ethtool::new_connection().map_err(|source| NetdevError::Setup {
            what: "ethtool netlink socket",
            source,
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

fn route_error(error: rtnetlink::Error, action: &'static str, ifname: &str) -> NetdevError {
    match error {
        rtnetlink::Error::NetlinkError(message) => {
            let source = message.to_io();
            match source.raw_os_error() {
                Some(libc::ENODEV) => NetdevError::NoSuchInterface {
                    ifname: ifname.to_owned(),
                },
                _ => NetdevError::Kernel {
                    action,
                    ifname: ifname.to_owned(),
                    source,
                },
            }
        }
        other => NetdevError::Netlink {
            action,
            ifname: ifname.to_owned(),
            source: Box::new(other),
        },
    }
}

fn ethtool_error(
    error: EthtoolError,
    action: &'static str,
    ifname: &str,
    what: Tunable,
) -> NetdevError {
    match error {
        EthtoolError::NetlinkError(message) => os_error(message.to_io(), action, ifname, what),
        other => NetdevError::Netlink {
            action,
            ifname: ifname.to_owned(),
            source: Box::new(other),
        },
    }
}

fn os_error(source: io::Error, action: &'static str, ifname: &str, what: Tunable) -> NetdevError {
    let ifname = ifname.to_owned();
    match source.raw_os_error() {
        Some(libc::ENODEV) => NetdevError::NoSuchInterface { ifname },
        Some(libc::EOPNOTSUPP) => NetdevError::NotSupported { what, ifname },
        _ => NetdevError::Kernel {
            action,
            ifname,
            source,
        },
    }
}

/// Ring sizes through the `SIOCETHTOOL` ioctl (`ETHTOOL_GRINGPARAM` / `ETHTOOL_SRINGPARAM`).
mod ring_ioctl {
    use std::ffi::c_char;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// `ETHTOOL_GRINGPARAM` from `<linux/ethtool.h>`.
    const ETHTOOL_GRINGPARAM: u32 = 0x10;
    /// `ETHTOOL_SRINGPARAM` from `<linux/ethtool.h>`.
    const ETHTOOL_SRINGPARAM: u32 = 0x11;

    /// `struct ethtool_ringparam` from `<linux/ethtool.h>`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct RingParams {
        cmd: u32,
        pub(super) rx_max_pending: u32,
        rx_mini_max_pending: u32,
        rx_jumbo_max_pending: u32,
        pub(super) tx_max_pending: u32,
        pub(super) rx_pending: u32,
        rx_mini_pending: u32,
        rx_jumbo_pending: u32,
        pub(super) tx_pending: u32,
    }

    /// A datagram socket to address ethtool ioctls to; the kernel serves them in the network
    /// namespace the socket was created in.
    #[derive(Debug)]
    pub(super) struct EthtoolSocket(OwnedFd);

    impl EthtoolSocket {
        pub(super) fn open() -> io::Result<EthtoolSocket> {
            // SAFETY: socket(2) takes no pointers; the flags are valid constants.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just returned by socket(2), is open, and nothing else owns it.
            Ok(EthtoolSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        pub(super) fn ring_params(&self, ifname: &str) -> io::Result<RingParams> {
            let mut params = RingParams {
                cmd: ETHTOOL_GRINGPARAM,
                ..RingParams::default()
            };
            self.ethtool(ifname, &mut params)?;
            Ok(params)
        }

        pub(super) fn set_ring_params(&self, ifname: &str, params: &RingParams) -> io::Result<()> {
            let mut params = RingParams {
                cmd: ETHTOOL_SRINGPARAM,
                ..*params
            };
            self.ethtool(ifname, &mut params)
        }

        /// Issues `SIOCETHTOOL` for `ifname` (already validated: at most 15 bytes, no NUL)
        /// with `params` as the command buffer.
        fn ethtool(&self, ifname: &str, params: &mut RingParams) -> io::Result<()> {
            let mut name = [0 as c_char; libc::IFNAMSIZ];
            for (slot, byte) in name.iter_mut().zip(ifname.bytes()) {
                *slot = byte as c_char;
            }
            let mut request = libc::ifreq {
                ifr_name: name,
                ifr_ifru: libc::__c_anonymous_ifr_ifru {
                    ifru_data: (params as *mut RingParams).cast(),
                },
            };
            // SAFETY: the socket is open; `request` is a valid `ifreq` with a NUL-terminated
            // name (IFNAMSIZ bytes, the name at most IFNAMSIZ - 1), and its data pointer
            // refers to `params`, a live `ethtool_ringparam` the kernel reads and writes
            // within its size, exclusively borrowed for the duration of the call.
            let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}
