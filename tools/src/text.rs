//! Hand-written parsers of `sf`'s arguments and environment; clap parses
//! everything else.

/// Most nodes `SLURM_JOB_CPUS_PER_NODE` may describe: far above any
/// cluster, low enough that a corrupt repeat count cannot exhaust memory.
pub const MAX_JOB_NODES: usize = 1 << 16;

/// A `[HOST/]VM` argument that names no VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a VM id (VM or HOST/VM)")]
pub struct VmRefError {
    pub text: String,
}

/// `[HOST/]VM`.
pub fn parse_vm_ref(text: &str) -> Result<(Option<String>, u64), VmRefError> {
    let (host, vm) = match text.split_once('/') {
        Some((host, vm)) => (Some(host.to_string()), vm),
        None => (None, text),
    };
    let vm = vm.parse().map_err(|_| VmRefError {
        text: text.to_string(),
    })?;
    Ok((host, vm))
}

/// Why `SLURM_JOB_CPUS_PER_NODE` does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpusPerNodeError {
    #[error("unreadable CPU count {part:?}")]
    Unreadable { part: String },
    #[error("CPU counts describe more than {MAX_JOB_NODES} nodes")]
    TooManyNodes,
}

/// Expands Slurm's CPU counts per node (`4(x2),2` is 4, 4, 2).
pub fn cpus_per_node(text: &str) -> Result<Vec<u32>, CpusPerNodeError> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let unreadable = || CpusPerNodeError::Unreadable {
            part: part.to_string(),
        };
        let (count, times) = match part.split_once("(x") {
            Some((count, rest)) => {
                let times = rest.strip_suffix(')').ok_or_else(unreadable)?;
                // Slurm never writes `(x0)`: a part names at least one node.
                match times.parse::<usize>() {
                    Ok(times) if times > 0 => (count, times),
                    _ => return Err(unreadable()),
                }
            }
            None => (part, 1),
        };
        let count: u32 = count.parse().map_err(|_| unreadable())?;
        if times > MAX_JOB_NODES - cpus.len() {
            return Err(CpusPerNodeError::TooManyNodes);
        }
        cpus.extend(std::iter::repeat_n(count, times));
    }
    Ok(cpus)
}

/// A `--queues` list item that is not a queue number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{item:?} is not a queue number")]
pub struct QueueListError {
    pub item: String,
}

/// A comma-separated list of NIC queue numbers (`0,2, 3`).
pub fn queue_list(list: &str) -> Result<Vec<u32>, QueueListError> {
    list.split(',')
        .map(|item| {
            item.trim().parse::<u32>().map_err(|_| QueueListError {
                item: item.to_string(),
            })
        })
        .collect()
}

/// Why a `--mount` argument is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountSpecError {
    #[error("--mount {spec}: expected HOST:GUEST[:ro]")]
    Form { spec: String },
    #[error("--mount {spec}: writable mounts are not supported; write under /out")]
    Writable { spec: String },
}

/// Splits `HOST:GUEST[:ro]` into the host and guest paths.
pub fn mount_spec(spec: &str) -> Result<(&str, &str), MountSpecError> {
    let form = || MountSpecError::Form {
        spec: spec.to_string(),
    };
    match spec.rsplit_once(':') {
        Some((rest, "ro")) => rest.split_once(':').ok_or_else(form),
        Some((_, "rw")) => Err(MountSpecError::Writable {
            spec: spec.to_string(),
        }),
        Some(pair) => Ok(pair),
        None => Err(form()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_counts_per_node_expand() {
        assert_eq!(cpus_per_node("2").unwrap(), vec![2]);
        assert_eq!(cpus_per_node("4(x2),2").unwrap(), vec![4, 4, 2]);
        assert!(cpus_per_node("4(x2").is_err());
        assert!(cpus_per_node("x").is_err());
    }

    #[test]
    fn a_huge_repeat_count_is_an_error_not_an_allocation() {
        // Expanded whole, this asked for 2^64-1 u32s and aborted the process.
        assert_eq!(
            cpus_per_node("4(x18446744073709551615)"),
            Err(CpusPerNodeError::TooManyNodes)
        );
        assert_eq!(
            cpus_per_node("1(x65536),1"),
            Err(CpusPerNodeError::TooManyNodes)
        );
        assert_eq!(cpus_per_node("1(x65536)").unwrap().len(), MAX_JOB_NODES);
    }

    #[test]
    fn a_part_of_no_nodes_is_unreadable() {
        // Found by fuzzing: "7(x0)" expanded to no nodes at all.
        assert_eq!(
            cpus_per_node("7(x0)"),
            Err(CpusPerNodeError::Unreadable {
                part: "7(x0)".into()
            })
        );
        assert!(cpus_per_node("4(x2),7(x0)").is_err());
    }

    #[test]
    fn vm_refs_name_an_optional_host() {
        assert_eq!(parse_vm_ref("7").unwrap(), (None, 7));
        assert_eq!(parse_vm_ref("h2/7").unwrap(), (Some("h2".into()), 7));
        assert!(parse_vm_ref("h2/x").is_err());
        assert!(parse_vm_ref("").is_err());
    }

    #[test]
    fn queue_lists_and_mount_specs_split() {
        assert_eq!(queue_list("0, 2,3").unwrap(), [0, 2, 3]);
        assert!(queue_list("0,,1").is_err());
        assert_eq!(mount_spec("/a:/b").unwrap(), ("/a", "/b"));
        assert_eq!(mount_spec("/a:/b:ro").unwrap(), ("/a", "/b"));
        assert!(matches!(
            mount_spec("/a:/b:rw"),
            Err(MountSpecError::Writable { .. })
        ));
        assert!(matches!(mount_spec("/a"), Err(MountSpecError::Form { .. })));
        assert!(matches!(
            mount_spec("/a:ro"),
            Err(MountSpecError::Form { .. })
        ));
    }
}
