//! Impairing the switch: loss and reordering of the UDP datagrams (mcdist's traffic) the switch
//! forwards to each host, while TCP (the control protocol, the memory server) is left alone.
//!
//! Each switch port gets an HTB root with three classes, and a classic-BPF classifier that
//! draws a random number per packet to pick one: 1:1 forwards at full speed, 1:2 is a
//! 20 Mbit/s class with a one-packet burst (its packets are overtaken by later ones), 1:3 feeds
//! a zero-length FIFO (its packets are dropped). This instead of netem, because kernels
//! without it (`CONFIG_NET_SCH_NETEM`) are common; it needs only `tc` and the HTB and BPF
//! classifier built in.

use crate::bpf::{Instruction, bytecode};
use crate::command::tc;
use crate::error::ImpairError;
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
fn threshold(percent: u32) -> u32 {
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
    let fast = ["htb", "rate", "10gbit", "burst", "256k", "cburst", "256k"];
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
            "class", "add", "dev", port, "parent", "1:", "classid", "1:2", "htb", "rate", "20mbit",
            "burst", "1600", "cburst", "1600",
        ],
        vec![
            "qdisc", "add", "dev", port, "parent", "1:3", "handle", "30:", "pfifo", "limit", "0",
        ],
        vec![
            "qdisc", "add", "dev", port, "parent", "1:2", "handle", "20:", "pfifo", "limit", "64",
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
}
