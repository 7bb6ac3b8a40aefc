//! `sf`'s hand-written text parsers (clap parses the rest): sizes, `[HOST/]VM`,
//! `SLURM_JOB_CPUS_PER_NODE`, `--queues` lists and `--mount` specs. What
//! parses prints back as text that parses to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_control::size::parse_size;
use snowflock_tools::text::{MAX_JOB_NODES, cpus_per_node, mount_spec, parse_vm_ref, queue_list};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(size) = parse_size(text) {
        assert_eq!(parse_size(&size.to_string()), Ok(size));
    }
    if let Ok((host, vm)) = parse_vm_ref(text) {
        let printed = match &host {
            Some(host) => format!("{host}/{vm}"),
            None => vm.to_string(),
        };
        assert_eq!(parse_vm_ref(&printed).ok(), Some((host, vm)));
    }
    if let Ok(cpus) = cpus_per_node(text) {
        assert!(cpus.len() <= MAX_JOB_NODES);
        let printed: Vec<String> = cpus.iter().map(u32::to_string).collect();
        assert_eq!(cpus_per_node(&printed.join(",")).ok(), Some(cpus));
    }
    if let Ok(queues) = queue_list(text) {
        let printed: Vec<String> = queues.iter().map(u32::to_string).collect();
        assert_eq!(queue_list(&printed.join(",")).ok(), Some(queues));
    }
    if let Ok((host, guest)) = mount_spec(text) {
        assert!(text == format!("{host}:{guest}") || text == format!("{host}:{guest}:ro"));
    }
});
