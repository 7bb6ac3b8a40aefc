//! `netdev` against the real kernel: a veth pair with 4 RX/TX queues and MTU 1400 in a private
//! network namespace, queried from a thread that entered that namespace and checked against
//! what `ip` and `ethtool` report.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use snowflock_dataplane::netdev::{self, Channels, NetdevError, Rings, Tunable, XdpAttachment};

/// The veth end the tests inspect, and its peer.
const DEV: &str = "sfnd0";
const PEER: &str = "sfnd1";
const DEV_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const QUEUES: u32 = 4;
const MTU: u32 = 1400;

/// A private network namespace holding the veth pair; deleting it (on drop, also when a test
/// fails) removes the pair with it.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn with_veth_pair() -> TestNetns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sftnd{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let netns = TestNetns { name };
        let mtu = MTU.to_string();
        let queues = format!("numrxqueues {QUEUES} numtxqueues {QUEUES}");
        let add = format!("link add name {DEV} {queues} type veth peer name {PEER} {queues}");
        netns.ip(&add.split(' ').collect::<Vec<_>>());
        for (dev, addr) in [(DEV, DEV_ADDR), (PEER, PEER_ADDR)] {
            netns.ip(&["link", "set", "dev", dev, "mtu", &mtu, "up"]);
            netns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
        }
        netns
    }

    /// Runs `ip -n NETNS ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) -> Output {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `ip netns exec NETNS ethtool ARGS`, successful or not.
    fn ethtool(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "ethtool"])
            .args(args)
            .output()
            .expect("run ethtool")
    }

    /// Runs `body` on a thread that entered the namespace.
    fn run<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
        let netns = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: `netns` is an open network-namespace file for the whole call;
                    // setns only switches this thread, which ends after `body`.
                    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    body()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `ethtool -l` of DEV, with "n/a" as 0 like `netdev` reports absent kinds of channel.
    fn ethtool_channels(&self) -> Channels {
        let output = self.ethtool(&["-l", DEV]);
        assert!(output.status.success(), "ethtool -l: {output:?}");
        let (max, current) = ethtool_sections(&output);
        Channels {
            rx: current("RX"),
            tx: current("TX"),
            combined: current("Combined"),
            max_rx: max("RX"),
            max_tx: max("TX"),
            max_combined: max("Combined"),
        }
    }

    /// `ethtool -g` of DEV; `None` when the driver does not support rings.
    fn ethtool_rings(&self) -> Option<Rings> {
        let output = self.ethtool(&["-g", DEV]);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains("Operation not supported"),
                "ethtool -g: {output:?}"
            );
            return None;
        }
        let (max, current) = ethtool_sections(&output);
        Some(Rings {
            rx: current("RX"),
            tx: current("TX"),
            rx_max: max("RX"),
            tx_max: max("TX"),
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let deleted = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !deleted.is_ok_and(|output| output.status.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("run command");
    assert!(output.status.success(), "{command:?}: {output:?}");
    output
}

/// Splits `ethtool -l/-g` output into lookups of its "Pre-set maximums" and "Current hardware
/// settings" sections (`"RX:\t\t4"` lines; "n/a" and missing keys are 0).
fn ethtool_sections(output: &Output) -> (impl Fn(&str) -> u32, impl Fn(&str) -> u32) {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (max, current) = text
        .split_once("Current hardware settings:")
        .expect("ethtool output without current settings");
    let lookup = |section: String| {
        move |key: &str| {
            section
                .lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim() == key)
                .map_or(0, |(_, value)| value.trim().parse().unwrap_or(0))
        }
    };
    (lookup(max.to_owned()), lookup(current.to_owned()))
}

#[test]
fn query_reports_the_veth_link_attributes() {
    let netns = TestNetns::with_veth_pair();
    let link_json = netns.ip(&["-j", "link", "show", "dev", DEV]).stdout;
    let link: serde_json::Value = serde_json::from_slice(&link_json).expect("ip -j output");
    let ifindex = link[0]["ifindex"]
        .as_u64()
        .expect("ifindex in ip -j output");

    let (info, from_async) = netns.run(|| {
        let info = netdev::query(DEV).expect("query");
        // Calling from inside a runtime must neither panic nor see another namespace.
        let from_async = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(async { netdev::query(DEV) })
            .expect("query from async code");
        (info, from_async)
    });

    assert_eq!(info.name, DEV);
    assert_eq!(u64::from(info.ifindex), ifindex);
    assert_eq!(info.mtu, MTU);
    assert_eq!((info.rx_queues, info.tx_queues), (QUEUES, QUEUES));
    assert_eq!(info.xdp, XdpAttachment::None);
    assert_eq!(info.channels, Some(netns.ethtool_channels()));
    assert_eq!(
        info.channels.map(|c| (c.max_rx, c.max_tx)),
        Some((QUEUES, QUEUES))
    );
    assert_eq!(info.rings, netns.ethtool_rings());
    assert_eq!(from_async, info);

    let json = serde_json::to_value(&info).expect("serialize");
    assert_eq!(json["mtu"], MTU);
    assert_eq!(json["xdp"], serde_json::json!({ "mode": "none" }));
}

#[test]
fn interface_for_addr_names_the_interface_carrying_the_address() {
    let netns = TestNetns::with_veth_pair();
    let unassigned = Ipv4Addr::new(10, 201, 0, 3);
    let (dev, peer, missing) = netns.run(|| {
        (
            netdev::interface_for_addr(DEV_ADDR),
            netdev::interface_for_addr(PEER_ADDR),
            netdev::interface_for_addr(unassigned),
        )
    });
    assert_eq!(dev.expect("address of DEV"), DEV);
    assert_eq!(peer.expect("address of PEER"), PEER);
    assert!(
        matches!(missing, Err(NetdevError::AddressNotFound { addr }) if addr == unassigned),
        "{missing:?}"
    );
}

#[test]
fn set_channels_changes_the_veth_channel_counts() {
    let netns = TestNetns::with_veth_pair();
    let (changed, after, too_many, no_combined, too_few) = netns.run(|| {
        let changed = netdev::set_channels(DEV, Some(2), Some(3), None);
        let after = netdev::query(DEV).expect("query after set_channels");
        (
            changed,
            after,
            netdev::set_channels(DEV, Some(QUEUES + 1), None, None),
            netdev::set_channels(DEV, None, None, Some(1)),
            netdev::set_channels(DEV, Some(0), Some(0), None),
        )
    });

    changed.expect("set_channels rx 2 tx 3");
    let channels = after.channels.expect("veth reports channels");
    assert_eq!((channels.rx, channels.tx), (2, 3));
    assert_eq!(netns.ethtool_channels(), channels);

    assert!(
        matches!(
            too_many,
            Err(NetdevError::ExceedsMaximum { what: "rx channels", requested, max, .. })
                if requested == QUEUES + 1 && max == QUEUES
        ),
        "{too_many:?}"
    );
    // veth has no combined channels: its maximum is 0.
    assert!(
        matches!(
            no_combined,
            Err(NetdevError::ExceedsMaximum {
                what: "combined channels",
                max: 0,
                ..
            })
        ),
        "{no_combined:?}"
    );
    // The kernel insists on at least one RX and one TX channel.
    match too_few {
        Err(NetdevError::Kernel { action, source, .. }) => {
            assert_eq!(action, "set channel counts");
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
        }
        other => panic!("zero channels: {other:?}"),
    }
    assert_eq!(
        netns.ethtool_channels(),
        channels,
        "refused changes changed nothing"
    );
}

#[test]
fn set_rings_agrees_with_ethtool_g() {
    let netns = TestNetns::with_veth_pair();
    let expected = netns.ethtool_rings();
    let (reported, unchanged, too_big) = netns.run(|| {
        let reported = netdev::query(DEV).expect("query").rings;
        let current = reported.unwrap_or_default();
        (
            reported,
            netdev::set_rings(DEV, Some(current.rx), Some(current.tx)),
            netdev::set_rings(DEV, Some(current.rx_max.saturating_add(1)), None),
        )
    });

    assert_eq!(reported, expected);
    match expected {
        None => {
            for result in [unchanged, too_big] {
                assert!(
                    matches!(
                        &result,
                        Err(NetdevError::NotSupported { what: Tunable::Rings, ifname }) if ifname == DEV
                    ),
                    "{result:?}"
                );
            }
        }
        Some(rings) => {
            unchanged.expect("set_rings to the current sizes");
            assert!(
                matches!(too_big, Err(NetdevError::ExceedsMaximum { what: "rx ring size", max, .. }) if max == rings.rx_max),
                "{too_big:?}"
            );
            assert_eq!(netns.ethtool_rings(), Some(rings));
        }
    }
}

#[test]
fn unknown_and_invalid_interface_names_are_clear_errors() {
    let netns = TestNetns::with_veth_pair();
    let unknown = "sfnd9";
    let (query, rings, channels) = netns.run(|| {
        (
            netdev::query(unknown),
            netdev::set_rings(unknown, Some(256), None),
            netdev::set_channels(unknown, Some(1), None, None),
        )
    });
    for error in [query.map(|_| ()), rings, channels] {
        let error = error.expect_err("unknown interface");
        assert!(
            matches!(&error, NetdevError::NoSuchInterface { ifname } if ifname == unknown),
            "{error:?}"
        );
        assert!(error.to_string().contains(unknown), "{error}");
    }

    for invalid in ["", "a/b", "a:b", "has space", "sixteen-bytes-xx"] {
        let error = netdev::query(invalid).expect_err("invalid name");
        assert!(
            matches!(&error, NetdevError::InvalidName { ifname, .. } if ifname == invalid),
            "{invalid:?}: {error:?}"
        );
    }
}
