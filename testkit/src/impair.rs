//! Impairing the switch: loss and reordering of the UDP datagrams (mcdist's traffic) the switch
//! forwards to each host, while TCP (the control protocol, the memory server) is left alone.
//!
//! Each switch port gets an HTB root with three classes, and a classic-BPF classifier that
//! draws a random number per packet to pick one: 1:1 forwards at full speed, 1:2 is a
//! 200 Mbit/s class with a one-packet burst and a 2000-packet queue (its packets wait behind
//! each other, from ~0.2 ms for a page alone to milliseconds in a burst, and are overtaken by
//! later ones), 1:3 feeds a zero-length FIFO (its packets are dropped). This instead of netem,
//! because kernels without it (`CONFIG_NET_SCH_NETEM`) are common; it needs only `tc` and the
//! HTB and BPF classifier built in.
//!
//! The held-back class must delay, not lose: a packet it has no room for is a loss the caller
//! did not ask for. Its queue is long enough that mcdist's bursts fit, and [`counts`] reports
//! the packets it dropped all the same (`overflowed`), so that a measurement can show it is 0.
//! A UDP GSO message (mcdist sends each page as one) passes the switch as one packet: the
//! draw picks a class per page, and the counts below are in such packets.

use serde::Deserialize;

use crate::bpf::{Instruction, bytecode};
use crate::command::tc;
use crate::error::{ImpairCountsError, ImpairError};
use crate::record::ClusterRecord;

/// Where the IPv4 protocol byte is in a frame on a switch port: after the 14-byte Ethernet
/// header, 9 bytes into the IPv4 header.
const IPV4_PROTOCOL_OFFSET: u32 = 14 + 9;
/// The IPv4 protocol number of UDP.
const IPPROTO_UDP: u32 = 17;

/// The tc class id `major:minor`, as a classifier returns it.
const fn class_id(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}
/// Full speed; also the HTB default.
const FAST: u32 = class_id(1, 1);
/// Slow: held back behind later packets.
const SLOW: u32 = class_id(1, 2);
/// A zero-length FIFO: dropped.
const DROP: u32 = class_id(1, 3);
/// The queue under [`SLOW`] and the one under [`DROP`], as `tc` names their handles.
const SLOW_QUEUE: &str = "20:";
const DROP_QUEUE: &str = "30:";
/// The held-back class's rate and queue length (see the module comment).
const SLOW_RATE: &str = "200mbit";
const SLOW_QUEUE_PACKETS: &str = "2000";
/// HTB's quantum of every class (bytes a class sends per round when classes borrow): fixed,
/// because the default (rate / 10) is above HTB's maximum at these rates and makes `tc` warn.
const QUANTUM: &str = "60000";

/// What the impaired switch did to the UDP traffic towards every host since the impairment was
/// applied, in packets as the switch sees them (a UDP GSO message counts once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairmentCounts {
    /// Dropped on purpose: the loss asked for.
    pub lost: u64,
    /// Held back behind later packets and then forwarded.
    pub held_back: u64,
    /// Meant to be held back but dropped for lack of room: loss nobody asked for.
    pub overflowed: u64,
}

/// One queue of `tc -s -j qdisc show`: the fields [`counts`] reads.
#[derive(Deserialize)]
struct QueueStats {
    handle: String,
    #[serde(default)]
    packets: u64,
    #[serde(default)]
    drops: u64,
}

/// Sums what the switch ports of `record`'s hosts counted since [`apply`]; all 0 when the
/// switch is not impaired.
pub(crate) fn counts(record: &ClusterRecord) -> Result<ImpairmentCounts, ImpairCountsError> {
    let mut total = ImpairmentCounts::default();
    for host in &record.hosts {
        let port = host.netns.as_str();
        let json =
            tc(&record.switch, &["-s", "-j", "qdisc", "show", "dev", port]).map_err(|source| {
                ImpairCountsError::Command {
                    host: host.name.clone(),
                    source,
                }
            })?;
        let port_counts = parse_counts(&json).map_err(|source| ImpairCountsError::Parse {
            host: host.name.clone(),
            source,
        })?;
        total.lost += port_counts.lost;
        total.held_back += port_counts.held_back;
        total.overflowed += port_counts.overflowed;
    }
    Ok(total)
}

/// The counts of one port from `tc -s -j qdisc show dev PORT`.
fn parse_counts(json: &str) -> Result<ImpairmentCounts, serde_json::Error> {
    let queues: Vec<QueueStats> = serde_json::from_str(json)?;
    let mut counts = ImpairmentCounts::default();
    for queue in queues {
        match queue.handle.as_str() {
            DROP_QUEUE => counts.lost += queue.drops,
            SLOW_QUEUE => {
                counts.held_back += queue.packets;
                counts.overflowed += queue.drops;
            }
            _ => {}
        }
    }
    Ok(counts)
}

