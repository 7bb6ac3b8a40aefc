//! The cluster's network: a switch namespace holding one bridge, and one namespace per host
//! linked to it by a veth pair; also its MTU, and deleting its namespaces.
//!
//! Nothing here touches the root namespace: links are created from inside a cluster namespace
//! (`ip -n NS link add ...`) with their peer placed directly in another cluster namespace.

use std::fs;
use std::io;
use std::thread;

use crate::command::ip;
use crate::error::{MtuError, PurgeError, TeardownError, TeardownFailure, UpError};
use crate::netns;
use crate::prefix::validate_prefix;
use crate::process::KILL_TIMEOUT;
use crate::record::{ClusterRecord, HostInfo};

/// Where `br_netfilter` (loaded by container runtimes, among others) keeps its switches: on,
/// every frame the bridge forwards runs the host's IPv4, IPv6 and ARP firewall hooks.
const BRIDGE_FIREWALL_SYSCTLS: [&str; 3] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
    "/proc/sys/net/bridge/bridge-nf-call-arptables",
];

/// Builds the switch and every host's namespace and link. Each namespace is pushed onto
/// `created` as soon as it exists, so that whatever was built can be torn down if a later step
/// fails.
pub(crate) fn build(record: &ClusterRecord, created: &mut Vec<String>) -> Result<(), UpError> {
    let switch = record.switch.as_str();
    add_namespace(switch, created)?;
    ip(&[
        "-n",
        switch,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    ])
    .and_then(|_| ip(&["-n", switch, "link", "set", "br0", "up"]))
    .map_err(|source| UpError::CreateBridge {
        netns: switch.to_owned(),
        source,
    })?;
    plain_switch(switch).map_err(|source| UpError::BridgeFirewall {
        netns: switch.to_owned(),
        source,
    })?;
    for host in &record.hosts {
        add_namespace(&host.netns, created)?;
        link_host(host, switch)?;
    }
    Ok(())
}

/// Gives `host` its `eth0`, a veth whose peer is a port of the bridge in `switch`, with the
/// host's address and the multicast route.
fn link_host(host: &HostInfo, switch: &str) -> Result<(), UpError> {
    // The switch-side end is named after the host namespace, e.g. `sfab12cd-h3`.
    let port = host.netns.as_str();
    ip(&[
        "-n",
        &host.netns,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        switch,
    ])
    .and_then(|_| ip(&["-n", switch, "link", "set", port, "master", "br0", "up"]))
    .map_err(|source| UpError::CreateLink {
        host: host.name.clone(),
        source,
    })?;
    let address = format!("{}/24", host.address);
    let steps: [&[&str]; 4] = [
        &["-n", &host.netns, "link", "set", "lo", "up"],
        &["-n", &host.netns, "addr", "add", &address, "dev", "eth0"],
        &["-n", &host.netns, "link", "set", "eth0", "up"],
        &[
            "-n",
            &host.netns,
            "route",
            "add",
            "224.0.0.0/4",
            "dev",
            "eth0",
        ],
    ];
    for step in steps {
        ip(step).map_err(|source| UpError::ConfigureHost {
            host: host.name.clone(),
            source,
        })?;
    }
    Ok(())
}

fn add_namespace(name: &str, created: &mut Vec<String>) -> Result<(), UpError> {
    ip(&["netns", "add", name]).map_err(|source| UpError::CreateNamespace {
        netns: name.to_owned(),
        source,
    })?;
    created.push(name.to_owned());
    Ok(())
}

/// Makes the bridges of namespace `switch` plain L2 switches: turns off `br_netfilter`'s
/// firewall hooks there (the switches are per namespace; other namespaces keep theirs), which
/// would otherwise cost every forwarded frame a pass through the firewall. Without
/// `br_netfilter` there is nothing to turn off.
fn plain_switch(switch: &str) -> io::Result<()> {
    let switch = switch.to_owned();
    // /proc/sys/net belongs to the namespace of the thread that opens it.
    thread::spawn(move || -> io::Result<()> {
        netns::enter(&switch)?;
        for path in BRIDGE_FIREWALL_SYSCTLS {
            match fs::write(path, "0") {
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// Sets the MTU of every host's `eth0`, its switch port and the bridge.
pub(crate) fn set_mtu(record: &ClusterRecord, mtu: u32) -> Result<(), MtuError> {
    let switch = record.switch.as_str();
    let mtu = mtu.to_string();
    for host in &record.hosts {
        let fail = |source| MtuError {
            host: host.name.clone(),
            source,
        };
        ip(&["-n", &host.netns, "link", "set", "eth0", "mtu", &mtu]).map_err(fail)?;
        ip(&["-n", switch, "link", "set", &host.netns, "mtu", &mtu]).map_err(fail)?;
    }
    ip(&["-n", switch, "link", "set", "br0", "mtu", &mtu]).map_err(|source| MtuError {
        host: "br0".into(),
        source,
    })?;
    Ok(())
}

/// Deletes every namespace a cluster with `prefix` would have (`{prefix}-sw`, `{prefix}-h{N}`),
/// first SIGKILLing the processes inside each (bounded by [`KILL_TIMEOUT`] per namespace).
/// For cleaning up when `cluster.json` is lost; files are not touched. Returns the namespaces
/// it deleted.
pub fn purge_prefix(prefix: &str) -> Result<Vec<String>, PurgeError> {
    validate_prefix(prefix)?;
    let mut names = netns::list(prefix).map_err(|source| PurgeError::ListNamespaces { source })?;
    // Hosts before the switch.
    names.sort_by_key(|name| name.ends_with("-sw"));
    let mut failures = Vec::new();
    remove_namespaces(&names, &mut failures);
    if failures.is_empty() {
        Ok(names)
    } else {
        Err(TeardownError {
            prefix: prefix.to_owned(),
            failures,
        }
        .into())
    }
}

/// Kills the processes in, then deletes, each of `names` in order; missing ones are skipped.
pub(crate) fn remove_namespaces(names: &[String], failures: &mut Vec<TeardownFailure>) {
    for name in names {
        match netns::kill_processes_in(name, KILL_TIMEOUT) {
            Ok(alive) if alive.is_empty() => {}
            Ok(pids) => failures.push(TeardownFailure::NamespaceBusy {
                netns: name.clone(),
                pids,
                waited: KILL_TIMEOUT,
            }),
            Err(source) => failures.push(TeardownFailure::KillNamespace {
                netns: name.clone(),
                source,
            }),
        }
        if netns::exists(name)
            && let Err(source) = ip(&["netns", "delete", name])
        {
            failures.push(TeardownFailure::DeleteNamespace {
                netns: name.clone(),
                source,
            });
        }
    }
}