/// Makes the switch lose `loss_percent`% of the UDP datagrams it forwards to each host of
/// `record` and hold back another `reorder_percent`%, replacing any earlier impairment; 0 and 0
/// removes it.
pub(crate) fn apply(
    record: &ClusterRecord,
    loss_percent: u32,
    reorder_percent: u32,
) -> Result<(), ImpairError> {
    let switch = record.switch.as_str();
    let drop_below = threshold(loss_percent);
    let hold_below = threshold(loss_percent + reorder_percent);
    let program = bytecode(&classifier(drop_below, hold_below));
    for host in &record.hosts {
        let port = host.netns.as_str();
        // Nothing to delete the first time.
        let _ = tc(switch, &["qdisc", "del", "dev", port, "root"]);
        if loss_percent == 0 && reorder_percent == 0 {
            continue;
        }
        for step in steps(port, &program) {
            tc(switch, &step).map_err(|source| ImpairError {
                host: host.name.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// The random draw below which `percent`% of packets fall.
pub(crate) fn threshold(percent: u32) -> u32 {
    let below = (u64::from(percent.min(100)) * (1u64 << 32) / 100).min(u64::from(u32::MAX));
    u32::try_from(below).unwrap_or(u32::MAX)
}

/// The classifier: packets that are not UDP go to [`FAST`]; of the rest, a random draw below
/// `drop_below` goes to [`DROP`], below `hold_below` to [`SLOW`], and the others to [`FAST`].
fn classifier(drop_below: u32, hold_below: u32) -> Vec<Instruction> {
    vec![
        // A = the IPv4 protocol byte.
        Instruction::ldb_abs(IPV4_PROTOCOL_OFFSET),
        // UDP: on to the draw; anything else: full speed.
        Instruction::jeq(IPPROTO_UDP, 1, 0),
        Instruction::ret(FAST),
        // A = random.
        Instruction::ld_random(),
        // Below the loss threshold: dropped.
        Instruction::jge(drop_below, 1, 0),
        Instruction::ret(DROP),
        // Below the reorder threshold: held back.
        Instruction::jge(hold_below, 1, 0),
        Instruction::ret(SLOW),
        Instruction::ret(FAST),
    ]
}

/// The `tc` commands that build the classes, their queues and the filter on switch port `port`.
fn steps<'a>(port: &'a str, program: &'a str) -> Vec<Vec<&'a str>> {
    let fast = [
        "htb", "rate", "10gbit", "burst", "256k", "cburst", "256k", "quantum", QUANTUM,
    ];
    vec![
        vec![
            "qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "1",
        ],
        [
            &[
                "class", "add", "dev", port, "parent", "1:", "classid", "1:1",
            ][..],
            &fast,
        ]
        .concat(),
        [
            &[
                "class", "add", "dev", port, "parent", "1:", "classid", "1:3",
            ][..],
            &fast,
        ]
        .concat(),
        vec![
            "class", "add", "dev", port, "parent", "1:", "classid", "1:2", "htb", "rate",
            SLOW_RATE, "burst", "1600", "cburst", "1600", "quantum", QUANTUM,
        ],
        vec![
            "qdisc", "add", "dev", port, "parent", "1:3", "handle", DROP_QUEUE, "pfifo", "limit",
            "0",
        ],
        vec![
            "qdisc",
            "add",
            "dev",
            port,
            "parent",
            "1:2",
            "handle",
            SLOW_QUEUE,
            "pfifo",
            "limit",
            SLOW_QUEUE_PACKETS,
        ],
        vec![
            "filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1", "bpf",
            "bytecode", program,
        ],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classifier_is_the_program_tc_has_always_been_given() {
        for (loss, reorder) in [(0, 0), (10, 20), (5, 0), (0, 30), (100, 0), (60, 60)] {
            let drop_below = threshold(loss);
            let hold_below = threshold(loss + reorder);
            let expected = format!(
                "9,48 0 0 23,21 1 0 17,6 0 0 65537,32 0 0 4294963256,53 1 0 {drop_below},6 0 0 65539,53 1 0 {hold_below},6 0 0 65538,6 0 0 65537"
            );
            assert_eq!(bytecode(&classifier(drop_below, hold_below)), expected);
        }
        assert_eq!(threshold(0), 0);
        assert_eq!(threshold(10), 429_496_729);
        assert_eq!(threshold(100), u32::MAX);
        assert_eq!(threshold(150), u32::MAX);
    }

    #[test]
    fn counts_are_read_from_the_queues_under_the_loss_and_held_back_classes() {
        let port = r#"[{"kind":"htb","handle":"1:","root":true,"bytes":9,"packets":900,"drops":17},
            {"kind":"pfifo","handle":"30:","parent":"1:3","bytes":0,"packets":0,"drops":12},
            {"kind":"pfifo","handle":"20:","parent":"1:2","bytes":9,"packets":240,"drops":5}]"#;
        assert_eq!(
            parse_counts(port).unwrap(),
            ImpairmentCounts {
                lost: 12,
                held_back: 240,
                overflowed: 5
            }
        );
        let unimpaired = r#"[{"kind":"noqueue","handle":"0:","root":true,"packets":0}]"#;
        assert_eq!(
            parse_counts(unimpaired).unwrap(),
            ImpairmentCounts::default()
        );
        assert!(parse_counts("not json").is_err());
    }
}
